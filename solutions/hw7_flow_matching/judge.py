"""The judges of hw7_flow_matching: every test cell's points, decided in the grader (``dgmlib.grading.judge``).

Each judge draws its inputs from ``rng`` (a secret seed per submission): shapes, dtypes, times (0 and 1 among them),
σ_min (0, tiny and large), fields, step counts, end times, guidance scales, labels, seeds and network parameters. It
calls the student's code through the cell's probe and compares with the reference, here in the grader: the full
``dgmlib.flow_matching`` (``OTPath``, ``cfm_loss``, ``euler_sample``, ``heun_sample``, ``straightness``,
``guided_velocity``, ``FlowMatching``) and closed forms. A field cannot cross the wire, so the judges send its
description (a ``spec``) and the notebook's read-only ``fields`` cell builds it in the kernel (``make_field``,
``make_cond_field``); this file builds the same fields here (``_make_field``, ``_make_cond_field``).

- Part 1: ``x_t`` and ``u_t`` against ``OTPath(σ_min)``, and ``u_t`` as the time derivative of the student's ``x_t``.
- Part 2: the loss against ``cfm_loss``; zero for the exact field of single-point data; its gradient (the test cell's
  ``cfm_grads``) against the reference's on the same draws and against the gradient of the marginal flow-matching
  loss for Gaussian data, whose field ``gaussian_marginal_velocity`` gives in closed form (within 6 standard errors,
  estimated here from 100 batches).
- Parts 3-4: the samplers against dgmlib's on nonlinear fields (points in float64, images in float32) and on
  dx/dt = λx + β cos(ωt); and their order, measured here from the student's outputs: the ratio of the errors against
  the closed-form solution with N and 2N steps must be near 2 (Euler) or 4 (Heun).
- Part 5: ``guided_velocity`` against dgmlib's at w = 0, 1, inside and beyond; the guided field of a table field and
  of a class-conditional ``UNet`` with the judge's parameters.
- Part 6: the reflow pairs replayed (the noise from the judge's seed, then dgmlib's Heun flow of that same noise), the
  loss on given pairs against ``cfm_loss`` with σ_min = 0, zero for the straight field of affine pairs, and the
  straightness against ``dgmlib.flow_matching.straightness``.
- Part 7, measured here: ``cond_model.net``'s parameters are loaded strictly into ``UNet(1, base, num_classes=10)``.
  ``test_cond_sampler`` replays the student's ``cond_model.sample`` with the reference guided Heun sampler on the
  judge's labels, scales, steps and seeds, and classifies the reference's samples at w = 2 with
  ``dgmlib.vq.digit_classifier`` (at least 80 %). ``test_cond_digits`` samples the network with dgmlib's
  ``FlowMatching`` (Heun, 10 steps) from a secret seed: at least 80 % at w = 2 and 60 % at w = 1; its CFM loss on the
  test digits (4 draws per image from a secret seed) at most 40, at most half that of an untrained U-Net, and not
  more than 3 below the same loss on the validation digits. The student's methods are never asked for a number that
  earns points.

Measured in fast mode (the solution's training, 20 epochs of UNet(1, base=16, num_classes=10), at 40 seeds of these
measures; training seeds 1, 2 and 3 alike): guided accuracy 99-100 % at w = 2, 84-96 % at w = 1 (about 10 % at w = 0,
the unconditional field, and for an untrained network), CFM loss on the test digits 29-31, 0.5 below the validation
digits' on average and never more than 1.5 (an untrained UNet(1, base=8, num_classes=10): 113-118; the same training
cut to 5 epochs about 45, to 10 epochs about 36).

This file is the instructor's: it is never released, and the student's kernel never sees it.
"""

from __future__ import annotations

import math

import torch

from dgmlib import data, diffusion, vq
from dgmlib import flow_matching as fm
from dgmlib.grading.judge import (
    JudgeFailure,
    as_tensor,
    expect,
    expect_close,
    expect_le,
    expect_shape,
    judge,
    randomise,
)
from dgmlib.grading.judge import secret_float as _uniform
from dgmlib.grading.judge import secret_int as _int
from dgmlib.grading.judge import secret_seed as _seed

