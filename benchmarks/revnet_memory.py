"""Memory and time of one forward+backward against depth: RevNet (reversible backward) vs ResNet.

    python benchmarks/revnet_memory.py                      # depths 4 8 16 32 64, 64 channels, 16x16
    python benchmarks/revnet_memory.py --depths 2 8 --channels 16 --size 8 --batch 16 --repeats 3

Three networks of the same shape on a batch ``(B, C, S, S)`` in float32, loss = sum of squares
of the output:

* ``revnet``: ``dgmlib.revnet.RevNet`` with its reversible backward (``reversible_sequence``, Gomez
  et al. 2017, Algorithm 1): only the final output is kept, the activations are rebuilt;
* ``revnet_autograd``: the same blocks with ordinary autograd (every activation kept);
* ``resnet``: ``dgmlib.revnet.ResidualStack``, ``x + H(x)`` with H = Conv-ReLU-Conv on all C channels.

Reported per (network, depth): ``saved MB``, the bytes autograd keeps for the backward pass
(``dgmlib.ode.saved_tensor_bytes``, deterministic, the activation memory); ``peak MB``, the CUDA
peak of one gradient (``torch.cuda.max_memory_allocated``, only on a GPU); ``seconds``, the median
wall time of one forward+backward. Ratios are against ``resnet`` measured in the same run; the
networks are interleaved per repeat. Nothing here is a test.

Peers: FrEIA (the reference invertible-network library) is not installed in the course
environment and this machine has no network, so it is imported guarded and skipped when absent;
``revnet_autograd`` and ``resnet`` are the peers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dgmlib.ode import saved_tensor_bytes
from dgmlib.revnet import ResidualStack, RevNet

try:  # the invertible-network library a reader might compare with; not a course dependency
    import FrEIA
    FREIA = f"installed ({getattr(FrEIA, '__version__', 'unknown version')}), not compared here"
except ImportError:
    FREIA = "not installed (and no network to install it), skipped"

NETS = ("revnet", "revnet_autograd", "resnet")


def build(name: str, channels: int, depth: int, hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet":
        return ResidualStack(channels, depth, hidden)
    return RevNet(channels, depth, hidden, memory_efficient=(name == "revnet"))


def gradient(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward+backward of ``sum(model(x)²)`` w.r.t. ``x`` and the parameters."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    torch.autograd.grad(model(x).pow(2).sum(), [x, *model.parameters()])
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cuda_peak_mb(model: torch.nn.Module, x: torch.Tensor) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gradient(model, x)
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device, requires_grad=True)

    rows: dict[tuple[str, int], dict] = {}
    for depth in args.depths:
        models = {n: build(n, args.channels, depth, args.hidden).to(device) for n in NETS}
        times: dict[str, list[float]] = {n: [] for n in NETS}
        for n in NETS:
            gradient(models[n], x)  # warm-up
        for _ in range(args.repeats):
            for n in NETS:
                times[n].append(gradient(models[n], x))
        for n in NETS:
            _, saved = saved_tensor_bytes(lambda: models[n](x).pow(2).sum())
            rows[n, depth] = {"saved_mb": saved / 2 ** 20, "seconds": statistics.median(times[n]),
                              "peak_mb": cuda_peak_mb(models[n], x) if on_gpu else float("nan")}

    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {args.threads} threads"
    print(f"One forward+backward, batch {args.batch} x {args.channels} channels x {args.size}x{args.size}, "
          f"hidden {args.hidden}, float32, {where}, median of {args.repeats}")
    print(f"FrEIA: {FREIA}")
    print(f"{'depth':>6} | " + " | ".join(f"{n:>28}" for n in NETS))
    print(f"{'':>6} | " + " | ".join(f"{'saved MB':>9} {'peak MB':>8} {'seconds':>9}" for _ in NETS))
    for d in args.depths:
        print(f"{d:>6} | " + " | ".join(
            f"{rows[n, d]['saved_mb']:9.2f} {rows[n, d]['peak_mb']:8.1f} {rows[n, d]['seconds']:9.4f}" for n in NETS))
    print("\nRatios against resnet at the same depth (saved bytes; peak on GPU; time):")
    for d in args.depths:
        ref = rows["resnet", d]
        parts = []
        for n in ("revnet", "revnet_autograd"):
            r = rows[n, d]
            peak = f", peak {r['peak_mb'] / ref['peak_mb']:.3f}" if on_gpu else ""
            parts.append(f"{n} saved {r['saved_mb'] / ref['saved_mb']:.3f}{peak}, time {r['seconds'] / ref['seconds']:.2f}")
        print(f"  depth {d:>4}: " + "; ".join(parts))
    lo, hi = min(args.depths), max(args.depths)
    print(f"\nGrowth from depth {lo} to depth {hi} ({hi / lo:.0f}x the blocks):")
    for n in NETS:
        peak = f", peak {rows[n, hi]['peak_mb'] / rows[n, lo]['peak_mb']:.2f}x" if on_gpu else ""
        print(f"  {n:<16} saved {rows[n, hi]['saved_mb'] / rows[n, lo]['saved_mb']:6.2f}x{peak}, "
              f"time {rows[n, hi]['seconds'] / rows[n, lo]['seconds']:6.2f}x")


if __name__ == "__main__":
    main()
