"""The judges of hw5_neural_ode: every test cell's points, decided in the grader (``dgmlib.grading.judge``).

Each judge draws its inputs, shapes, times and parameters from ``rng`` (a secret seed per submission), calls the
student's code through the cell's probe, and compares with the reference, here in the grader: ``dgmlib.ode`` and
``dgmlib.cnf``, autograd through ``torchdiffeq.odeint``, closed forms, and the solution's own ``FFJORD`` (``REF``).
The student's functions take callables (a velocity field and its parameters), which cannot cross the wire: the
test cells expose small wrappers that build ``ode.ConcatMLP(dim, hidden, num_layers, activation)`` in float64,
load the parameters the judge sends and call the student's code; the judge builds the same field with the same
parameters and computes what the answer must be:

- the augmented dynamics against ``ode.augmented_dynamics`` (parameters in an order of the judge's, and some that
  the field does not use); the adjoint gradients against backprop through ``torchdiffeq.odeint`` at tight
  tolerances, for a loss, times ``t0 < t1`` and a subset of the parameters of the judge's;
- Hutchinson's estimate, for noise the judge sends, against the exact ``eps^T (df/dz) eps`` (Jacobian computed here),
  its gradient (so the graph was kept) against the reference's, and its mean over many draws against the trace;
- FFJORD's ``dynamics`` for a noise ``self.eps`` of the judge's, ``log_prob`` against the instructed solve
  (``torchdiffeq.odeint_adjoint``, rtol = atol = 1e-4) with the noise the student's ``log_prob`` drew (and the
  closed form of a diagonal linear field), its gradient with respect to the velocity field against that solve's
  adjoint gradient (to the solver's accuracy, so backprop through the solver passes too), and its mean over many
  draws against dgmlib's exact-trace CNF.

The trained model is judged from its parameters alone: ``model.state_dict()`` is loaded strictly into the reference
``FFJORD(ode.ConcatMLP(2, 64, num_layers=4))`` and its NLL is measured with dgmlib's exact-trace
``cnf.CNF(net, 2, trace="exact", rtol=1e-5, atol=1e-5)`` on the 5000 test points, on 2000 fresh points drawn
from a secret seed and on the 2000 validation points (a test NLL far below theirs means the model saw the test
points). The student's methods are never asked for a number that earns points.

While grading, the kernel's dgmlib withholds every declared answer, ``ode.augmented_dynamics`` included, which
``ode.odeint_adjoint``'s backward pass calls: so Part 3 trains with ``torchdiffeq.odeint_adjoint``.

This file is the instructor's: it is never released, and the student's kernel never sees it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchdiffeq

from dgmlib import cnf, data, ode
from dgmlib.grading.judge import secret_int as _int, secret_float as _uniform
from dgmlib.grading.judge import (JudgeFailure, expect, expect_close, expect_le, expect_shape, judge, randomise,
                                  solution_cells)

REF = solution_cells(Path(__file__).with_name("hw5_neural_ode.ipynb"), "ffjord", "hutchinson")

F64 = torch.float64


def _field(rng: torch.Generator, shape: list, scale: float = 0.3) -> ode.ConcatMLP:
    """The reference ``ode.ConcatMLP(*shape)`` with random parameters, in float64 (the kernel builds the same)."""
    return randomise(ode.ConcatMLP(*shape), rng, scale)


def _state(field: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in field.state_dict().items()}


def _shapes(rng: torch.Generator) -> list[list]:
    """Fields of the judge's: [dim, hidden, num_layers, activation]."""
    return [[3, 16, 3, "tanh"], [_int(rng, 2, 6), _int(rng, 8, 20), _int(rng, 2, 4), "softplus"],
            [_int(rng, 2, 5), _int(rng, 8, 16), 4, "tanh"]]


def _as_sequence(value, length: int, what: str) -> list:
    expect(isinstance(value, (list, tuple)), f"{what} must be a tuple or a list, got {type(value).__name__}")
    expect(len(value) == length, f"{what} must have {length} entries, got {len(value)}")
    return list(value)


# ------------------------------------------------------------------ Part 1: the adjoint method