F64 = torch.float64
F32 = torch.float32
SIGMA_MIN = 0.01
"""The σ_min of the cond_data cell: the path the trained model's CFM loss is measured on."""
NUM_CLASSES = 10
GUIDED_ACCURACY = 0.8
"""Share of 200 guided samples (w = 2) the digit classifier reads as their label; the solution scores 99-100 %."""
CONDITIONAL_ACCURACY = 0.6
"""The same at w = 1 (the conditional field alone); the solution scores 84-96 %, an unconditional field 10 %."""
CFM_BOUND = 40.0
"""CFM loss on the test digits; the solution 29-31 in fast mode, an untrained U-Net 113-118."""
VAL_MARGIN = 3.0
"""A test loss more than this below the validation loss means the model saw the test digits."""
ORDER = {"euler": (1, 1.8, 2.2), "heun": (2, 3.6, 4.4)}
"""Each sampler's order and the range its error ratio (N steps against 2N) must fall in."""


# ------------------------------------------------------------------ inputs drawn from the secret seed


def _randn(rng: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=rng, dtype=dtype)


def _times(rng: torch.Generator, B: int) -> torch.Tensor:
    """(B,) float64 times in [0, 1], with 0 and 1 among them (B >= 2), in no particular order."""
    t = torch.rand(B, generator=rng, dtype=F64)
    t[0], t[-1] = 0.0, 1.0
    return t[torch.randperm(B, generator=rng)]


def _sigma_min(rng: torch.Generator, kind: str) -> float:
    """σ_min: 0 (rectified flow), tiny (1e-4 to 1e-2, Lipman et al.'s range) or large (0.05 to 0.5)."""
    if kind == "zero":
        return 0.0
    if kind == "tiny":
        return math.exp(_uniform(rng, math.log(1e-4), math.log(1e-2)))
    return _uniform(rng, 0.05, 0.5)


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-9, rtol=1e-8) if dtype == F64 else dict(atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ the fields cell's fields, built here too


class Field(torch.nn.Module):
    """The fields cell's ``Field``: v(x, t) = a tanh(x W^T + t c + b) + d x on the flattened x (B, D), t (B,)."""

    def __init__(self, W, b, c, a, d) -> None:
        super().__init__()
        self.W, self.b, self.c, self.a, self.d = W, b, c, a, d

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x, t), shaped like x."""
        flat = x.flatten(1)
        h = torch.tanh(flat @ self.W.T.to(flat) + t.to(flat)[:, None] * self.c.to(flat) + self.b.to(flat))
        return (self.a * h + self.d * flat).reshape(x.shape)


def _make_field(spec: dict):
    """The field the kernel's ``make_field(spec)`` builds: "tanh", "linear", "point" or "affine"."""
    kind = spec["kind"]
    if kind == "tanh":
        return Field(spec["W"], spec["b"], spec["c"], spec["a"], spec["d"])
    if kind == "linear":
        lam, beta, omega = spec["lam"], spec["beta"], spec["omega"]
        return lambda x, t: lam * x + beta * torch.cos(omega * t.to(x)).reshape((-1,) + (1,) * (x.dim() - 1))
    if kind == "point":
        c, k = spec["c"], 1 - spec["sigma_min"]
        return lambda x, t: c.to(x) - k * (x - t.to(x)[:, None] * c.to(x)) / (1 - k * t.to(x)[:, None])
    if kind == "affine":
        m, s = spec["m"], spec["s"]
        return lambda x, t: ((s.to(x) - 1) * (x - t.to(x)[:, None] * m.to(x)) / (1 + t.to(x)[:, None] * (s.to(x) - 1))
                             + m.to(x))
    raise ValueError(kind)


def _tanh_field(rng: torch.Generator, dim: int) -> tuple[dict, Field]:
    """A random nonlinear field on D = dim flattened coordinates that sees t, and its description."""
    spec = {"kind": "tanh", "W": _randn(rng, dim, dim) / math.sqrt(dim), "b": 0.3 * _randn(rng, dim),
            "c": _randn(rng, dim), "a": _uniform(rng, 0.5, 2.0) * (1 if _int(rng, 0, 1) else -1),
            "d": _uniform(rng, -1.0, 1.0)}
    return spec, _make_field(spec)


