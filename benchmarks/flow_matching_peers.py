"""dgmlib's flow matching against torchcfm and Meta's flow_matching: the same network, path and batches, in one run.

One `dgmlib.diffusion.UNet(1, base)` is initialised from the seed and copied three times; each copy is trained for
the same number of Adam steps on the same minibatches of the 8x8 digits (the same indices at every step), scaled to
[-1, 1] and dequantized as `dgmlib.flow_matching.FlowMatching` does (levels_to_unit, then uniform noise over each
level's bin of width 2 / 16). Every network is called as `net(x, 999 t)`, `FlowMatching.velocity`'s convention. The
path is the straight OT path with σ_min = 0 in all three, x_t = t x1 + (1 - t) x0 with target u_t = x1 - x0, and
the loss is the squared error summed over the 64 pixels and averaged over the batch (dgmlib's units; Adam does not
see the scale). Each library samples (x0, x1, t) and builds (x_t, u_t) its own way:

* dgmlib: `FlowMatching(net, (1, 8, 8), OTPath(0.0), coupling, num_levels=17).training_loss(levels).mean()`
  (it dequantizes, draws x0 ~ N(0, I), pairs by `ot_pairing` with `--coupling ot`, and draws t ~ U(0, 1)).
* torchcfm: `ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow(x0, x1)` (it draws t itself,
  and an ε that σ = 0 multiplies away); with `--coupling ot`, `ExactOptimalTransportConditionalFlowMatcher(0.0)`,
  which solves the same exact minibatch OT problem (POT's `emd`) but then draws B pairs from the plan with
  replacement (`OTPlanSampler.sample_plan`), so a batch repeats some pairs and leaves some points out.
* flow_matching (Meta): `AffineProbPath(CondOTScheduler()).sample(x_0, x_1, t)` with t ~ U(0, 1). The library
  has no coupling of its own: with `--coupling ot` the pairs are composed here by SciPy's exact assignment
  (`linear_sum_assignment` on the squared distances, the same optimum as POT's `emd`).

The benchmark draws x1's dequantization noise, x0 and t in dgmlib's order, and each library trains under its
own copy of the global random state seeded with `--seed` (swapped in around its turns), so dgmlib and flow_matching
see the same numbers at every step and end with the same weights (printed); torchcfm's extra ε shifts its stream,
so its network is a replicate with other noise: read its Fréchet distance against the spread that `--seed` gives ours
(short runs without an EMA of the weights spread a lot), over several seeds rather than from one ratio.
Training runs in `--repeats` segments, the three libraries taking turns per segment (a different one first each
time); the time per step is the least of the segments' (a segment's seconds over its steps).

Sampling, n images from the same x0 (drawn as `FlowMatching.sample` draws it), each library with its own solver:

* Euler, `--euler-steps` N steps on [0, 1]: `FlowMatching.sample(n, "euler", N)`; flow_matching's
  `ODESolver.sample(x0, step_size=1/N, method="euler")` (torchdiffeq's fixed grid: for some N, e.g. 61, its
  ceil((1 - 0)/h + 1) in float32 gives one more, tiny step, and the NFE column shows N + 1); torchcfm has no sampler
  of its own: its examples integrate with torchdyn's `NeuralODE(...).trajectory(x0, t_span)`, which is
  `torchdyn.numerics.odeint(vector_field, x0, t_span, solver, atol, rtol)`; that function is called here directly
  on t_span = linspace(0, 1, N + 1), because importing `torchdyn.core` (NeuralODE) imports pytorch_lightning,
  torchmetrics and torchvision, and a torchvision that does not match the installed torch fails to load there.
* dopri5 with rtol = atol = 1e-5 (dgmlib's fixed tolerances): `FlowMatching.sample(n, "dopri5")` (torchdiffeq);
  `ODESolver.sample(x0, step_size=None, method="dopri5", rtol=1e-5, atol=1e-5)` (torchdiffeq too);
  torchdyn's own Dormand-Prince `odeint(..., solver="dopri5", rtol=1e-5, atol=1e-5)`, with its own initial step
  and step control, so its NFE differs.

The time per sample is the least of `--repeats` timed calls (taken in turns, as the training segments) over n. The
quality of each library's samples is `dgmlib.vq.frechet_digit_distance` of the images mapped to [0, 1] (clamped)
against the 1000 training digits; the floor is the 447 test digits against the same training digits (n = 447 by
default, the same count).

Paired checks on dgmlib's trained network, so that any difference is the library's and not the training's: the
same x0 through dgmlib's and flow_matching's Euler (and torchdyn's), which agree to float32 rounding; the same
through each dopri5 (dgmlib and flow_matching both call torchdiffeq with the same tolerances); and on one batch
with the same (x0, x1, t): x_t, u_t and the per-example loss of each library against dgmlib's, the OT assignment of
dgmlib (`ot_pairing`), torchcfm (the argmax of its `emd` plan) and SciPy, and how many distinct pairs torchcfm's
`sample_plan` keeps out of B.

    pip install -e ".[bench]"
    python benchmarks/flow_matching_peers.py                  # digits, a few minutes on 2 CPU cores
    python benchmarks/flow_matching_peers.py --coupling ot    # minibatch OT: dgmlib's against torchcfm's exact OT-CFM
    python benchmarks/flow_matching_peers.py --steps 20000 --base 32 --repeats 5
    python benchmarks/flow_matching_peers.py --quick          # a smoke run (well under a minute)

Prints the time per training step of each library and the ratios ours / torchcfm and ours / flow_matching, the
CFM loss over the last 100 steps; per sampler and library, the NFE, the time per sample, its ratio ours / peer, the
Fréchet distance and its ratio ours / peer; the Fréchet floor; the paired differences. The ratios are of this run,
on this device; the network dominates the time, so a shared machine moves them by ±10 %.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from dgmlib import data, diffusion, vq
from dgmlib import flow_matching as fm
from dgmlib.device import randn, resolve_device

SHAPE = (1, 8, 8)
TIME_SCALE = 999.0  # FlowMatching.velocity calls net(x, 999 t)
TOL = 1e-5  # dgmlib's dopri5 tolerances (sample_ode), given to the peers' dopri5 too
OURS, TCFM, META = "dgmlib", "torchcfm", "flow_matching"
LIBRARIES = (OURS, TCFM, META)


# --------------------------------------------------------------------------- the peers' parts


def _import_peers() -> dict:
    """torchcfm's matchers, flow_matching's path and solver, torchdyn's odeint (without torchdyn.core)."""
    import flow_matching
    import ot
    import torchcfm
    import torchdyn
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )
    from torchdyn.numerics import odeint as torchdyn_odeint

    versions = {TCFM: torchcfm.__version__, META: flow_matching.__version__,
                "torchdyn": getattr(torchdyn, "__version__", "?"), "POT": ot.__version__}
    return {"versions": versions, "CFM": ConditionalFlowMatcher, "OTCFM": ExactOptimalTransportConditionalFlowMatcher,
            "path": AffineProbPath(CondOTScheduler()), "ODESolver": ODESolver, "ModelWrapper": ModelWrapper,
            "torchdyn_odeint": torchdyn_odeint}