@judge("test_augmented")
def augmented(k, rng):
    """(f, -a^T df/dz, -a^T df/dtheta_k ...) against dgmlib's augmented dynamics, for parameters in an order of the
    judge's (a subset of the field's, then a few that the field does not use and must get zeros)."""
    for shape in _shapes(rng):
        field = _field(rng, shape, 0.5)
        params = list(field.parameters())
        order = torch.randperm(len(params), generator=rng)[:_int(rng, 1, len(params))].tolist()
        unused = [torch.randn(_int(rng, 1, 3), _int(rng, 1, 4), generator=rng, dtype=F64)
                  for _ in range(_int(rng, 0, 2))]
        t = _uniform(rng, -1.0, 1.0)
        batch = _int(rng, 2, 7)
        z = torch.randn(batch, shape[0], generator=rng, dtype=F64)
        a = torch.randn(batch, shape[0], generator=rng, dtype=F64)
        chosen = [params[i] for i in order] + [torch.nn.Parameter(u.clone()) for u in unused]
        f, da, dparams, _ = ode.augmented_dynamics(field, torch.tensor(t, dtype=F64), z, a, chosen)
        out = _as_sequence(k.augmented_of(shape, _state(field), order, unused, t, z, a), 2 + len(chosen),
                           "augmented_dynamics(func, t, z, a, params): (f, da, *dparams), of length 2 + len(params),")
        expect_close(out[0], f, msg="f(t, z)")
        expect_close(out[1], da, msg="da/dt = -a^T df/dz")
        for i, (mine, want) in enumerate(zip(out[2:], dparams)):
            what = f"parameter {i}: -a^T df/dtheta" if i < len(order) else f"parameter {i}, which f does not use: zeros"
            expect_close(mine, want, msg=what)


@judge("test_adjoint")
def adjoint(k, rng):
    """dL/dz(t0) and dL/dtheta_k from the student's backward solve against backprop through torchdiffeq.odeint, for
    losses, times t0 < t1 (not only 0 and 1) and parameter subsets of the judge's."""
    for shape in _shapes(rng)[:2] + [[_int(rng, 2, 4), 12, 3, "tanh"]]:
        field = _field(rng, shape, 0.3)
        params = list(field.parameters())
        order = torch.randperm(len(params), generator=rng)[:_int(rng, 1, len(params))].tolist()
        t0 = _uniform(rng, -1.0, 0.5)
        t1 = t0 + _uniform(rng, 0.5, 1.5)
        batch = _int(rng, 2, 6)
        z0 = torch.randn(batch, shape[0], generator=rng, dtype=F64).requires_grad_(True)
        w = torch.randn(batch, shape[0], generator=rng, dtype=F64)
        v = torch.rand(batch, shape[0], generator=rng, dtype=F64)
        z1 = torchdiffeq.odeint(field, z0, torch.tensor([t0, t1], dtype=F64), rtol=1e-11, atol=1e-11)[-1]
        loss = (z1 * w).sum().sin() + 0.5 * (v * z1 ** 2).sum()
        dL_dz1, dz0, *dparams = torch.autograd.grad(loss, [z1, z0, *[params[i] for i in order]])
        out = _as_sequence(k.adjoint_of(shape, _state(field), order, z1.detach(), dL_dz1, t0, t1), 2,
                           "adjoint_gradients returns (dL_dz0, [dL_dtheta_k, ...]):")
        expect_close(out[0], dz0, rtol=1e-6, atol=1e-8, msg=f"dL/dz(t0) for t0 = {t0:.2f}, t1 = {t1:.2f}")
        mine = _as_sequence(out[1], len(order), "the list of parameter gradients (one per parameter)")
        for i, (g, want) in enumerate(zip(mine, dparams)):
            expect_close(g, want, rtol=1e-6, atol=1e-8, msg=f"dL/dtheta for parameter {i}")


# ------------------------------------------------------------------ Part 2: Hutchinson's estimator