def _linear_spec(rng: torch.Generator) -> dict:
    """dx/dt = λ x + β cos(ω t) with |λ| in [0.5, 2] (either sign), β in [0.5, 2], ω in [1, 6]."""
    return {"kind": "linear", "lam": _uniform(rng, 0.5, 2.0) * (1 if _int(rng, 0, 1) else -1),
            "beta": _uniform(rng, 0.5, 2.0), "omega": _uniform(rng, 1.0, 6.0)}


def _linear_solution(spec: dict, x0: torch.Tensor, t_end: float) -> torch.Tensor:
    """x(t_end) of dx/dt = λ x + β cos(ω t), x(0) = x0, in closed form (float64)."""
    lam, beta, omega = spec["lam"], spec["beta"], spec["omega"]
    forced = (omega * math.sin(omega * t_end) - lam * math.cos(omega * t_end) + lam * math.exp(lam * t_end)) \
        / (lam ** 2 + omega ** 2)
    return math.exp(lam * t_end) * x0.to(F64) + beta * forced


class TableField:
    """The fields cell's "table" field: scale[l] x + shift[l] + t drift[l], the row l = 10 for the empty label."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        rows = torch.full((len(x),), NUM_CLASSES, dtype=torch.long) if labels is None else labels.long()
        s = self.spec
        return s["scale"][rows].to(x)[:, None] * x + s["shift"][rows].to(x) + t.to(x)[:, None] * s["drift"][rows].to(x)


def _table(rng: torch.Generator, dim: int) -> tuple[dict, TableField]:
    spec = {"kind": "table", "scale": _randn(rng, NUM_CLASSES + 1), "shift": _randn(rng, NUM_CLASSES + 1, dim),
            "drift": _randn(rng, NUM_CLASSES + 1, dim)}
    return spec, TableField(spec)


def _cond_unet(rng: torch.Generator) -> tuple[dict, object]:
    """A class-conditional UNet(1, 8, 16, num_classes=10) with random parameters (float32), called net(x, 999 t, c)."""
    net = randomise(diffusion.UNet(1, 8, 16, num_classes=NUM_CLASSES), rng, 0.3).float().eval()
    state = {name: v.detach().clone() for name, v in net.state_dict().items()}
    return {"kind": "unet", "args": [1, 8, 16], "state": state}, lambda x, t, labels: net(x, 999 * t, labels)


# ------------------------------------------------------------------ Part 1: the OT path


@judge("test_ot_path")
def ot_path(k, rng):
    """x_t and u_t against dgmlib's OTPath(σ_min) for σ_min 0, tiny and large, times 0 and 1 among others, points and
    images, float64 and float32; u_t as the central difference in t of the student's own x_t."""
    cases = [((2,), F64, "large"), ((2,), F32, "zero"), ((_int(rng, 1, 6),), F64, "tiny"), ((1, 8, 8), F32, "large"),
             ((1, 8, 8), F64, "zero"), ((2, 3, _int(rng, 2, 5)), F64, "large"), ((3,), F32, "tiny")]
    for event, dtype, kind in cases:
        B = _int(rng, 3, 8)
        sigma_min = _sigma_min(rng, kind)
        x0, x1, t = (_randn(rng, B, *event).to(dtype), _randn(rng, B, *event).to(dtype), _times(rng, B).to(dtype))
        out = k.ot_path(x0, x1, t, sigma_min)
        expect(isinstance(out, (tuple, list)) and len(out) == 2, "ot_path returns the pair (x_t, u_t)")
        x_t = expect_shape(out[0], (B, *event), "x_t is shaped like x1")
        u_t = expect_shape(out[1], (B, *event), "u_t is shaped like x1")
        path = fm.OTPath(sigma_min)
        a, b, s = x0.to(F64), x1.to(F64), t.to(F64)
        what = f"sigma_min = {sigma_min:.3g}, x of shape {(B, *event)}, {dtype}"
        expect_close(x_t, path.interpolate(a, b, s), **_tol(dtype),
                     msg=f"x_t = t x1 + (1 - (1 - sigma_min) t) x0 ({what})")
        expect_close(u_t, path.conditional_velocity(a, b, s), **_tol(dtype),
                     msg=f"u_t = x1 - (1 - sigma_min) x0 ({what})")
    # u_t is d x_t / dt of the student's own x_t (x_t is linear in t: the central difference is exact up to rounding)
    B, sigma_min = _int(rng, 3, 6), _sigma_min(rng, "large")
    x0, x1, t, h = _randn(rng, B, 3), _randn(rng, B, 3), 0.1 + 0.8 * torch.rand(B, generator=rng, dtype=F64), 1e-6
    plus, minus = (as_tensor(k.ot_path(x0, x1, t + d, sigma_min)[0], "x_t").to(F64) for d in (h, -h))
    expect_close(k.ot_path(x0, x1, t, sigma_min)[1], (plus - minus) / (2 * h), atol=1e-6, rtol=1e-6,
                 msg="u_t is the time derivative of x_t")


