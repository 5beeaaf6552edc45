"""Memory and time of one gradient through N solver steps: backprop, torchdiffeq's adjoint, ours.

    python benchmarks/adjoint_memory.py            # N = 10, 30, 100, 300, 1000 (a few minutes on 2 cores)
    python benchmarks/adjoint_memory.py --steps 10 100 --repeats 3

Every (method, N) runs in a fresh Python process, so its peak resident memory (``ru_maxrss``) is
its own. The problem: dz/dt = f(t, z) with a ``ConcatMLP`` (D = 64, hidden 256, 3 layers), a batch
of 128 states in float32, integrated over [0, 1] by fixed-step RK4 with N steps (4N evaluations
of f), loss = sum of z(1)². Reported per run:

* ``peak MB``: peak RSS of the process after the gradient; ``+MB``: its growth during the
  gradient (over the peak of a warm-up at N = 2);
* ``saved MB``: bytes autograd keeps for the backward pass (``dgmlib.ode.saved_tensor_bytes``);
* ``seconds``: wall time of the gradient (forward and backward), the median of ``--repeats``.

A second table times the adaptive solver (dopri5, rtol = atol = 1e-6) for ours and torchdiffeq's
adjoint on the same problem. Peers are measured in the same run; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("backprop", "torchdiffeq_adjoint", "ours")


def _problem():
    import torch

    from dgmlib.ode import ConcatMLP

    torch.manual_seed(0)
    f = ConcatMLP(64, 256, num_layers=3)
    z0 = torch.randn(128, 64, requires_grad=True)
    return f, z0


def _solve(which: str, f, z0, t, **kwargs):
    import torchdiffeq

    from dgmlib import ode

    if which == "backprop":
        return torchdiffeq.odeint(f, z0, t, **kwargs)
    if which == "torchdiffeq_adjoint":
        return torchdiffeq.odeint_adjoint(f, z0, t, **kwargs)
    return ode.odeint_adjoint(f, z0, t, **kwargs)


def _gradient(which: str, f, z0, **kwargs) -> float:
    import torch

    t = torch.tensor([0.0, 1.0])
    start = time.perf_counter()
    loss = _solve(which, f, z0, t, **kwargs)[-1].pow(2).sum()
    torch.autograd.grad(loss, [z0, *f.parameters()])
    return time.perf_counter() - start


def run_one(method: str, steps: int, repeats: int) -> dict:
    """Measure one (method, N) in this process; returns a JSON-able dict."""
    import torch

    from dgmlib import ode

    torch.set_num_threads(2)
    f, z0 = _problem()
    fixed = {"method": "rk4", "options": {"step_size": 1.0 / steps}}
    _gradient(method, f, z0, method="rk4", options={"step_size": 0.5})  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = statistics.median(_gradient(method, f, z0, **fixed) for _ in range(repeats))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = torch.tensor([0.0, 1.0])
    _, saved = ode.saved_tensor_bytes(lambda: _solve(method, f, z0, t, **fixed)[-1].pow(2).sum())
    return {"method": method, "steps": steps, "peak_mb": peak / 1024, "growth_mb": (peak - before) / 1024,
            "saved_mb": saved / 2 ** 20, "seconds": seconds}


def run_adaptive(repeats: int) -> dict:
    """Median seconds of one dopri5 gradient for torchdiffeq's adjoint and ours (interleaved)."""
    import torch

    torch.set_num_threads(2)
    f, z0 = _problem()
    kwargs = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-6}
    times: dict[str, list[float]] = {"torchdiffeq_adjoint": [], "ours": []}
    for method in times:
        _gradient(method, f, z0, **kwargs)  # warm-up
    for _ in range(repeats):
        for method in times:
            times[method].append(_gradient(method, f, z0, **kwargs))
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--adaptive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats)))
        return
    if args.adaptive:
        print(json.dumps(run_adaptive(args.repeats)))
        return

    def child(*extra: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), *extra],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{' '.join(extra)} failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = {(m, n): child("--one", m, str(n)) for n in args.steps for m in METHODS}
    print("One gradient through N fixed RK4 steps (4N evaluations), batch 128 x D 64, 2 threads")
    print(f"{'N':>6} | " + " | ".join(f"{m:>36}" for m in METHODS))
    print(f"{'':>6} | " + " | ".join(f"{'peak MB':>8} {'+MB':>8} {'saved MB':>9} {'seconds':>8}" for _ in METHODS))
    for n in args.steps:
        cells = [rows[m, n] for m in METHODS]
        print(f"{n:>6} | " + " | ".join(
            f"{c['peak_mb']:8.0f} {c['growth_mb']:8.1f} {c['saved_mb']:9.2f} {c['seconds']:8.3f}" for c in cells))
    lo, hi = min(args.steps), max(args.steps)
    print(f"\nPeak RSS at N = {hi} over N = {lo}:")
    for m in METHODS:
        print(f"  {m:<20} {rows[m, hi]['peak_mb'] / rows[m, lo]['peak_mb']:6.2f}x   "
              f"(saved for backward: {rows[m, lo]['saved_mb']:.2f} -> {rows[m, hi]['saved_mb']:.2f} MB)")
    print("\nTime ratio ours / torchdiffeq adjoint, fixed steps:")
    for n in args.steps:
        print(f"  N = {n:>5}: {rows['ours', n]['seconds'] / rows['torchdiffeq_adjoint', n]['seconds']:.3f}")
    adaptive = child("--adaptive")
    print(f"\nAdaptive dopri5 (rtol = atol = 1e-6), median of {args.repeats}: torchdiffeq adjoint "
          f"{adaptive['torchdiffeq_adjoint']:.3f} s, ours {adaptive['ours']:.3f} s, ratio "
          f"{adaptive['ours'] / adaptive['torchdiffeq_adjoint']:.3f}")


if __name__ == "__main__":
    main()