def _eps_jac_eps(field, t: float, z: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact eps_b^T (df_b/dz_b) eps_b, with its graph, and the leaf z it was computed at (computed here)."""
    z = z.clone().requires_grad_(True)
    f = field(torch.tensor(t, dtype=F64), z)
    (eps_jac,) = torch.autograd.grad(f, z, eps, create_graph=True)
    return (eps_jac * eps).sum(1), z


def _hutchinson(k, field, shape, t, z, eps, w):
    """The student's estimate (and its gradient with respect to z and the parameters if ``w`` is given)."""
    out = _as_sequence(k.hutchinson_of(shape, _state(field), t, z, eps, w), 2, "hutchinson_of")
    return expect_shape(out[0], (len(z),), "hutchinson_trace(f, z, eps) is (B,)"), out[1]


@judge("test_hutchinson")
def hutchinson(k, rng):
    """eps^T A eps for linear fields, eps^T (df/dz) eps for random fields (Rademacher and Gaussian noise sent by the
    judge), the gradient through the kept graph, and the mean of 20000 draws against the exact trace."""
    for _ in range(2):  # f(z) = A z: the estimate, and its gradient with respect to A (the graph is kept)
        d, batch = _int(rng, 2, 5), _int(rng, 2, 6)
        A = torch.randn(d, d, generator=rng, dtype=F64)
        z = torch.randn(batch, d, generator=rng, dtype=F64)
        eps = torch.randn(batch, d, generator=rng, dtype=F64)
        w = torch.randn(batch, generator=rng, dtype=F64)
        est, grad_A = _as_sequence(k.hutchinson_linear(A, z, eps, w), 2, "hutchinson_linear")
        expect_shape(est, (batch,), "hutchinson_trace(f, z, eps) is (B,)")
        expect_close(est, torch.einsum("bi,ij,bj->b", eps, A, eps), msg="eps^T A eps for f(z) = A z")
        expect(grad_A is not None, "keep the graph (create_graph=True) so that the estimate can be trained through")
        expect_close(grad_A, torch.einsum("b,bi,bj->ij", w, eps, eps), msg="the gradient of the estimate with "
                                                                          "respect to A (create_graph=True)")
    for shape, kind in zip(_shapes(rng), ("rademacher", "gaussian", "rademacher")):
        field = _field(rng, shape, 0.5)
        t, batch = _uniform(rng, -1.0, 1.0), _int(rng, 2, 7)
        z = torch.randn(batch, shape[0], generator=rng, dtype=F64)
        eps = cnf.sample_noise((batch, shape[0]), kind, rng, F64)
        w = torch.randn(batch, generator=rng, dtype=F64)
        est, grads = _hutchinson(k, field, shape, t, z, eps, w)
        want, zz = _eps_jac_eps(field, t, z, eps)
        expect_close(est, want.detach(), msg=f"eps^T (df/dz) eps ({kind} noise): a sum over the D entries")
        expect(grads is not None, "keep the graph (create_graph=True) so that the estimate can be trained through")
        inputs = [zz, *field.parameters()]
        expected = torch.autograd.grad((want * w).sum(), inputs, allow_unused=True)
        grads = _as_sequence(grads, len(expected), "the gradients")
        for name, x, g, e in zip(["z"] + [n for n, _ in field.named_parameters()], inputs, grads, expected):
            e = torch.zeros_like(x) if e is None else e  # the last layer's bias: no second derivative
            if g is None:
                expect(not bool(e.any()), f"the estimate's graph must reach {name} (create_graph=True)")
                continue
            expect_close(g, e, msg=f"the gradient of the estimate with respect to {name} (create_graph=True)")
    # unbiased: the mean of 20000 Rademacher estimates at 3 points, within 5 standard errors of the exact trace (the
    # visible check's 4 would fail one honest submission in about 5000, drawn afresh for each)
    shape = [3, 16, 3, "tanh"]
    field = _field(rng, shape, 0.5)
    t = _uniform(rng, -1.0, 1.0)
    points = torch.randn(3, 3, generator=rng, dtype=F64)
    z = points.repeat(20_000, 1)
    eps = cnf.sample_noise(tuple(z.shape), "rademacher", rng, F64)
    est, _ = _hutchinson(k, field, shape, t, z, eps, None)
    est = est.to(F64).view(20_000, 3)
    jac = torch.func.jacrev(lambda y: field(torch.tensor(t, dtype=F64), y))(points)
    exact = torch.einsum("bibi->b", jac).detach()
    se = est.std(0) / math.sqrt(20_000)
    expect_le(((est.mean(0) - exact).abs() / (se + 1e-12)).max(), 5.0,  # 5, not 4: a fresh draw per submission
              "the mean of 20000 estimates, in standard errors from the trace")


# ------------------------------------------------------------------ Part 3: FFJORD


def _hutchinson_state(field, eps: torch.Tensor):
    """The FFJORD dynamics of the reference for the noise ``eps``: [f(t, z), -eps^T (df/dz) eps], (B, D + 1)."""
    def dynamics(t, state):
        with torch.enable_grad():
            z = state[:, :-1]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f = field(t, z)
            (eps_jac,) = torch.autograd.grad(f, z, eps, create_graph=True)
        return torch.cat([f, -(eps_jac * eps).sum(1, keepdim=True)], dim=1)

    return dynamics


def _log_prob(field, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log N(z(0)) - l(0) from [x, 0] at t = 1 to t = 0, with the noise ``eps``, solved as the instructions fix it:
    ``torchdiffeq.odeint_adjoint(..., rtol=1e-4, atol=1e-4, adjoint_params=...)`` (its gradient is the adjoint's)."""
    state = torch.cat([x, x.new_zeros(len(x), 1)], dim=1)
    end = torchdiffeq.odeint_adjoint(_hutchinson_state(field, eps), state, torch.tensor([1.0, 0.0], dtype=F64),
                                     rtol=1e-4, atol=1e-4, adjoint_params=tuple(field.parameters()))[-1]
    return -0.5 * (end[:, :-1] ** 2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi) - end[:, -1]


def _rademacher(eps, shape: tuple[int, int]) -> torch.Tensor:
    eps = expect_shape(eps, shape, "self.eps after log_prob: one noise (B, 2) for the whole solve").to(F64)
    expect(bool(((eps == 1) | (eps == -1)).all()), "self.eps must be Rademacher noise (entries +1 and -1)")
    return eps


@judge("test_ffjord")
def ffjord(k, rng):
    """dynamics for the judge's self.eps; log_prob and its gradient for a diagonal linear field (closed form) and a
    random field (the reference solve with the noise that log_prob drew); unbiased over 2000 draws per point."""
    # dynamics(t, state) = [f(t, z), -eps^T (df/dz) eps] for a noise of the judge's, with and without autograd on
    shape = [2, 16, 3, "tanh"]
    field = _field(rng, shape, 0.5)
    net = k.concat_mlp(shape, _state(field))
    for kind, grad in (("rademacher", True), ("gaussian", False)):
        batch = _int(rng, 3, 8)
        eps = cnf.sample_noise((batch, 2), kind, rng, F64)
        state = torch.randn(batch, 3, generator=rng, dtype=F64)
        t = _uniform(rng, 0.0, 1.0)
        out = k.ffjord_dynamics(net, eps, t, state, grad)
        expected = _hutchinson_state(field, eps)(torch.tensor(t, dtype=F64), state).detach()
        expect_close(out, expected, msg="dynamics(t, state) = [f(t, z), -hutchinson_trace(f, z, self.eps)]"
                                        + ("" if grad else ", also in a solve without gradients (torch.no_grad())"))
    # a diagonal linear field f(z) = d * z: log_prob in closed form, exact for any Rademacher noise, and its gradient
    d = torch.empty(2, dtype=F64).uniform_(-0.6, 0.6, generator=rng)
    x = 1.5 * torch.randn(_int(rng, 5, 10), 2, generator=rng, dtype=F64)
    log_p, eps, grads = _as_sequence(k.ffjord_log_prob(k.Diagonal(d), x, True), 3, "ffjord_log_prob")
    _rademacher(eps, tuple(x.shape))
    z = x * torch.exp(-d)
    expect_close(expect_shape(log_p, (len(x),), "log_prob(x) is (B,)"),
                 -0.5 * (z ** 2).sum(1) - math.log(2 * math.pi) - d.sum(), rtol=5e-4, atol=5e-4,
                 msg="log_prob for f(z) = d * z: log N(x e^{-d}; 0, I) - sum(d)")
    expect(isinstance(grads, list) and len(grads) == 1 and grads[0] is not None,
           "the NLL's gradient must reach self.net (odeint_adjoint(..., adjoint_params=tuple(self.net.parameters())))")
    expect_close(grads[0], 1.0 - (x ** 2 * torch.exp(-2 * d)).mean(0), rtol=1e-3, atol=1e-3,
                 msg="the gradient of the mean NLL with respect to d, for f(z) = d * z")
    # a random field: log_prob is the instructed solve with the noise log_prob drew, its gradient that solve's adjoint
    x = torch.randn(_int(rng, 4, 8), 2, generator=rng, dtype=F64)
    log_p, eps, grads = _as_sequence(k.ffjord_log_prob(net, x, True), 3, "ffjord_log_prob")
    eps = _rademacher(eps, tuple(x.shape))
    want = _log_prob(field, x, eps)
    # (tolerances of the solver's error: the same solve agrees to 1e-10, a wrong one is off by far more)
    expect_close(expect_shape(log_p, (len(x),), "log_prob(x) is (B,)"), want.detach(), rtol=1e-3, atol=3e-3,
                 msg="log_prob(x) = log N(z(0); 0, I) - l(0), solved from [x, 0] at t = 1 to t = 0 with self.eps")
    expected = torch.autograd.grad(-want.mean(), list(field.parameters()))
    grads = _as_sequence(grads, len(expected), "the gradients with respect to self.net's parameters")
    for (name, p), g in zip(field.named_parameters(), grads):
        expect(g is not None, f"the NLL's gradient must reach self.net ({name})")
        expect_shape(g, tuple(p.shape), f"the gradient with respect to net.{name}")
    mine, want_grad = torch.cat([g.to(F64).flatten() for g in grads]), torch.cat([e.flatten() for e in expected])
    expect(not bool(torch.isnan(mine).any()), "NaN in the gradient of the NLL")
    expect_le(float((mine - want_grad).norm() / want_grad.norm()), 0.02,
              "the gradient of the mean NLL with respect to self.net, relative error (the solver's is about 0.003)")
    # unbiased: 2000 draws at 4 points against dgmlib's exact-trace CNF
    points = torch.randn(4, 2, generator=rng, dtype=F64)
    est, _, _ = _as_sequence(k.ffjord_log_prob(net, points.repeat(2000, 1), False), 3, "ffjord_log_prob")
    est = expect_shape(est, (8000,), "log_prob(x) is (B,)").to(F64).view(2000, 4)
    with torch.no_grad():
        exact = cnf.CNF(field, 2, trace="exact", rtol=1e-7, atol=1e-7).double().eval().log_prob(points)
    se = est.std(0) / math.sqrt(2000)
    expect_le(((est.mean(0) - exact).abs() / (se + 1e-3)).max(), 5.0,
              "log_prob must be an unbiased estimate (fresh noise each call): the mean of 2000 draws, in standard "
              "errors from the exact log-density")


# ------------------------------------------------------------------ the trained model


def _trained(k) -> torch.nn.Module:
    """The student's trained parameters in the reference FFJORD(ode.ConcatMLP(2, 64, num_layers=4)), loaded strictly."""
    state = k.model.state_dict()
    expect(isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
           "model must be FFJORD(ode.ConcatMLP(2, 64, num_layers=4)), trained")
    with torch.random.fork_rng():
        reference = REF.FFJORD(ode.ConcatMLP(2, 64, num_layers=4))
    try:
        reference.load_state_dict({name: t.float() for name, t in state.items()}, strict=True)
    except (RuntimeError, TypeError, ValueError) as err:
        raise JudgeFailure("model's parameters do not fit FFJORD(ode.ConcatMLP(2, 64, num_layers=4)) as instructed "
                           f"({str(err)[:300]})") from None
    return reference.eval()


@judge("test_model")
def model(k, rng):
    """model is FFJORD(ode.ConcatMLP(2, 64, num_layers=4)) (its state loads strictly into the reference) with finite
    parameters, and history holds validation losses."""
    reference = _trained(k)
    expect(all(bool(torch.isfinite(p).all()) for p in reference.parameters()), "the trained parameters are finite")
    val = k.history.attr("val_loss")
    expect(isinstance(val, list) and len(val) >= 1 and all(isinstance(v, (int, float)) for v in val),
           "history = train.fit(model, toy.train, toy.val, ...): history.val_loss holds the validation losses")
    expect(all(math.isfinite(v) for v in val), "the validation losses are finite")


TEST_NLL_BOUND = 2.4
"""nats/point; the reference solution gets about 2.15 after the 3 fast-mode epochs (the true entropy is 1.70)."""


def _exact_nll(net: torch.nn.Module, points: torch.Tensor) -> float:
    exact = cnf.CNF(net, 2, trace="exact", rtol=1e-5, atol=1e-5).eval()
    with torch.no_grad():
        return torch.cat([exact.nll(b) for b in points.split(1000)]).mean().item()


@judge("test_nll")
def nll(k, rng):
    """The exact test NLL of the student's trained parameters in the reference FFJORD, with dgmlib's exact-trace CNF,
    on the 5000 test points; and on 2000 fresh points from a secret seed (bounded too) and the validation points,
    which catch a model fitted to the test points (its test NLL would lie far below theirs)."""
    reference = _trained(k)
    toy = data.load_toy_data("8gaussians")
    test_nll = expect_le(_exact_nll(reference.net, toy.test), TEST_NLL_BOUND,
                         "exact test NLL (nats/point) of your trained parameters")
    fresh = data.toy_2d("8gaussians", 2000, seed=_int(rng, 1000, 2**31 - 1))
    fresh_nll = expect_le(_exact_nll(reference.net, fresh), TEST_NLL_BOUND,
                          "exact NLL (nats/point) of your trained parameters on fresh points of the grader's")
    val_nll = _exact_nll(reference.net, toy.val)
    for name, other in (("fresh points of the grader's", fresh_nll), ("the validation points", val_nll)):
        expect(test_nll >= other - 0.2, f"the test NLL ({test_nll:.3f}) lies far below the NLL on {name} "
                                        f"({other:.3f}): train on the training points only")