# ------------------------------------------------------------------ Part 2: the CFM loss


def _grads(loss_fn, spec: dict) -> list[torch.Tensor]:
    """The gradient of ``loss_fn(field).mean()`` with respect to the W, b, c of the field ``spec`` describes."""
    params = [spec[name].clone().requires_grad_(True) for name in ("W", "b", "c")]
    return list(torch.autograd.grad(loss_fn(Field(*params, spec["a"], spec["d"])).mean(), params))


@judge("test_cfm")
def cfm(k, rng):
    """The loss against dgmlib's cfm_loss (random nonlinear fields that see t, σ_min 0, tiny and large, shapes, float64
    and float32); 0 for the exact field of single-point data; the gradient of the mean loss against the reference's
    on the same draws, and against the marginal flow-matching gradient for Gaussian data (closed-form field)."""
    cases = [((2,), F64, "large"), ((2,), F32, "tiny"), ((_int(rng, 3, 6),), F64, "zero"), ((1, 4, 4), F32, "large"),
             ((2, 3, _int(rng, 2, 4)), F64, "large")]
    for event, dtype, kind in cases:
        B = _int(rng, 3, 8)
        spec, field = _tanh_field(rng, math.prod(event))
        sigma_min = _sigma_min(rng, kind)
        x0, x1, t = (_randn(rng, B, *event).to(dtype), _randn(rng, B, *event).to(dtype), _times(rng, B).to(dtype))
        out = expect_shape(k.cfm_loss_of(spec, x0, x1, t, sigma_min), (B,),
                           f"cfm_loss is per example, (B,) (x of shape {(B, *event)})")
        with torch.no_grad():
            expected = fm.cfm_loss(field, x0.to(F64), x1.to(F64), t.to(F64), fm.OTPath(sigma_min))
        expect_close(out, expected, **_tol(dtype),
                     msg=f"the sum over the non-batch dimensions of (v(x_t, t) - u_t)^2, x_t and u_t of the OT path "
                         f"(sigma_min = {sigma_min:.3g}, x of shape {(B, *event)}, {dtype})")
    # every data point at c: the exact marginal field has loss 0
    D, B = _int(rng, 1, 4), _int(rng, 5, 10)
    c, sigma_min = 2 * _randn(rng, D), _sigma_min(rng, "large")
    out = as_tensor(k.cfm_loss_of({"kind": "point", "c": c, "sigma_min": sigma_min}, _randn(rng, B, D),
                                  c.expand(B, D).clone(), _times(rng, B), sigma_min), "cfm_loss").to(F64)
    expect_le(out.abs().max(), 1e-9, "the CFM loss of the exact field of single-point data")
    # the gradient: the reference's on the same draws, and the marginal FM gradient of Gaussian data
    D, n, batches = _int(rng, 2, 3), 40_000, 100
    m, s = _randn(rng, D), _uniform(rng, 0.3, 0.8) + 1.2 * torch.rand(D, generator=rng, dtype=F64)
    sigma_min = _sigma_min(rng, "large")
    spec, _ = _tanh_field(rng, D)
    x0, x1, t = _randn(rng, n, D), m + s * _randn(rng, n, D), torch.rand(n, generator=rng, dtype=F64)
    got = k.cfm_grad_of(spec, x0, x1, t, sigma_min)
    expect(isinstance(got, (list, tuple)) and len(got) == 3, "cfm_grads returns [dW, db, dc]")
    path = fm.OTPath(sigma_min)

    def cfm_of(part):
        return lambda field: fm.cfm_loss(field, x0[part], x1[part], t[part], path)

    def fm_of(part):
        def loss(field):
            x_t = path.interpolate(x0[part], x1[part], t[part])
            target = fm.gaussian_marginal_velocity(path, x_t, t[part], m, s)
            return (field(x_t, t[part]) - target).pow(2).sum(1)
        return loss

    everything = slice(None)
    for mine, reference, name in zip(got, _grads(cfm_of(everything), spec), ("W", "b", "c")):
        expect_close(mine, reference, atol=1e-9, rtol=1e-7,
                     msg=f"the gradient of the mean CFM loss with respect to the field's {name}")
    marginal = torch.cat([g.flatten() for g in _grads(fm_of(everything), spec)])
    size = n // batches
    differences = torch.stack([
        torch.cat([(a - b).flatten() for a, b in zip(_grads(cfm_of(slice(i * size, (i + 1) * size)), spec),
                                                     _grads(fm_of(slice(i * size, (i + 1) * size)), spec))])
        for i in range(batches)])
    standard_error = differences.std(0) / math.sqrt(batches)
    mine = torch.cat([as_tensor(g, "the gradient").to(F64).flatten() for g in got])
    worst = float(((mine - marginal).abs() / (standard_error + 1e-12)).max())
    expect(worst <= 6.0, f"the CFM gradient must equal the gradient of the marginal flow-matching loss (Gaussian data, "
                         f"closed-form marginal field): it is {worst:.1f} standard errors away")