def scipy_ot_permutation(x0: Tensor, x1: Tensor) -> Tensor:
    """The exact OT assignment by SciPy's Hungarian solver: ``perm`` with x0[perm[j]] paired with x1[j]."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.detach().flatten(1).double().cpu(), x1.detach().flatten(1).double().cpu()).square()
    rows, cols = linear_sum_assignment(cost.numpy())  # row rows[k] (an x0) goes to column cols[k] (an x1)
    perm = np.empty(len(cols), dtype=np.int64)
    perm[cols] = rows
    return torch.from_numpy(perm).to(x0.device)


def meta_field(peer: dict, net: nn.Module) -> nn.Module:
    """flow_matching's ``ModelWrapper`` around the network: ODESolver calls ``model(x=x, t=t)`` with a scalar t."""

    class Velocity(peer["ModelWrapper"]):
        def __init__(self) -> None:
            super().__init__(net)
            self.nfe = 0

        def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
            self.nfe += 1
            return self.model(x, TIME_SCALE * t.expand(len(x)).to(x.dtype))

    return Velocity()


class TorchdynField(nn.Module):
    """torchdyn's vector field ``f(t, x)`` (scalar t), as torchcfm's examples wrap their networks, counting calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.nfe = net, 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        return self.net(x, TIME_SCALE * t.expand(len(x)).to(x.dtype))


def meta_sample(peer: dict, net: nn.Module, x0: Tensor, sampler: str, steps: int) -> tuple[Tensor, int]:
    field = meta_field(peer, net)
    solver = peer["ODESolver"](velocity_model=field)
    if sampler == "euler":
        x = solver.sample(x_init=x0, step_size=1.0 / steps, method="euler")
    else:
        x = solver.sample(x_init=x0, step_size=None, method="dopri5", atol=TOL, rtol=TOL)
    return x, field.nfe


def torchdyn_sample(peer: dict, net: nn.Module, x0: Tensor, sampler: str, steps: int) -> tuple[Tensor, int]:
    field = TorchdynField(net)
    if sampler == "euler":
        t_span = torch.linspace(0.0, 1.0, steps + 1, device=x0.device)
        _, trajectory = peer["torchdyn_odeint"](field, x0, t_span, solver="euler")
    else:
        t_span = torch.linspace(0.0, 1.0, 2, device=x0.device)
        _, trajectory = peer["torchdyn_odeint"](field, x0, t_span, solver="dopri5", atol=TOL, rtol=TOL)
    return trajectory[-1], field.nfe


# --------------------------------------------------------------------------- training


class RandomStream:
    """One library's own copy of the global random state (torch's CPU and CUDA generators, NumPy's, which torchcfm's
    OT sampler draws from), seeded once and swapped in around each of the library's turns."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None
        outer = self._get()
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.state = self._get()
        self._set(outer)

    def _get(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None
        return torch.get_rng_state(), cuda, np.random.get_state()

    def _set(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.cuda)
        np.random.set_state(state[2])

    @contextmanager
    def active(self) -> Iterator[None]:
        outer = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(outer)


class Run:
    """One library's training: its copy of the network, its Adam, its loss on a batch, its random stream."""

    def __init__(self, name: str, net: nn.Module, loss_fn: Callable[[Tensor], Tensor], inputs: Tensor, lr: float,
                 stream: RandomStream) -> None:
        self.name, self.net, self.loss_fn, self.inputs, self.stream = name, net, loss_fn, inputs, stream
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        self.losses: list[Tensor] = []
        self.segments: list[tuple[float, int]] = []  # (seconds, steps)

    def train_segment(self, indices: Tensor, device: torch.device) -> None:
        with self.stream.active():
            _sync(device)
            start = time.perf_counter()
            for idx in indices:
                loss = self.loss_fn(self.inputs[idx])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.losses.append(loss.detach())
            _sync(device)
        self.segments.append((time.perf_counter() - start, len(indices)))

    def seconds_per_step(self) -> float:
        return min(seconds / steps for seconds, steps in self.segments)

    def tail_loss(self) -> float:
        return torch.stack(self.losses[-100:]).mean().item()


def build_runs(args: argparse.Namespace, peer: dict, levels: Tensor, num_levels: int,
               device: torch.device) -> tuple[dict[str, Run], fm.FlowMatching]:
    """The same initial network three times; dgmlib's FlowMatching and the peers' losses around the copies."""
    torch.manual_seed(args.seed)
    initial = diffusion.UNet(SHAPE[0], args.base).to(device)
    nets = {name: copy.deepcopy(initial) for name in LIBRARIES}
    unit = diffusion.levels_to_unit(levels, num_levels).to(device)  # the peers dequantize these per batch
    width = 2.0 / (num_levels - 1)

    def dequantize(x: Tensor) -> Tensor:  # FlowMatching.to_unit's noise, drawn in the same way
        return x + (torch.rand(x.shape, device=x.device, dtype=x.dtype) - 0.5) * width

    def squared_error(v: Tensor, u: Tensor) -> Tensor:  # summed over the pixels, averaged over the batch
        return (v - u).square().flatten(1).sum(1).mean()

    model = fm.FlowMatching(nets[OURS], SHAPE, fm.OTPath(0.0), coupling=args.coupling, num_levels=num_levels)
    matcher = (peer["OTCFM"] if args.coupling == "ot" else peer["CFM"])(sigma=0.0)
    path = peer["path"]

    def torchcfm_loss(batch: Tensor) -> Tensor:
        x1 = dequantize(batch)
        x0 = torch.randn_like(x1)
        t, x_t, u_t = matcher.sample_location_and_conditional_flow(x0, x1)
        return squared_error(nets[TCFM](x_t, TIME_SCALE * t), u_t)

    def meta_loss(batch: Tensor) -> Tensor:
        x1 = dequantize(batch)
        x0 = torch.randn_like(x1)
        if args.coupling == "ot":
            x0 = x0[scipy_ot_permutation(x0, x1)]
        t = torch.rand(len(x1), device=x1.device, dtype=x1.dtype)
        sample = path.sample(x_0=x0, x_1=x1, t=t)
        return squared_error(nets[META](sample.x_t, TIME_SCALE * sample.t), sample.dx_t)

    losses = {OURS: lambda batch: model.training_loss(batch).mean(), TCFM: torchcfm_loss, META: meta_loss}
    inputs = {OURS: levels.to(device), TCFM: unit, META: unit}
    runs = {name: Run(name, nets[name], losses[name], inputs[name], args.lr, RandomStream(args.seed, device))
            for name in LIBRARIES}
    return runs, model


def train_all(runs: dict[str, Run], args: argparse.Namespace, num_train: int, device: torch.device) -> None:
    """``args.steps`` steps each on the same batches, in ``args.repeats`` segments, the libraries taking turns."""
    g = torch.Generator().manual_seed(args.seed)
    indices = torch.randint(num_train, (args.steps, args.batch), generator=g).to(device)
    for run in runs.values():
        run.net.train()
    names = list(runs)
    for k, segment in enumerate(torch.tensor_split(indices, min(args.repeats, args.steps))):
        for name in names[k % len(names):] + names[:k % len(names)]:  # a different library first in each turn
            runs[name].train_segment(segment, device)
    for run in runs.values():
        run.net.eval()


# --------------------------------------------------------------------------- timing and quality


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_in_turns(fns: dict[str, Callable[[], tuple[Tensor, int]]], device: torch.device,
                   repeats: int) -> dict[str, tuple[Tensor, int, float]]:
    """Each function's first (output, NFE) and the least seconds of ``repeats`` calls, the functions taking turns
    (a different one first in each turn)."""
    out: dict[str, tuple[Tensor, int, float]] = {}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                x, nfe = fn()
            _sync(device)
            seconds = time.perf_counter() - start
            out[name] = (out[name][0], out[name][1], min(out[name][2], seconds)) if name in out else (x, nfe, seconds)
    return out


def frechet(x: Tensor) -> float:
    return vq.frechet_digit_distance(((x.float().cpu() + 1) / 2).clamp(0, 1))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # on the CPU: the same x0 on every device (dgmlib.device.randn)


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def paired_checks(peer: dict, model: fm.FlowMatching, unit: Tensor, args: argparse.Namespace,
                  device: torch.device) -> list[str]:
    """Differences between the libraries on dgmlib's trained network with the same inputs, as printable lines."""
    net, lines = model.net, []
    m = min(args.n, 64)
    x0 = randn((m, *SHAPE), device=device, dtype=torch.float32, generator=generator(args.seed + 2))
    with torch.no_grad():
        for sampler in ("euler", "dopri5"):
            ours = model.sample(m, sampler, args.euler_steps, x0=x0)
            nfe = model.last_nfe
            meta, meta_nfe = meta_sample(peer, net, x0, sampler, args.euler_steps)
            dyn, dyn_nfe = torchdyn_sample(peer, net, x0, sampler, args.euler_steps)
            what = f"Euler {args.euler_steps} steps" if sampler == "euler" else f"dopri5 (rtol = atol = {TOL:g})"
            lines.append(f"{what}, the same x0 ({m} samples): max|dgmlib - flow_matching| = {max_diff(ours, meta):.2e}"
                         f", max|dgmlib - torchdyn| = {max_diff(ours, dyn):.2e} (NFE {nfe} / {meta_nfe} / {dyn_nfe})")

    # the path and the loss on one batch with the same (x0, x1, t)
    g = generator(args.seed + 3)
    batch = unit[torch.randint(len(unit), (args.batch,), generator=g).to(device)]
    x1 = batch + (torch.rand(batch.shape, generator=g).to(device) - 0.5) * (2.0 / 16)
    x0 = randn(x1.shape, device=device, generator=g)
    t = torch.rand(len(x1), generator=g).to(device)
    path = fm.OTPath(0.0)
    xt_ours, ut_ours = path.interpolate(x0, x1, t), path.conditional_velocity(x0, x1, t)
    _, xt_cfm, ut_cfm = peer["CFM"](sigma=0.0).sample_location_and_conditional_flow(x0, x1, t=t)
    meta = peer["path"].sample(x_0=x0, x_1=x1, t=t)
    with torch.no_grad():
        loss_ours = fm.cfm_loss(model.field(), x0, x1, t, path)

        def loss_of(x_t: Tensor, u_t: Tensor) -> Tensor:
            return (net(x_t, TIME_SCALE * t) - u_t).square().flatten(1).sum(1)

        rel = {name: ((loss_of(x_t, u_t) - loss_ours).abs() / loss_ours).max().item()
               for name, x_t, u_t in ((TCFM, xt_cfm, ut_cfm), (META, meta.x_t, meta.dx_t))}
    lines.append(f"path on one batch of {len(x1)}, the same (x0, x1, t): x_t max|dgmlib - torchcfm| = "
                 f"{max_diff(xt_ours, xt_cfm):.2e}, max|dgmlib - flow_matching| = {max_diff(xt_ours, meta.x_t):.2e}; "
                 f"u_t {max_diff(ut_ours, ut_cfm):.2e}, {max_diff(ut_ours, meta.dx_t):.2e}; per-example loss, largest "
                 f"relative difference {rel[TCFM]:.2e}, {rel[META]:.2e}")

    # the minibatch OT coupling of the same (x0, x1)
    ours_perm = fm.ot_pairing(x0, x1).cpu()
    scipy_perm = scipy_ot_permutation(x0, x1).cpu()
    sampler = peer["OTCFM"](sigma=0.0).ot_sampler
    plan = sampler.get_map(x0, x1)  # (B, B): its emd plan, a permutation over B
    cfm_perm = torch.from_numpy(plan.argmax(axis=0))
    rows, cols = sampler.sample_map(plan, len(x0))  # what its sample_plan draws: B pairs, with replacement
    distinct = len(set(zip(rows.tolist(), cols.tolist())))

    def cost(perm: Tensor) -> float:
        return (x0.cpu()[perm] - x1.cpu()).square().flatten(1).sum(1).mean().item()

    lines.append(f"OT coupling of that batch: dgmlib's ot_pairing = torchcfm's emd plan: "
                 f"{(ours_perm == cfm_perm).float().mean().item():.0%} of the pairs, = SciPy's assignment: "
                 f"{(ours_perm == scipy_perm).float().mean().item():.0%}; mean cost {cost(ours_perm):.4f} / "
                 f"{cost(cfm_perm):.4f} / {cost(scipy_perm):.4f} (independent {cost(torch.arange(len(x0))):.4f}); "
                 f"torchcfm's sample_plan keeps {distinct} distinct pairs of {len(x0)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each library")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--base", type=int, default=16, help="UNet base channels")
    parser.add_argument("--coupling", default="independent", choices=fm.COUPLINGS,
                        help="independent, or minibatch OT (torchcfm: ExactOptimalTransportConditionalFlowMatcher)")
    parser.add_argument("--n", type=int, default=447, help="samples per library and sampler (447: the floor's count)")
    parser.add_argument("--euler-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed sampling calls (and training segments) per library; the least time is kept")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: dgmlib.device.default_device())")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 60 steps, n 64, 5 Euler steps, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.n, args.euler_steps, args.repeats = 60, 64, 5, 1
    if min(args.steps, args.batch, args.n - 1, args.euler_steps, args.repeats) < 1:
        parser.error("--steps, --batch, --euler-steps and --repeats must be positive, --n at least 2")
    warnings.filterwarnings("ignore")
    peer = _import_peers()
    device = resolve_device(args.device)
    digits = data.load_image_data("digits")

    runs, model = build_runs(args, peer, digits.train, digits.num_levels, device)
    train_all(runs, args, len(digits.train), device)
    same_weights = max(max_diff(a, b) for a, b in zip(runs[OURS].net.parameters(), runs[META].net.parameters()))
    cfm_weights = max(max_diff(a, b) for a, b in zip(runs[OURS].net.parameters(), runs[TCFM].net.parameters()))

    n, seed = args.n, args.seed + 1

    def prior() -> Tensor:
        return randn((n, *SHAPE), device=device, dtype=torch.float32, generator=generator(seed))  # FlowMatching's x0

    def ours(sampler: str) -> Callable[[], tuple[Tensor, int]]:
        def draw() -> tuple[Tensor, int]:
            x = model.sample(n, sampler, args.euler_steps, generator=generator(seed))
            return x, model.last_nfe
        return draw

    def meta(sampler: str) -> Callable[[], tuple[Tensor, int]]:
        return lambda: meta_sample(peer, runs[META].net, prior(), sampler, args.euler_steps)

    def torchcfm(sampler: str) -> Callable[[], tuple[Tensor, int]]:
        return lambda: torchdyn_sample(peer, runs[TCFM].net, prior(), sampler, args.euler_steps)

    with torch.no_grad():  # warm-up at the sample batch size
        for run in runs.values():
            for _ in range(2):
                run.net(prior(), torch.full((n,), 500.0, device=device))
    results = {}
    for sampler in ("euler", "dopri5"):
        out = timed_in_turns({OURS: ours(sampler), TCFM: torchcfm(sampler), META: meta(sampler)}, device, args.repeats)
        results[sampler] = {name: (nfe, seconds / n, frechet(x)) for name, (x, nfe, seconds) in out.items()}
    floor = vq.frechet_digit_distance(data.load_digits("test") / 16.0)
    unit = diffusion.levels_to_unit(digits.train, digits.num_levels).to(device)
    checks = paired_checks(peer, model, unit, args, device)

    v = peer["versions"]
    print("command: python " + " ".join(sys.argv))
    print(f"device {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; torchcfm {v[TCFM]}, "
          f"flow_matching {v[META]}, torchdyn {v['torchdyn']} (numerics.odeint), POT {v['POT']}")
    params = sum(p.numel() for p in model.net.parameters())
    print(f"digits 8x8 in [-1, 1], dequantized; UNet(1, base {args.base}), {params} parameters, one initial copy each; "
          f"{args.steps} steps, batch {args.batch}, Adam lr {args.lr}, seed {args.seed}; OT path sigma_min = 0, "
          f"coupling {args.coupling}; time: least of {args.repeats} (training segments, sampling calls)")
    peers = (TCFM, META)
    coupling = {OURS: f"FlowMatching(coupling={args.coupling!r})",
                TCFM: "ExactOptimalTransportCFM(0)" if args.coupling == "ot" else "ConditionalFlowMatcher(0)",
                META: "AffineProbPath(CondOT)" + (" + SciPy OT" if args.coupling == "ot" else "")}
    print(f"{'training':<14} {'path / coupling':<36} {'ms/step':>8} {'ours/peer':>9} {'CFM loss, last 100':>18}")
    ours_step = runs[OURS].seconds_per_step()
    for name in LIBRARIES:
        step = runs[name].seconds_per_step()
        ratio = "" if name == OURS else f"{ours_step / step:.2f}"
        print(f"{name:<14} {coupling[name]:<36} {1e3 * step:>8.2f} {ratio:>9} {runs[name].tail_loss():>18.4f}")
    print(f"trained weights: max|dgmlib - flow_matching| = {same_weights:.2e} (the same noise at every step), "
          f"max|dgmlib - torchcfm| = {cfm_weights:.2e} (its extra ε draw shifts its stream)")
    print(f"sampling: n = {n} from the same x0 per library; Fréchet digit distance to the 1000 training digits")
    print(f"{'sampler':<16} {'library':<20} {'NFE':>5} {'ms/sample':>10} {'time ours/peer':>14} {'Fréchet':>8} "
          f"{'FD ours/peer':>12}")
    for sampler, rows in results.items():
        label = f"euler {args.euler_steps}" if sampler == "euler" else "dopri5 1e-5"
        _, t_o, fd_o = rows[OURS]
        for name in LIBRARIES:
            nfe, t, fd = rows[name]
            solver = {OURS: "", TCFM: " (torchdyn)", META: ""}[name]
            t_ratio = "" if name == OURS else f"{t_o / t:.2f}"
            fd_ratio = "" if name == OURS else f"{fd_o / fd:.3f}"
            print(f"{label if name == OURS else '':<16} {name + solver:<20} {nfe:>5d} {1e3 * t:>10.4f} {t_ratio:>14} "
                  f"{fd:>8.3f} {fd_ratio:>12}")
    print(f"Fréchet floor (447 test digits against the 1000 training digits): {floor:.3f}")
    for peer_name in peers:
        ratios = [f"{runs[OURS].seconds_per_step() / runs[peer_name].seconds_per_step():.2f} per step"]
        ratios += [f"{results[s][OURS][1] / results[s][peer_name][1]:.2f} per sample ({s})" for s in results]
        print(f"time ours / {peer_name}: " + ", ".join(ratios))
    print("paired, on dgmlib's trained network:")
    for line in checks:
        print("  " + line)
    print(f"torchdyn.core imported: {'torchdyn.core' in sys.modules}; "
          f"torchvision imported: {'torchvision' in sys.modules}")


if __name__ == "__main__":
    main()
