"""The judges of hw6_diffusion: every test cell's points, decided in the grader (``dgmlib.grading.judge``).

Each judge draws its inputs from ``rng`` (a secret seed per submission): noise schedules (random betas, not
only the linear and cosine ones), shapes, timesteps, the noise, the network's parameters. It calls the
student's code through the cell's probe and compares with the reference: ``dgmlib.diffusion`` (the full
library, here in the grader) and the solution's own cells (``REF``). A schedule or a network cannot cross the
wire, so the probes expose small wrappers of the test cells that build them in the kernel from data the judge
sends: ``NoiseSchedule(betas)``, and ``make_net(spec)`` (a ``TimeMLP`` or ``UNet`` with the judge's parameters,
or a ``TableNet`` ``eps(x_t, t) = scale[t - 1] x_t + shift[t - 1]``). Randomness is passed in explicitly: the
judge sends every noise tensor, so the student's outputs are deterministic and recomputed here.

Parts 5-8 (lecture 11) need no training: the judges send random score and noise models (a ``Field`` with the
judge's parameters, built in the kernel by the test cell), schedules gamma(t) described by their kind and parameters,
VP SDEs by their betas, and every noise tensor, and compare with ``dgmlib.score`` (``denoising_score_matching_loss``,
``annealed_langevin_step``, ``VDM.diffusion_loss``, ``reverse_drift``) and with the exact Gaussian log density that the
probability-flow ODE must reproduce.

The trained models are measured here: their ``state_dict()`` is loaded strictly into the architecture the
instructions fix (``TimeMLP(2, 128, 3)``, ``UNet(1, base=BASE)``, with ``NoiseSchedule.linear(T)``), and the
samples (sliced W2 to the test points) and L_simple on the test digits are computed with dgmlib, on data loaded
here, from seeds drawn here. The student's sampler is judged by replaying it: the kernel runs the student's
``p_sample_step`` chain (and ``Denoiser.sample``) from noise the judge chooses, and the judge recomputes the same
trajectory with the reference step and the loaded network. The student's methods are never asked for a number
that earns points.

This file is the instructor's: it is never released, and the student's kernel never sees it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dgmlib import data, diffusion
from dgmlib import score as score_lib
from dgmlib.diffusion import NoiseSchedule
from dgmlib.grading.judge import secret_float as _uniform, secret_int as _int, secret_seed as _seed
from dgmlib.grading.judge import (JudgeFailure, as_tensor, expect, expect_close, expect_le, expect_shape, judge,
                                  randomise, solution_cells)

REF = solution_cells(Path(__file__).with_name("hw6_diffusion.ipynb"), "forward", "objective")

F64 = torch.float64
TOY_T = (100, 1000)
"""The T of the toy_data cell, ``pick(1000, 100)``: the trained models' schedules are NoiseSchedule.linear(T)."""
W2_BOUND = 0.25
"""Sliced W2 of 2000 samples to 2000 test points; held-out data score about 0.08, N(0, I) noise about 0.50."""
DIGITS_BOUND = 0.35
"""L_simple on the test digits; the reference solution gets about 0.13 in fast mode (an untrained UNet about 1.2)."""


# ------------------------------------------------------------------ inputs drawn from the secret seed


def _betas(rng: torch.Generator, kind: str, T: int) -> torch.Tensor:
    """The betas of a schedule: linear, cosine, or random values in (1e-3, 0.5) in no particular order."""
    if kind == "linear":
        return NoiseSchedule.linear(T).betas  # T > 20
    if kind == "cosine":
        return NoiseSchedule.cosine(T).betas
    return 1e-3 + 0.5 * torch.rand(T, generator=rng, dtype=F64)


def _timesteps(rng: torch.Generator, T: int, B: int) -> torch.Tensor:
    """(B,) int64 timesteps in 1..T, with 1 and T among them (B >= 2)."""
    t = torch.randint(1, T + 1, (B,), generator=rng)
    t[0], t[-1] = 1, T
    return t[torch.randperm(B, generator=rng)]


def _randn(rng: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=rng, dtype=dtype)


def _broadcast_var(var, x0: torch.Tensor, msg: str) -> torch.Tensor:
    """The student's variance as (B, 1, ..., 1): accepted shaped so, or shaped like x0 and constant per example."""
    v = as_tensor(var, msg).to(F64)
    per_example = (x0.shape[0],) + (1,) * (x0.dim() - 1)
    if tuple(v.shape) == tuple(x0.shape):
        flat = v.reshape(len(v), -1)
        expect(bool((flat == flat[:, :1]).all()), f"{msg}: one variance per example")
        return flat[:, :1].reshape(per_example)
    return expect_shape(v, per_example, f"{msg} (shape (B, 1, ..., 1))")