# ------------------------------------------------------------------ Parts 3-4: the samplers


def _sampler(k, rng, name: str, reference) -> None:
    """A sampler against dgmlib's on nonlinear and linear fields, then its order from its errors with N and 2N steps."""
    call = getattr(k, f"{name}_of")
    cases = [("tanh", (2,), F64), ("tanh", (1, 4, 4), F32), ("linear", (3,), F64), ("tanh", (_int(rng, 3, 6),), F64),
             ("linear", (2, 2, 2), F32)]
    for kind, event, dtype in cases:
        B, n = _int(rng, 3, 8), _int(rng, 1, 12)
        t_end = 1.0 if _int(rng, 0, 1) else _uniform(rng, 0.3, 1.0)
        spec, field = _tanh_field(rng, math.prod(event)) if kind == "tanh" else (None, None)
        if kind == "linear":
            spec = _linear_spec(rng)
            field = _make_field(spec)
        x0 = _randn(rng, B, *event).to(dtype)
        out = expect_shape(call(spec, x0, n, t_end), (B, *event), f"{name}_sample returns x_N, shaped like x0")
        with torch.no_grad():
            expected = reference(field, x0, n, t_end)
        # float64: room for times made in float32 (rounded by 1e-7), which the instructions advise against
        tol = dict(atol=2e-6, rtol=1e-6) if dtype == F64 else dict(atol=1e-5, rtol=1e-4)
        step = ("x_(k+1) = x_k + h v(x_k, t_k)" if name == "euler" else
                "x_(k+1) = x_k + h/2 (v(x_k, t_k) + v(x_k + h v(x_k, t_k), t_(k+1)))")
        expect_close(out, expected, **tol, msg=f"{step}, h = t_end / N, t_k = k h ({kind} field, N = {n}, "
                                               f"t_end = {t_end:.3g}, x of shape {(B, *event)}, {dtype})")
    order, low, high = ORDER[name]
    spec, N, t_end = _linear_spec(rng), _int(rng, 24, 48), 1.0 if _int(rng, 0, 1) else _uniform(rng, 0.5, 1.0)
    x0 = _randn(rng, 32, 3)
    exact = _linear_solution(spec, x0, t_end)
    errors = [float((as_tensor(call(spec, x0, steps, t_end), f"{name}_sample").to(F64) - exact).norm())
              for steps in (N, 2 * N)]
    ratio = errors[0] / errors[1] if errors[1] > 0 else math.inf
    expect(low <= ratio <= high, f"halving the step must divide the error by {2 ** order} (order {order}): the error "
                                 f"with {N} steps is {ratio:.2f} times that with {2 * N} (lambda = {spec['lam']:.2f}, "
                                 f"omega = {spec['omega']:.2f})")


@judge("test_euler")
def euler(k, rng):
    """Euler's sampler against dgmlib.flow_matching.euler_sample, and its order 1 (error ratio near 2)."""
    _sampler(k, rng, "euler", fm.euler_sample)


@judge("test_heun")
def heun(k, rng):
    """Heun's sampler against dgmlib.flow_matching.heun_sample, and its order 2 (error ratio near 4)."""
    _sampler(k, rng, "heun", fm.heun_sample)


