"""The adjoint method (dgmlib.ode) against torchdiffeq and backprop-through-solver.

Theorem checked (lecture 08, Chen et al. 2018, Eq. 4-5 and Appendix B): solving the augmented
system [z, a_z, a_θ, a_t] backward in time gives dL/dz(t0), dL/dθ and dL/dt.
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from torch import nn

from dgmlib import ode
from dgmlib.train import evaluate, fit

TIGHT = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}


def _problem(seed: int = 0, times: tuple[float, ...] = (0.0, 0.4, 1.0)):
    torch.manual_seed(seed)
    f = ode.ConcatMLP(3, 16, num_layers=3).double()
    z0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(times, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(times), 5, 3, dtype=torch.float64)
    return f, z0, t, w


def _grads(solve, f, z0, t, w, **kwargs):
    out = solve(f, z0, t, **TIGHT, **kwargs)
    loss = (out * w).sum() + (out ** 2).sum()  # reads every output time
    return torch.autograd.grad(loss, [z0, t, *f.parameters()])


def _rel_err(a, b) -> float:
    return max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a, b))


@pytest.mark.parametrize("times", [(0.0, 1.0), (0.0, 0.4, 1.0), (1.0, 0.3, -0.5)])
def test_adjoint_matches_backprop_and_torchdiffeq(times):
    f, z0, t, w = _problem(times=times)
    ours = _grads(ode.odeint_adjoint, f, z0, t, w)
    backprop = _grads(torchdiffeq.odeint, f, z0, t, w)
    reference = _grads(torchdiffeq.odeint_adjoint, f, z0, t, w)
    assert _rel_err(ours, backprop) < 1e-6  # z0, every t and every parameter
    assert _rel_err(ours, reference) < 1e-9


def test_forward_values_equal_odeint():
    f, z0, t, _ = _problem()
    with torch.no_grad():
        expected = torchdiffeq.odeint(f, z0, t, **TIGHT)
    assert torch.equal(ode.odeint_adjoint(f, z0, t, **TIGHT), expected)


def test_gradcheck_float64():
    f, _, _, _ = _problem()
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    params = list(f.parameters())[:2]  # gradcheck perturbs these in place, so f sees the change
    assert torch.autograd.gradcheck(lambda z, t, *p: ode.odeint_adjoint(f, z, t, params=p, **TIGHT),
                                    (z, t, *params))


def test_adjoint_of_linear_ode_closed_form():
    # dz/dt = A z: z(1) = e^A z0 and dL/dz0 = (e^A)^T dL/dz(1), dL/dA = ∫ e^{A^T(1-s)} a z(s)^T ds
    torch.manual_seed(1)
    A = nn.Parameter(0.5 * torch.randn(3, 3, dtype=torch.float64))
    z0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = ode.odeint_adjoint(lambda s, z: z @ A.T, z0, t, params=[A], **TIGHT)[-1]
    g = torch.randn(4, 3, dtype=torch.float64)
    gz, = torch.autograd.grad(out, z0, g)
    torch.testing.assert_close(out, z0 @ torch.linalg.matrix_exp(A).T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gz, g @ torch.linalg.matrix_exp(A), rtol=1e-8, atol=1e-10)


def test_augmented_dynamics_are_vector_jacobian_products():
    f, z0, _, _ = _problem()
    z = z0.detach()
    a = torch.randn_like(z)
    t = torch.tensor(0.3, dtype=torch.float64)
    params = list(f.parameters())
    fz, da_z, da_p, da_t = ode.augmented_dynamics(f, t, z, a, params)
    jac = torch.func.jacrev(lambda zz: f(t, zz))(z)  # (B, D, B, D)
    torch.testing.assert_close(da_z, -torch.einsum("bi,bicj->cj", a, jac))
    torch.testing.assert_close(fz, f(t, z).detach())
    dfdt = torch.func.jacrev(lambda s: f(s, z))(t)  # (B, D)
    torch.testing.assert_close(da_t, -(a * dfdt).sum())
    assert len(da_p) == len(params) and all(g.shape == p.shape for g, p in zip(da_p, params))


def test_adjoint_memory_is_constant_in_steps():
    f, z0, _, _ = _problem()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def saved(solve, steps):
        return ode.saved_tensor_bytes(lambda: solve(f, z0, t, method="rk4", options={"step_size": 1 / steps}).sum())[1]

    assert saved(ode.odeint_adjoint, 10) == saved(ode.odeint_adjoint, 200)
    assert saved(torchdiffeq.odeint, 200) > 10 * saved(torchdiffeq.odeint, 10) / 2  # grows with the steps


def test_resnet_block_is_one_euler_step():
    torch.manual_seed(2)
    f = ode.ConcatMLP(4, 8)
    z = torch.randn(6, 4)
    block = ode.ODEBlock(f, t1=1.0, method="euler", options={"step_size": 1.0})
    torch.testing.assert_close(block(z), ode.ResidualBlock(f, t=0.0)(z))
    assert block.nfe == 1


def test_odeblock_nfe_and_both_gradient_modes_agree():
    torch.manual_seed(3)
    f = ode.ConcatMLP(4, 8).double()
    z = torch.randn(6, 4, dtype=torch.float64)
    grads = []
    for adjoint in (True, False):
        block = ode.ODEBlock(f, rtol=1e-9, atol=1e-9, adjoint=adjoint)
        f.zero_grad()
        block(z).pow(2).sum().backward()
        assert block.nfe > 0
        grads.append(torch.cat([p.grad.flatten() for p in f.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-6


def test_odenet_classifier_learns_digits():
    torch.manual_seed(0)
    train, val = ode.digits_classification_data("train"), ode.digits_classification_data("val")
    model = ode.ODENetClassifier(hidden=16)
    before = evaluate(model, val)
    fit(model, train, val, epochs=3, batch_size=100, lr=1e-2, progress=False)
    assert evaluate(model, val) < before - 1.0
    assert model.accuracy(val) > 0.7
    assert train.shape == (1000, 65) and set(train[:, -1].long().tolist()) == set(range(10))


@pytest.mark.parametrize("call, error, match", [
    (lambda f, z, t: ode.odeint_adjoint(f, z.long(), t), TypeError, "z0 must be a floating"),
    (lambda f, z, t: ode.odeint_adjoint(f, z, t.float()), TypeError, "same dtype"),
    (lambda f, z, t: ode.odeint_adjoint(f, z, t[:1]), ValueError, "T >= 2"),
    (lambda f, z, t: ode.odeint_adjoint(f, z, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)),
     ValueError, "strictly"),
    (lambda f, z, t: ode.odeint_adjoint(f, z * float("nan"), t), ValueError, "NaN"),
    (lambda f, z, t: ode.odeint_adjoint(f, z, t, method="rk45"), ValueError, "unknown ODE solver"),
    (lambda f, z, t: ode.odeint_adjoint(f, z, t, rtol=0.0), ValueError, "positive"),
    (lambda f, z, t: ode.odeint_adjoint(lambda s, y: y, z, t), TypeError, "params"),
    (lambda f, z, t: ode.odeint_adjoint(3, z, t), TypeError, "callable"),
    (lambda f, z, t: ode.augmented_dynamics(f, t[0], z, z[:2], []), ValueError, "a_z must have the shape"),
    (lambda f, z, t: ode.ODEBlock(lambda s, y: y), TypeError, "nn.Module"),
    (lambda f, z, t: ode.ODENetClassifier().nll(torch.zeros(3, 64)), ValueError, r"\(B, 65\)"),
    (lambda f, z, t: ode.ODENetClassifier().nll(torch.full((3, 65), 12.0)), ValueError, "labels"),
    (lambda f, z, t: ode.ConcatMLP(2, activation="relu6"), ValueError, "activation"),
])
def test_bad_input(call, error, match):
    f, z0, t, _ = _problem()
    with pytest.raises(error, match=match):
        call(f, z0.detach(), t.detach())