# ------------------------------------------------------------------ networks the kernel builds too


class TableNet(torch.nn.Module):
    """The test cell's ``TableNet``: eps_theta(x_t, t) = scale[t - 1] x_t + shift[t - 1]."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        return self.scale[t - 1].to(x_t).reshape(shape) * x_t + self.shift[t - 1].to(x_t)


def _table(rng: torch.Generator, T: int, event: tuple[int, ...]) -> tuple[dict, TableNet]:
    scale, shift = 0.8 * _randn(rng, T), 0.5 * _randn(rng, T, *event)
    return {"kind": "table", "scale": scale, "shift": shift}, TableNet(scale, shift)


def _oracle(schedule: NoiseSchedule, c: torch.Tensor) -> tuple[dict, TableNet]:
    """The exact noise when all data sit at the point c: eps = (x_t - sqrt(ab_t) c) / sqrt(1 - ab_t)."""
    ab = schedule.alpha_bar
    scale, shift = 1 / (1 - ab).sqrt(), -(ab.sqrt() / (1 - ab).sqrt())[:, None] * c[None]
    return {"kind": "table", "scale": scale, "shift": shift}, TableNet(scale, shift)


def _network(rng: torch.Generator, kind: str, args: tuple, dtype: torch.dtype = F64) -> tuple[dict, torch.nn.Module]:
    """A TimeMLP or UNet with random parameters (here) and its description for ``make_net`` (there)."""
    cls = {"TimeMLP": diffusion.TimeMLP, "UNet": diffusion.UNet}[kind]
    net = randomise(cls(*args), rng, 0.3).to(dtype)
    state = {name: v.detach().clone() for name, v in net.state_dict().items()}
    return {"kind": kind, "args": list(args), "state": state}, net


# ------------------------------------------------------------------ Part 1: the forward process


@judge("test_q_sample")
def q_sample(k, rng):
    cases = [("linear", _int(rng, 25, 120), (2,)), ("cosine", _int(rng, 5, 60), (1, 8, 8)),
             ("random", _int(rng, 3, 40), (3,)), ("random", _int(rng, 2, 30), (2, 4, 6)), ("random", 1, (2,))]
    for kind, T, event in cases:
        betas = _betas(rng, kind, T)
        s = NoiseSchedule(betas)
        for dtype in (F64, torch.float32):
            B = _int(rng, 3, 7)
            x0, noise = _randn(rng, B, *event, dtype=dtype), _randn(rng, B, *event, dtype=dtype)
            t = _timesteps(rng, T, B)
            out = expect_shape(k.q_sample_of(betas, x0, t, noise), tuple(x0.shape), "q_sample's x_t is shaped like x0")
            expected = diffusion.q_sample(s, x0.to(F64), t, noise.to(F64))
            # float32 precision for both dtypes: 1 - alpha_bar_t cancels when computed in float32
            expect_close(out, expected, atol=1e-4, rtol=1e-4,
                         msg=f"x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise ({kind} schedule, T = {T}, "
                             f"{dtype})")
    # the moments of many draws (the visible test's check), at a timestep and a value of the judge's
    s = NoiseSchedule.linear(100)
    step, c = _int(rng, 2, 99), float(2 * torch.rand(1, generator=rng) - 1)
    many = as_tensor(k.q_sample_of(s.betas, torch.full((50_000, 1), c), torch.full((50_000,), step),
                                   _randn(rng, 50_000, 1, dtype=torch.float32)), "x_t").to(F64)
    ab = s.alpha_bar[step - 1]
    expect_close(many.mean(), c * ab.sqrt(), atol=0.02, msg="the mean of x_t is sqrt(alpha_bar_t) x0")
    expect_close(many.var(), 1 - ab, atol=0.02, msg="the variance of x_t is 1 - alpha_bar_t")


@judge("test_posterior")
def posterior(k, rng):
    cases = [("linear", _int(rng, 25, 120), (1,)), ("cosine", _int(rng, 5, 60), (3,)),
             ("random", _int(rng, 3, 40), (1, 8, 8)), ("random", _int(rng, 2, 30), (2, 3, 5)),
             ("linear", 1000, (2,))]
    for kind, T, event in cases:
        betas = _betas(rng, kind, T)
        s = NoiseSchedule(betas)
        # float32 data only where 1 - alpha_bar_1 is not tiny (computed in float32, it cancels)
        for dtype in (F64,) if T == 1000 else (F64, torch.float32):
            B = _int(rng, 3, 7)
            x0, x_t = _randn(rng, B, *event, dtype=dtype), _randn(rng, B, *event, dtype=dtype)
            t = _timesteps(rng, T, B)
            out = k.q_posterior_of(betas, x0, x_t, t)
            expect(isinstance(out, (tuple, list)) and len(out) == 2, "q_posterior returns the pair (mean, var)")
            mean, var = out
            ref_mean, ref_var, _ = diffusion.q_posterior_mean_variance(s, x0.to(F64), x_t.to(F64), t)
            tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=1e-6, rtol=1e-5)
            expect_close(mean, ref_mean, **tol, msg=f"the posterior mean mu~_t ({kind} schedule, T = {T}, {dtype}; "
                                                    "at t = 1 it is x0)")
            expect_close(_broadcast_var(var, x0, "the posterior variance"), ref_var, **tol,
                         msg=f"the posterior variance beta~_t = (1 - alpha_bar_(t-1)) / (1 - alpha_bar_t) beta_t "
                             f"({kind} schedule, T = {T}; 0 at t = 1)")


# ------------------------------------------------------------------ Part 2: L_simple and one step


def _l_simple(net: torch.nn.Module, s: NoiseSchedule, x0, t, noise) -> torch.Tensor:
    """The reference L_simple per example (B,), computed here."""
    with torch.no_grad():
        x_t = diffusion.q_sample(s, x0, t, noise)
        return (noise - net(x_t, t)).to(F64).pow(2).flatten(1).mean(1)


@judge("test_l_simple")
def l_simple(k, rng):
    def check(spec, net, betas, x0, t, noise, what, atol=1e-7):
        out = expect_shape(k.l_simple_of(k.make_net(spec), betas, x0, t, noise), (len(x0),),
                           f"l_simple is per example, (B,) ({what})")
        expected = _l_simple(net, NoiseSchedule(betas), x0, t, noise)
        expect_close(out, expected, atol=atol, rtol=1e-5,
                     msg=f"L_simple = mean over the non-batch dimensions of (noise - eps_theta(x_t, t))^2, "
                         f"x_t = q_sample(...) ({what})")
        return out

    # a TimeMLP with the judge's parameters (float64), on 2D points
    for kind in ("linear", "random"):
        T, B = _int(rng, 25, 120), _int(rng, 5, 12)
        spec, net = _network(rng, "TimeMLP", (2, 16, 2, 8))
        check(spec, net, _betas(rng, kind, T), _randn(rng, B, 2), _timesteps(rng, T, B), _randn(rng, B, 2),
              f"TimeMLP, {kind} schedule")
    # a U-Net on images (float32)
    T, B = _int(rng, 10, 60), 3
    spec, net = _network(rng, "UNet", (1, 8, 16), torch.float32)
    check(spec, net, _betas(rng, "cosine", T), 2 * torch.rand(B, 1, 8, 8, generator=rng) - 1,
          _timesteps(rng, T, B), _randn(rng, B, 1, 8, 8, dtype=torch.float32), "UNet on (B, 1, 8, 8) images", 1e-5)
    # a table 'network' on images of other shapes: the mean over every non-batch dimension
    for event in ((1, 8, 8), (3, 4, 6)):
        T, B = _int(rng, 5, 40), _int(rng, 3, 6)
        spec, net = _table(rng, T, event)
        check(spec, net, _betas(rng, "random", T), 2 * torch.rand(B, *event, generator=rng, dtype=F64) - 1,
              _timesteps(rng, T, B), _randn(rng, B, *event), f"images {event}")
    # the exact noise of single-point data gives L_simple = 0
    T, B = _int(rng, 50, 150), 16
    s = NoiseSchedule.linear(T)
    c = _randn(rng, 2)
    spec, net = _oracle(s, c)
    out = check(spec, net, s.betas, c.expand(B, 2).clone(), _timesteps(rng, T, B), _randn(rng, B, 2),
                "the exact noise of single-point data")
    expect_le(as_tensor(out).max(), 1e-8, "L_simple of the exact noise")


def _step(net: torch.nn.Module, s: NoiseSchedule, x_t: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    """The reference step, with dgmlib's p_mean_variance (sigma_t^2 = beta_t; no noise at t = 1)."""
    with torch.no_grad():
        mean, var, _ = diffusion.DDPM(net, s, x_t.shape[1:]).p_mean_variance(
            x_t, torch.full((len(x_t),), t, dtype=torch.long), "beta")
        return mean if t == 1 else mean + var.sqrt() * z