# ------------------------------------------------------------------ Part 5: guidance


@judge("test_guidance")
def guidance(k, rng):
    """guided_velocity against dgmlib's at w = 0 (the unconditional field), w = 1 (the conditional one), w inside and
    beyond (negative too), for points and images in float64 and float32; the guided field of a table field and of a
    class-conditional UNet with the judge's parameters, at the judge's labels, points, times and scales."""
    shapes = [(_int(rng, 2, 6), 2), (_int(rng, 1, 4), 1, 8, 8), (3, 2, 3, _int(rng, 2, 5))]
    for i, shape in enumerate(shapes):
        for w in (0.0, 1.0, _uniform(rng, -1.0, 5.0), _uniform(rng, 5.0, 10.0)):
            dtype = F64 if (i + int(w)) % 2 == 0 else F32
            v_cond, v_uncond = _randn(rng, *shape).to(dtype), _randn(rng, *shape).to(dtype)
            out = k.guided_velocity(v_cond, v_uncond, w)
            expect_close(out, fm.guided_velocity(v_cond.to(F64), v_uncond.to(F64), w), **_tol(dtype),
                         msg=f"v_uncond + w (v_cond - v_uncond): w = 0 gives the unconditional field, w = 1 the "
                             f"conditional one (w = {w:.3g}, shape {shape}, {dtype})")
    for kind in ("table", "table", "unet"):
        B = _int(rng, 2, 7)
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=rng)
        w = [0.0, 1.0, _uniform(rng, 1.5, 4.0)][_int(rng, 0, 2)] if kind == "table" else _uniform(rng, 0.0, 3.0)
        if kind == "table":
            D = _int(rng, 1, 4)
            spec, velocity = _table(rng, D)
            x, t, dtype = _randn(rng, B, D), _times(rng, B), F64
        else:
            spec, velocity = _cond_unet(rng)
            x, t, dtype = _randn(rng, B, 1, 8, 8, dtype=F32), torch.rand(B, generator=rng), F32
        out = k.guided_field_of(spec, labels, w, x, t)
        with torch.no_grad():
            expected = fm.guided_velocity(velocity(x, t, labels), velocity(x, t, None), w)
        expect_close(out, expected, **_tol(dtype),
                     msg=f"the guided field: guided_velocity(velocity(x, t, labels), velocity(x, t, None), w) "
                         f"({kind} field, w = {w:.3g})")


# ------------------------------------------------------------------ Part 6: reflow


@judge("test_reflow")
def reflow(k, rng):
    """The reflow pairs replayed: x0 drawn once from the judge's seed, x1 dgmlib's Heun flow of that same x0 (so the
    pairs are the deterministic flow of the noise); the loss on given pairs against cfm_loss with σ_min = 0, and 0 for
    the straight field of affine pairs; the straightness against dgmlib's, and 0 for that straight field."""
    for kind, event in (("tanh", (2,)), ("tanh", (1, 4, 4)), ("linear", (3,))):
        n, steps, seed = _int(rng, 5, 40), _int(rng, 2, 12), _seed(rng)
        spec, field = _tanh_field(rng, math.prod(event)) if kind == "tanh" else (None, None)
        if kind == "linear":
            spec = _linear_spec(rng)
            field = _make_field(spec)
        out = k.reflow_pairs_of(spec, n, list(event), steps, seed)
        expect(isinstance(out, (tuple, list)) and len(out) == 2, "reflow_pairs returns the pair (x0, x1)")
        x0 = torch.randn((n, *event), generator=torch.Generator().manual_seed(seed))
        expect_close(expect_shape(out[0], (n, *event), "x0 is (n, *event_shape)"), x0, atol=0.0, rtol=0.0,
                     msg="x0 = torch.randn((n, *event_shape), generator=generator), drawn once")
        with torch.no_grad():
            x1 = fm.heun_sample(field, x0, steps)
        expect_close(expect_shape(out[1], (n, *event), "x1 is (n, *event_shape)"), x1, atol=1e-5, rtol=1e-5,
                     msg=f"x1 = heun_sample(velocity_fn, x0, num_steps) of the same x0: the pairs are the flow of the "
                         f"noise ({kind} field, {steps} steps)")
    for event in ((2,), (1, 4, 4), (_int(rng, 3, 5),)):
        B = _int(rng, 3, 8)
        spec, field = _tanh_field(rng, math.prod(event))
        x0, x1, t = _randn(rng, B, *event), _randn(rng, B, *event), _times(rng, B)
        out = expect_shape(k.reflow_loss_of(spec, x0, x1, t), (B,), "reflow_loss is per example, (B,)")
        with torch.no_grad():
            expected = fm.cfm_loss(field, x0, x1, t, fm.OTPath(0.0))
        expect_close(out, expected, atol=1e-9, rtol=1e-8,
                     msg=f"the reflow loss: your cfm_loss on the given pairs with sigma_min = 0 (x of shape {(B, *event)})")
    D, B = _int(rng, 1, 4), _int(rng, 5, 12)
    straight = {"kind": "affine", "m": 2 * _randn(rng, D), "s": 0.2 + 2 * torch.rand(D, generator=rng, dtype=F64)}
    x0 = _randn(rng, B, D)
    x1 = straight["m"] + straight["s"] * x0
    out = as_tensor(k.reflow_loss_of(straight, x0, x1, _times(rng, B)), "reflow_loss").to(F64)
    expect_le(out.abs().max(), 1e-9, "the reflow loss of the straight field of affine pairs (x0, m + s x0)")
    for kind, event in (("tanh", (2,)), ("tanh", (1, 4, 4)), ("linear", (2,))):
        B, steps = _int(rng, 3, 8), _int(rng, 1, 20)
        spec, field = _tanh_field(rng, math.prod(event)) if kind == "tanh" else (None, None)
        if kind == "linear":
            spec = _linear_spec(rng)
            field = _make_field(spec)
        x0 = _randn(rng, B, *event)
        out = expect_shape(k.straightness_of(spec, x0, steps), (B,), "straightness is per example, (B,)")
        expect_close(out, fm.straightness(field, x0, steps), atol=2e-6, rtol=1e-6,
                     msg=f"S: the mean over k of |(x_N - x_0) - v(x_k, t_k)|^2 along the Euler trajectory ({kind} "
                         f"field, N = {steps})")
    S = as_tensor(k.straightness_of(straight, _randn(rng, B, D), _int(rng, 2, 50)), "straightness").to(F64)
    expect_le(S.abs().max(), 1e-9, "the straightness of the straight field of affine pairs")


# ------------------------------------------------------------------ Part 7: the trained model