@judge("test_step")
def step(k, rng):
    def check(spec, net, betas, x_t, what, atol=1e-7):
        T = len(betas)
        handle = k.make_net(spec)
        for t in sorted({1, 2, _int(rng, 1, T), T}):
            z = torch.randn(x_t.shape, generator=rng, dtype=x_t.dtype)
            out = k.p_sample_step_of(handle, betas, x_t, t, z)
            expect_close(out, _step(net, NoiseSchedule(betas), x_t, t, z), atol=atol, rtol=1e-5,
                         msg=f"x_(t-1) = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z, "
                             f"sigma_t^2 = beta_t, no noise at t = 1 (t = {t}, {what})")

    for kind in ("linear", "random"):
        T, B = _int(rng, 25, 120), _int(rng, 4, 9)
        spec, net = _network(rng, "TimeMLP", (2, 16, 2, 8))
        check(spec, net, _betas(rng, kind, T), _randn(rng, B, 2), f"TimeMLP, {kind} schedule")
    for event in ((1, 8, 8), (2, 4, 6)):
        T, B = _int(rng, 5, 40), _int(rng, 2, 5)
        spec, net = _table(rng, T, event)
        check(spec, net, _betas(rng, "cosine", T), _randn(rng, B, *event), f"images {event}")
    # with the exact noise of single-point data, T ancestral steps land on the point
    T, B = _int(rng, 50, 200), 300
    s = NoiseSchedule.linear(T)
    c = 1.5 * _randn(rng, 2)
    spec, net = _oracle(s, c)
    handle = k.make_net(spec)
    x = mine = _randn(rng, B, 2)
    for t in range(T, 0, -1):
        z = _randn(rng, B, 2)
        mine = as_tensor(k.p_sample_step_of(handle, s.betas, mine, t, z), "x_(t-1)")
        x = _step(net, s, x, t, z)
    expect_close(mine, x, atol=1e-6, rtol=1e-5, msg=f"{T} steps of your p_sample_step from the judge's noise")
    expect_le((mine.to(F64) - c).abs().max(), 0.05, "T steps with the exact noise of one point land on the point")