def _cond_net(k) -> torch.nn.Module:
    """``cond_model.net``'s parameters, loaded strictly into UNet(1, base, num_classes=10), built here."""
    state = k.cond_model.attr("net").state_dict()
    instructed = "diffusion.UNet(1, base=BASE, num_classes=10)"
    expect(isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
           f"cond_model.net must be a trained {instructed}")
    conv = state.get("conv_in.weight")
    base = conv.shape[0] if isinstance(conv, torch.Tensor) and conv.dim() == 4 else 0
    expect(base >= 8 and base % 8 == 0, f"cond_model.net must be {instructed}")
    net = diffusion.UNet(1, base=base, num_classes=NUM_CLASSES)
    try:
        net.load_state_dict({name: v.float() for name, v in state.items()}, strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        raise JudgeFailure(f"cond_model.net's parameters do not fit {instructed} as instructed "
                           f"({str(err)[:200]})") from None
    expect(all(bool(torch.isfinite(p).all()) for p in net.parameters()), "cond_model.net has NaN or infinite parameters")
    return net.eval()


def _guided(net: torch.nn.Module, labels: torch.Tensor, w: float):
    return lambda x, t: fm.guided_velocity(net(x, 999 * t, labels), net(x, 999 * t, None), w)


def _accuracy(x: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images ``x`` in [-1, 1] that the course's digit classifier reads as ``labels``."""
    with torch.no_grad():
        predicted = vq.digit_classifier()(((x + 1) / 2).clamp(0, 1).float()).argmax(1)
    return (predicted == labels).double().mean().item()


@judge("test_cond_sampler")
def cond_sampler(k, rng):
    """The student's cond_model.sample replayed: x0 from the judge's seed, then the reference guided Heun steps with the
    parameters loaded here, at labels, scales and step counts of the judge's; the reference's samples at w = 2 (10
    steps, 20 of each digit) must be classified as their label at least 80 % of the time."""
    net = _cond_net(k)
    n = _int(rng, 5, 30)
    cases = [(torch.randint(0, NUM_CLASSES, (n,), generator=rng), _uniform(rng, 0.0, 4.0), _int(rng, 2, 8)),
             (torch.arange(NUM_CLASSES).repeat(20), 2.0, 10)]
    for labels, w, steps in cases:
        seed = _seed(rng)
        x0 = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            reference = fm.heun_sample(_guided(net, labels, w), x0, steps)
        mine = expect_shape(k.sample_of(labels, w, steps, seed), (len(labels), 1, 8, 8),
                            "cond_model.sample(labels, w, num_steps, generator) is (n, 1, 8, 8)")
        expect_close(mine, reference, atol=1e-3, rtol=1e-3,
                     msg=f"cond_model.sample: x0 = torch.randn((n, 1, 8, 8), generator=generator), then "
                         f"heun_sample(guided_field(self.velocity, labels, w), x0, num_steps) (w = {w:.3g}, "
                         f"{steps} steps)")
    accuracy = _accuracy(reference, labels)
    expect(accuracy >= GUIDED_ACCURACY, f"{accuracy:.1%} of the guided samples (w = 2) of your sampler and network "
                                        f"are classified as their label: at least {GUIDED_ACCURACY:.0%} are needed")


def _cfm_on(net: torch.nn.Module, split: str, seed: int, draws: int = 4) -> float:
    """The mean CFM loss (σ_min = SIGMA_MIN) of ``net`` with the labels on the digits of ``split``, ``draws`` draws of
    (x0, t) per image from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x1 = diffusion.levels_to_unit(data.load_digits(split), 17).repeat(draws, 1, 1, 1)
    labels = data.load_digit_labels(split).repeat(draws)
    x0, t = torch.randn(x1.shape, generator=g), torch.rand(len(x1), generator=g)
    with torch.no_grad():
        return fm.cfm_loss(lambda x, s: net(x, 999 * s, labels), x0, x1, t, fm.OTPath(SIGMA_MIN)).mean().item()


@judge("test_cond_digits")
def cond_digits(k, rng):
    """The trained network alone, its parameters in UNet(1, base, num_classes=10): guided digits of dgmlib's sampler
    (FlowMatching, Heun, 10 steps) from secret seeds, classified as their label at least 80 % of the time at w = 2 and
    60 % at w = 1; its CFM loss on the test digits at most 40, at most half that of an untrained U-Net, and not more
    than 3 below the same on the validation digits."""
    losses = k.val_losses()
    expect(isinstance(losses, list) and len(losses) >= 1,
           "cond_history = train.fit(cond_model, train_set, val_set, ...)")
    net = _cond_net(k)
    seed = _seed(rng)
    test_loss = expect_le(_cfm_on(net, "test", seed), CFM_BOUND, "the CFM loss of your network on the test digits")
    with torch.random.fork_rng():
        torch.manual_seed(_seed(rng))
        untrained = diffusion.UNet(1, base=8, num_classes=NUM_CLASSES).eval()
    expect_le(test_loss, 0.5 * _cfm_on(untrained, "test", seed),
              "the CFM loss on the test digits must be at most half that of an untrained UNet(1, base=8, num_classes=10)")
    val_loss = _cfm_on(net, "val", seed)
    expect(test_loss >= val_loss - VAL_MARGIN, f"the CFM loss on the test digits ({test_loss:.2f}) lies far below that "
                                               f"on the validation digits ({val_loss:.2f}): train on train_set only")
    model = fm.FlowMatching(net, (1, 8, 8), path=fm.OTPath(SIGMA_MIN), num_levels=17, num_classes=NUM_CLASSES)
    labels = torch.arange(NUM_CLASSES).repeat(20)
    for w, floor in ((2.0, GUIDED_ACCURACY), (1.0, CONDITIONAL_ACCURACY)):
        x = model.sample(len(labels), "heun", 10, labels=labels, guidance=w,
                         generator=torch.Generator().manual_seed(_seed(rng)))
        accuracy = _accuracy(x, labels)
        expect(accuracy >= floor, f"{accuracy:.1%} of the samples of your network at w = {w:g} (the grader's sampler) "
                                  f"are classified as their label: at least {floor:.0%} are needed")