# ------------------------------------------------------------------ Part 3: the swiss roll


def _schedule_of(remote, what: str) -> NoiseSchedule:
    """The trained model's schedule, which must be NoiseSchedule.linear(T) with the toy_data cell's T."""
    betas = as_tensor(remote.attr("schedule").attr("betas"), f"{what}.schedule.betas").to(F64)
    expect(betas.dim() == 1 and len(betas) in TOY_T, f"{what}.schedule must be NoiseSchedule.linear(T) with T from "
                                                     f"the given cell (T = {len(betas)})")
    schedule = NoiseSchedule.linear(len(betas))
    expect(bool(torch.allclose(betas, schedule.betas, rtol=1e-6, atol=1e-12)),
           f"{what}.schedule must be NoiseSchedule.linear(T)")
    return schedule


def _load(remote, net: torch.nn.Module, what: str, instructed: str) -> torch.nn.Module:
    """``net`` (the instructed architecture, built here) with the trained parameters of ``remote``, strictly."""
    state = remote.attr("net").state_dict()
    expect(isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
           f"{what}.net must be a trained {instructed}")
    try:
        net.load_state_dict({name: v.float() for name, v in state.items()}, strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        raise JudgeFailure(f"{what}.net's parameters do not fit {instructed} as instructed ({str(err)[:200]})") from None
    expect(all(bool(torch.isfinite(p).all()) for p in net.parameters()), f"{what}.net has NaN or infinite parameters")
    return net.eval()


def _trained_toy(k):
    schedule = _schedule_of(k.model, "model")
    return _load(k.model, diffusion.TimeMLP(2, 128, 3), "model", "diffusion.TimeMLP(2, 128, 3)"), schedule


def _chain(net: torch.nn.Module, s: NoiseSchedule, x: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """Algorithm 2 with the reference step, from x_T = x, with the noise zs[T - t] at step t."""
    for t in range(s.T, 0, -1):
        x = _step(net, s, x, t, zs[s.T - t])
    return x


@judge("test_toy")
def toy(k, rng):
    """The student's sampler with the student's trained network: the kernel runs the student's p_sample_step chain
    (and Denoiser.sample) from noise chosen here; the same trajectory is recomputed here with the reference step and
    the parameters loaded into TimeMLP(2, 128, 3), and its samples are measured against the test points."""
    net, s = _trained_toy(k)
    test = data.load_toy_data("swissroll").test
    n = 2000
    x_T, zs = torch.randn(n, 2, generator=rng), torch.randn(s.T, n, 2, generator=rng)
    reference = _chain(net, s, x_T, zs)
    mine = expect_shape(k.chain(x_T, zs), (n, 2), "the chain of your p_sample_step")
    expect_close(mine, reference, atol=1e-3, rtol=1e-3,
                 msg="T steps of your p_sample_step with your trained network, from the judge's x_T and noise")
    seed = _seed(rng)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 2, generator=g)
    zs = torch.stack([torch.randn(n, 2, generator=g) for _ in range(s.T)])
    mine = expect_shape(k.sample_of(n, seed), (n, 2), "model.sample(n, generator)")
    expect_close(mine, _chain(net, s, x_T, zs), atol=1e-3, rtol=1e-3,
                 msg="model.sample(n, generator): x_T = torch.randn(n, 2, generator=generator), then one "
                     "z = torch.randn(n, 2, generator=generator) per step t = T..1, through your p_sample_step")
    start = _int(rng, 0, len(test) - n)
    expect_le(diffusion.sliced_wasserstein(reference, test[start:start + n]), W2_BOUND,
              "sliced W2 of your samples to 2000 test points")


@judge("test_toy_net")
def toy_net(k, rng):
    """The trained network alone: its parameters in TimeMLP(2, 128, 3), sampled here by dgmlib's DDPM with
    NoiseSchedule.linear(T) and a seed drawn here; the samples are as close to the validation points as to the
    test points (a model fitted to the test points would lie closer to them)."""
    losses = k.val_losses()
    expect(isinstance(losses, list) and len(losses) >= 1, "history = train.fit(model, toy.train, toy.val, ...)")
    net, s = _trained_toy(k)
    samples = diffusion.DDPM(net, s, (2,)).sample(2000, generator=torch.Generator().manual_seed(_seed(rng)))
    toy_data = data.load_toy_data("swissroll")
    start = _int(rng, 0, len(toy_data.test) - 2000)
    distance = expect_le(diffusion.sliced_wasserstein(samples, toy_data.test[start:start + 2000]), W2_BOUND,
                         "sliced W2 of dgmlib's sampler with your network to 2000 test points")
    val_distance = diffusion.sliced_wasserstein(samples, toy_data.val[:2000])
    expect(distance >= val_distance - 0.05, f"the samples lie far closer to the test points ({distance:.3f}) than to "
                                            f"the validation points ({val_distance:.3f}): train on toy.train only")


# ------------------------------------------------------------------ Part 4: the digits


@judge("test_digits")
def digits(k, rng):
    """L_simple of the trained network (its parameters in UNet(1, base=BASE)) on the 447 test digits, 4 draws of
    (t, noise) each from the secret seed: at most 0.35, at most half that of an untrained UNet(1, base=8), and not
    far below the same measure on the 350 validation digits."""
    losses = k.val_losses()
    expect(isinstance(losses, list) and len(losses) >= 1, "digit_history = train.fit(digit_model, images.train, "
                                                          "images.val, ...)")
    s = _schedule_of(k.digit_model, "digit_model")
    state = k.digit_model.attr("net").state_dict()
    base = state.get("conv_in.weight").shape[0] if isinstance(state, dict) and isinstance(
        state.get("conv_in.weight"), torch.Tensor) else 0
    expect(base >= 8 and base % 8 == 0, "digit_model.net must be diffusion.UNet(images.shape[0], base=BASE)")
    net = _load(k.digit_model, diffusion.UNet(1, base=base), "digit_model", f"diffusion.UNet(1, base={base})")

    def measure(model: torch.nn.Module, levels: torch.Tensor, draws: int = 4) -> float:
        g = torch.Generator().manual_seed(seed)
        x0 = diffusion.levels_to_unit(levels, 17).repeat(draws, 1, 1, 1)
        t = torch.randint(1, s.T + 1, (len(x0),), generator=g)
        return _l_simple(model, s, x0, t, torch.randn(x0.shape, generator=g)).mean().item()

    seed = _seed(rng)
    test_loss = expect_le(measure(net, data.load_digits("test")), DIGITS_BOUND,
                          "L_simple of your trained network on the test digits")
    with torch.random.fork_rng():
        torch.manual_seed(_seed(rng))
        untrained = diffusion.UNet(1, base=8).eval()
    expect_le(test_loss, 0.5 * measure(untrained, data.load_digits("test")),
              "L_simple on the test digits must be at most half that of an untrained UNet(1, base=8)")
    val_loss = measure(net, data.load_digits("val"))
    expect(test_loss >= val_loss - 0.05, f"L_simple on the test digits ({test_loss:.3f}) lies far below that on the "
                                         f"validation digits ({val_loss:.3f}): train on images.train only")
    expect(math.isfinite(test_loss), "a finite L_simple")


# ------------------------------------------------------------------ Parts 5-8: lecture 11, no training
#
# The reference is dgmlib.score (the full library, here): denoising_score_matching_loss, annealed_langevin_step,
# VDM.diffusion_loss (with the judge's schedule and its exact derivative) and reverse_drift (the probability-flow
# velocity); the PF-ODE's log-likelihood is compared with the exact Gaussian log density. A score or noise model
# and a schedule cannot cross the wire: the test cells build them in the kernel from the judge's description, a
# ``Field`` (the same class as below) and ``schedule(spec)``; the SDE from its (beta_min, beta_max).


class Field(torch.nn.Module):
    """The test cells' ``Field``: f(x, s) = a tanh(x W^T + s c + b) + d x on the flattened x (B, D), s (B,)."""

    def __init__(self, W, b, c, a, d) -> None:
        super().__init__()
        self.W, self.b, self.c, self.a, self.d = W, b, c, a, d

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        h = torch.tanh(flat @ self.W.T.to(flat) + s.to(flat)[:, None] * self.c.to(flat) + self.b.to(flat))
        return (self.a * h + self.d * flat).reshape(x.shape)


def _field(rng: torch.Generator, dim: int) -> tuple[dict, Field]:
    """A random field on D = dim flattened dimensions, and its description for the kernel's ``Field(**spec)``."""
    spec = {"W": _randn(rng, dim, dim) / math.sqrt(dim), "b": 0.3 * _randn(rng, dim), "c": _randn(rng, dim),
            "a": _uniform(rng, 0.5, 2.0) * (1 if _int(rng, 0, 1) else -1), "d": _uniform(rng, -1.0, 1.0)}
    return spec, Field(**spec)


def _log_uniform(rng: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    u = torch.rand(tuple(shape), generator=rng, dtype=F64)
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * u)


@judge("test_dsm")
def dsm(k, rng):
    """Against dgmlib.score.denoising_score_matching_loss with random nonlinear score models (which see sigma), noise
    levels over three orders of magnitude (one per example), 2D points and images of several shapes, float64 and
    float32."""
    for event in ((2,), (_int(rng, 3, 6),), (1, 4, 4), (2, 3, _int(rng, 2, 5))):
        dim = math.prod(event)
        for dtype in (F64, torch.float32):
            B = _int(rng, 3, 8)
            spec, field = _field(rng, dim)
            x, noise = _randn(rng, B, *event), _randn(rng, B, *event)
            sigma = _log_uniform(rng, 0.01, 10.0, B)
            out = k.dsm_loss_of(spec, x.to(dtype), sigma.to(dtype), noise.to(dtype))
            out = expect_shape(out, (B,), f"dsm_loss is per example, (B,) (x of shape {(B, *event)})")
            with torch.no_grad():
                expected = score_lib.denoising_score_matching_loss(field, x.to(dtype).to(F64), sigma.to(dtype).to(F64),
                                                                   noise.to(dtype).to(F64))
            tol = dict(atol=1e-9, rtol=1e-7) if dtype == F64 else dict(atol=1e-4, rtol=1e-4)
            expect_close(out, expected, **tol, msg=f"the loss 1/2 |sigma s(x + sigma eps, sigma) + eps|^2, summed over "
                                                   f"the non-batch dimensions (x of shape {(B, *event)}, {dtype})")


def _gaussian_score(mean: torch.Tensor, var: float):
    """The score of N(mean, (var + sigma^2) I) at level sigma: the data N(mean, var I) smoothed by the noise."""
    return lambda x, sigma: -(x - mean) / (var + sigma ** 2)


@judge("test_langevin")
def langevin(k, rng):
    """Against dgmlib.score.annealed_langevin_step at levels sigma_i from sigma_L to 100 sigma_L (and at sigma_L), base
    step sizes from 1e-6 to 1e-2, batches of points and images, float64 and float32; then a whole annealed chain of
    the student's steps (8 levels, 25 steps each, with the exact score of Gaussian data and the judge's noise) against
    the reference's chain."""
    for event in ((2,), (_int(rng, 1, 5),), (1, 4, 4)):
        for dtype in (F64, torch.float32):
            B = _int(rng, 2, 7)
            sigma_min = float(_log_uniform(rng, 0.005, 0.2))
            for sigma in (sigma_min, sigma_min * float(_log_uniform(rng, 1.0, 100.0))):
                epsilon = float(_log_uniform(rng, 1e-6, 1e-2))
                x, score, noise = (_randn(rng, B, *event).to(dtype) for _ in range(3))
                out = k.annealed_langevin_step(score, x, sigma, sigma_min, epsilon, noise)
                expected = score_lib.annealed_langevin_step(score.to(F64), x.to(F64), sigma, sigma_min, epsilon,
                                                            noise.to(F64))
                tol = dict(atol=1e-9, rtol=1e-8) if dtype == F64 else dict(atol=1e-5, rtol=1e-5)
                expect_close(out, expected, **tol,
                             msg=f"x + alpha_i / 2 score + sqrt(alpha_i) noise, alpha_i = epsilon sigma_i^2 / sigma_L^2 "
                                 f"(sigma_i = {sigma:.3g}, sigma_L = {sigma_min:.3g}, epsilon = {epsilon:.2g}, {dtype})")
    # a whole chain through the student's steps, from the judge's start and noise
    D, B = _int(rng, 1, 3), 400
    mean, var = _randn(rng, D), _uniform(rng, 0.2, 2.0)
    sigmas = score_lib.geometric_sigmas(_uniform(rng, 1.0, 3.0), _uniform(rng, 0.01, 0.05), 8).tolist()
    epsilon = float(_log_uniform(rng, 1e-5, 1e-4))
    score = _gaussian_score(mean, var)
    x = mine = 3 * _randn(rng, B, D)
    for sigma in sigmas:
        for _ in range(25):
            noise = _randn(rng, B, D)
            mine = as_tensor(k.annealed_langevin_step(score(mine, sigma), mine, sigma, sigmas[-1], epsilon, noise),
                             "annealed_langevin_step's x").to(F64)
            x = score_lib.annealed_langevin_step(score(x, sigma), x, sigma, sigmas[-1], epsilon, noise)
    expect_close(mine, x, atol=1e-7, rtol=1e-6, msg="8 levels of 25 annealed Langevin steps of yours, from the judge's "
                                                   "start and noise, with the exact score of Gaussian data")


def _schedule_spec(rng: torch.Generator, kind: str) -> dict:
    """A monotone gamma: linear, g0 + (g1 - g0) expm1(k t) / expm1(k), or g0 + (g1 - g0) (t + a sin(2 pi t) / 2 pi)."""
    g0 = _uniform(rng, -14.0, -4.0)
    spec = {"kind": kind, "g0": g0, "g1": g0 + _uniform(rng, 6.0, 20.0)}
    if kind == "exp":
        spec["k"] = _uniform(rng, 0.5, 4.0) * (1 if _int(rng, 0, 1) else -1)
    elif kind == "sine":
        spec["a"] = _uniform(rng, -0.9, 0.9)
    return spec


class _Gamma(torch.nn.Module):
    """The judge's schedule for dgmlib's VDM: gamma(t) and its exact derivative, in closed form."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_and_derivative(t)[0]

    def gamma_and_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        g0, span = s["g0"], s["g1"] - s["g0"]
        if s["kind"] == "linear":
            return g0 + span * t, torch.full_like(t, span)
        if s["kind"] == "exp":
            return g0 + span * torch.expm1(s["k"] * t) / math.expm1(s["k"]), span * s["k"] * torch.exp(s["k"] * t) / math.expm1(s["k"])
        two_pi = 2 * math.pi
        return g0 + span * (t + s["a"] * torch.sin(two_pi * t) / two_pi), span * (1 + s["a"] * torch.cos(two_pi * t))


class _EpsNet(torch.nn.Module):
    """The field as dgmlib's VDM calls its network: ``net(z, 1000 (gamma - lo) / (hi - lo))`` gives gamma back."""

    def __init__(self, field: Field, lo: float, hi: float) -> None:
        super().__init__()
        self.field, self.lo, self.hi = field, lo, hi

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.field(z, self.lo + c * (self.hi - self.lo) / 1000.0)


def _vdm_loss(field: Field, spec: dict, x: torch.Tensor, t: torch.Tensor, seed: int) -> torch.Tensor:
    """dgmlib.score.VDM.diffusion_loss with the judge's field and schedule, its noise drawn from ``seed``."""
    vdm = score_lib.VDM(_EpsNet(field, -13.3, 5.0), x.shape[1:], None, schedule="fixed", gamma_min=-13.3,
                        gamma_max=5.0)
    vdm.gamma = _Gamma(spec)
    with torch.no_grad():
        return vdm.diffusion_loss(x, t, generator=torch.Generator().manual_seed(seed))


@judge("test_vdm")
def vdm(k, rng):
    """Against dgmlib.score.VDM.diffusion_loss (the judge's schedule with its exact derivative, the student's gamma'
    by autograd) for linear, exponential and sine-modulated monotone schedules with random endpoints, random noise
    models that see gamma_t, times in [0, 1] (0 and 1 among them), 2D points and images, float64 and float32."""
    cases = [("linear", (2,)), ("exp", (_int(rng, 2, 5),)), ("sine", (1, 4, 4)), ("exp", (2, 3, 3)), ("sine", (3,))]
    for kind, event in cases:
        for dtype in (F64, torch.float32):
            B = _int(rng, 3, 8)
            spec = _schedule_spec(rng, kind)
            eps_spec, field = _field(rng, math.prod(event))
            eps_spec["c"] = eps_spec["c"] / 5  # gamma ranges over tens: keep the field's tanh out of saturation
            field.c = eps_spec["c"]
            x = _randn(rng, B, *event)
            t = torch.rand(B, generator=rng, dtype=F64)
            t[0], t[-1] = 0.0, 1.0
            seed = _seed(rng)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
            # dgmlib draws the same noise from the seed (float64); the student gets it in the test's dtype
            expected = _vdm_loss(field, spec, x.to(dtype).to(F64), t.to(dtype).to(F64), seed)
            out = expect_shape(k.vdm_loss_of(eps_spec, spec, x.to(dtype), t.to(dtype), noise.to(dtype)), (B,),
                               f"vdm_diffusion_loss is per example, (B,) (x of shape {(B, *event)})")
            tol = dict(atol=1e-8, rtol=1e-7) if dtype == F64 else dict(atol=1e-3, rtol=1e-4)
            expect_close(out, expected, **tol,
                         msg=f"1/2 gamma'(t) |eps - eps_hat(z_t, gamma_t)|^2 with gamma' by autograd, z_t = "
                             f"sqrt(sigmoid(-gamma_t)) x + sqrt(sigmoid(gamma_t)) eps ({kind} gamma, x of shape "
                             f"{(B, *event)}, {dtype})")


def _gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, var I) per row of x (B, D)."""
    var = torch.as_tensor(var, dtype=F64)
    return -0.5 * (x - mean).pow(2).sum(1) / var - 0.5 * x.shape[1] * torch.log(2 * math.pi * var)


@judge("test_pf_ode")
def pf_ode(k, rng):
    """For Gaussian data N(mu, s^2 I) (D from 1 to 5, s^2 well below or above 1, so that the divergence matters) under
    VP SDEs of the judge's betas: the velocity against dgmlib.score.reverse_drift(probability_flow=True) with the
    exact score of p_t and its divergence against autograd's trace of the same, at t = 0, 1 and between; then the
    log-likelihood from the student's ODE against the exact log N(x; mu, s^2 I), at points near and far from mu."""
    for D in (1, 2, _int(rng, 3, 5)):
        mu = 1.5 * _randn(rng, D)
        s2 = _uniform(rng, 0.05, 0.5) if _int(rng, 0, 1) else _uniform(rng, 2.0, 4.0)
        betas = [_uniform(rng, 0.05, 0.5), _uniform(rng, 3.0, 12.0)]
        sde = score_lib.VPSDE(*betas)

        def exact_score(x, t):
            alpha, sigma = sde.alpha_sigma(t)
            return -(x - alpha[:, None] * mu) / (alpha ** 2 * s2 + sigma ** 2)[:, None]

        B = _int(rng, 3, 7)
        for t in (0.0, _uniform(rng, 0.0, 1.0), 1.0):
            x = mu + 2 * _randn(rng, B, D)
            out = k.pf_dynamics_of(mu, s2, betas, torch.tensor(t, dtype=F64), x)
            expect(isinstance(out, (tuple, list)) and len(out) == 2, "pf_dynamics returns the pair (velocity, divergence)")
            times = torch.full((B,), t, dtype=F64)
            xg = x.clone().requires_grad_(True)
            velocity = score_lib.reverse_drift(sde, exact_score, xg, times, probability_flow=True)
            divergence = sum(torch.autograd.grad(velocity[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(D))
            expect_close(out[0], velocity.detach(), atol=1e-9, rtol=1e-7,
                         msg=f"the velocity f(t) x - g(t)^2 / 2 score(x, t) with the exact score of p_t (t = {t:.3f}, D = {D})")
            expect_close(expect_shape(out[1], (B,), "the divergence is (B,)"), divergence, atol=1e-9, rtol=1e-7,
                         msg=f"the divergence of the velocity (t = {t:.3f}, D = {D})")
        x = torch.cat([mu + math.sqrt(s2) * _randn(rng, B, D), mu + 3 * _randn(rng, 2, D)])
        log_p = expect_shape(k.pf_ode_log_prob_of(mu, s2, x, betas), (B + 2,), "pf_ode_log_prob is (B,)")
        expect_close(log_p, _gaussian_log_density(x, mu, s2), atol=2e-4, rtol=1e-5,
                     msg=f"log p_0(x) from the probability-flow ODE against the exact log N(x; mu, s^2 I) (D = {D}, "
                         f"s^2 = {s2:.3g}, betas {betas[0]:.3g} to {betas[1]:.3g})")
