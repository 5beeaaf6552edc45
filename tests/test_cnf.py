"""Continuous normalizing flows (dgmlib.cnf): trace estimators, the instantaneous change of variables.

Theorems checked (lecture 09): Hutchinson's estimator is unbiased (and its variance formulas);
d log p/dt = -tr(∂f/∂z) gives the closed form of a linear ODE; a CNF is a bijection whose density
integrates to 1; adjoint and backprop gradients of the log-likelihood agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from dgmlib import cnf, data, ode


def _linear_field(A: torch.Tensor):
    return lambda t, z: z @ A.T


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_known_variance(kind):
    # f(z) = A z has Jacobian A everywhere. One draw per row of a (N, D) batch gives N independent
    # estimates of tr(A); their mean must lie within 4 standard errors of tr(A) (a 6e-5 two-sided
    # chance of failing for a correct estimator; the seed makes it deterministic).
    gen = torch.Generator().manual_seed(0)
    D, N = 5, 40_000
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    z = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    eps = cnf.sample_noise((N, D), kind, gen, torch.float64)
    est = cnf.hutchinson_trace(_linear_field(A)(0, z), z, eps, create_graph=False)
    S = (A + A.T) / 2  # εᵀAε only sees the symmetric part
    off = S - torch.diag(torch.diag(S))
    var = 2 * (off ** 2).sum() if kind == "rademacher" else 2 * (S ** 2).sum()
    se = math.sqrt(var.item() / N)
    assert abs(est.mean().item() - torch.trace(A).item()) < 4 * se
    assert est.var().item() == pytest.approx(var.item(), rel=0.05)


def test_hutchinson_unbiased_on_a_network():
    torch.manual_seed(0)
    net = ode.ConcatMLP(3, 16).double()
    z = torch.randn(4, 3, dtype=torch.float64).repeat(20_000, 1).requires_grad_(True)  # 4 points, 20k draws each
    f = net(torch.tensor(0.2, dtype=torch.float64), z)
    exact = cnf.exact_trace(f, z, create_graph=False).view(20_000, 4)[0]
    est = cnf.hutchinson_trace(f, z, cnf.sample_noise(tuple(z.shape), "rademacher", dtype=torch.float64),
                               create_graph=False).view(20_000, 4)
    se = est.std(0) / math.sqrt(20_000)
    assert ((est.mean(0) - exact).abs() < 4 * se).all()


def test_exact_trace_equals_jacobian_trace_and_planar_closed_form():
    torch.manual_seed(1)
    planar = cnf.PlanarDynamics(3).double()
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.0, dtype=torch.float64)
    jac = torch.func.jacrev(lambda zz: planar(t, zz))(z)  # (B, D, B, D)
    by_jacobian = torch.einsum("bibi->b", jac)
    torch.testing.assert_close(cnf.exact_trace(planar(t, z), z), by_jacobian)
    torch.testing.assert_close(planar.trace(z), by_jacobian)


@pytest.mark.parametrize("t1", [0.5, 1.0, 2.0])
def test_linear_ode_log_det_is_t_trace(t1):
    torch.manual_seed(2)
    A = 0.5 * torch.randn(2, 2, dtype=torch.float64)
    linear = torch.nn.Linear(2, 2, bias=False).double()
    linear.weight.data = A
    model = cnf.CNF(LinearField(linear), 2, t1=t1, trace="exact", rtol=1e-10, atol=1e-10).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    z, log_det = model(x)
    torch.testing.assert_close(log_det, torch.full((7,), -t1 * torch.trace(A).item(), dtype=torch.float64))
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(-t1 * A).T)
    closed = torch.distributions.MultivariateNormal(
        torch.zeros(2, dtype=torch.float64),
        torch.linalg.matrix_exp(t1 * A) @ torch.linalg.matrix_exp(t1 * A).T).log_prob(x)
    torch.testing.assert_close(model.log_prob(x), closed)


class LinearField(torch.nn.Module):
    """f(t, z) = linear(z): a time-independent linear velocity."""

    def __init__(self, linear: torch.nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, t, z):
        return self.linear(z)


def _small_cnf(trace: str = "exact") -> cnf.CNF:
    torch.manual_seed(3)
    return cnf.ffjord(2, hidden=16, num_layers=3, trace=trace, rtol=1e-8, atol=1e-8).double()


def test_sample_maps_back_to_its_base_point():
    model = _small_cnf().eval()
    z = torch.randn(50, 2, dtype=torch.float64)
    x, log_det_inv = model.inverse(z)
    z_back, log_det_fwd = model(x)
    torch.testing.assert_close(z_back, z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_det_fwd, -log_det_inv, rtol=1e-6, atol=1e-6)
    # and the log-det against the Jacobian of the solution map (through the adjoint), slogdet in float64
    jac = torch.autograd.functional.jacobian(lambda xx: model(xx[None])[0][0], x[0])
    torch.testing.assert_close(log_det_fwd[0], torch.linalg.slogdet(jac)[1], rtol=1e-6, atol=1e-6)


def test_density_integrates_to_one():
    model = cnf.ffjord(2, hidden=16, num_layers=3, trace="exact", rtol=1e-6, atol=1e-6).double().eval()
    g = torch.linspace(-7, 7, 121, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = model.log_prob(grid).exp().sum().item() * (g[1] - g[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("trace", ["exact", "rademacher"])
def test_adjoint_gradient_of_log_likelihood_equals_backprop(trace):
    x = torch.randn(8, 2, dtype=torch.float64)
    grads = []
    for adjoint in (True, False):
        model = _small_cnf(trace)
        model.adjoint = adjoint
        torch.manual_seed(4)  # the same Hutchinson noise for both
        model.nll(x).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-5


def test_nfe_counts_and_training_lowers_nll():
    model = cnf.ffjord(2, hidden=16, num_layers=3, rtol=1e-4, atol=1e-4)
    x = data.toy_2d("8gaussians", 256, seed=0)
    nfe_fwd, nfe_bwd = model.count_nfe(x)
    assert nfe_fwd >= 6 and nfe_bwd >= 6  # dopri5: at least one step of 6 evaluations each way
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.eval()
    before = model.nll(x).mean().item()
    model.train()
    for _ in range(30):
        opt.zero_grad()
        model.nll(x).mean().backward()
        opt.step()
    model.eval()
    assert model.nll(x).mean().item() < before - 0.3
    traj = model.trajectory(torch.randn(5, 2), torch.linspace(0, 1, 4))
    assert traj.shape == (4, 5, 2)


def test_toy_densities():
    g = torch.linspace(-4.5, 4.5, 301, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    for name in data.TOY_DENSITIES:
        mass = data.toy_log_prob(name, grid).exp().sum().item() * (g[1] - g[0]).item() ** 2
        assert mass == pytest.approx(1.0, abs=0.03), name
        assert torch.isfinite(data.toy_log_prob(name, data.toy_2d(name, 2000))).all()
    h, se = data.toy_entropy("8gaussians", n=20_000)
    closed = math.log(8) + 1 + math.log(2 * math.pi * 0.2 ** 2)  # well-separated modes
    assert abs(h - closed) < 4 * se
    assert data.toy_entropy("checkerboard", n=1000) == (pytest.approx(math.log(32)), pytest.approx(0.0, abs=1e-12))


@pytest.mark.parametrize("call, error, match", [
    (lambda: cnf.sample_noise((2, 2), "uniform"), ValueError, "rademacher"),
    (lambda: cnf.CNFDynamics(ode.ConcatMLP(2), 2, trace="hutch"), ValueError, "trace must be"),
    (lambda: cnf.ffjord().log_prob(torch.zeros(4, 3)), ValueError, r"shape \(B, 2\)"),
    (lambda: cnf.ffjord().log_prob(torch.zeros(4, 2, dtype=torch.long)), TypeError, "floating"),
    (lambda: cnf.ffjord().log_prob(torch.full((4, 2), float("nan"))), ValueError, "NaN"),
    (lambda: cnf.ffjord().sample(0), ValueError, "positive"),
    (lambda: cnf.ffjord(t1=0.0), ValueError, "t1"),
    (lambda: cnf.CNF(ode.ConcatMLP(2), 2, method="rk45"), ValueError, "solver"),
    (lambda: cnf.exact_trace(torch.zeros(3, 2), torch.zeros(3, 2)), ValueError, "requires_grad"),
    (lambda: cnf.hutchinson_trace(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3, 2)), ValueError, "shape"),
    (lambda: data.toy_log_prob("moons", torch.zeros(3, 2)), ValueError, "closed form"),
    (lambda: data.toy_log_prob("8gaussians", torch.zeros(3)), ValueError, r"\(B, 2\)"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_lecture_09_inline_dynamics_match_dgmlib():
    """The augmented dynamics that lecture 09 shows inline (cells tagged "mechanism") are dgmlib's.

    Same velocity field, same state, same Hutchinson noise: [f, -tr(∂f/∂z)] must agree to rounding,
    with the exact trace and with Hutchinson's, in a no-grad solve and with gradients on (training).
    """
    from pathlib import Path

    from nbhelpers import run_tagged_cells

    inline = run_tagged_cells(Path(__file__).resolve().parents[1] / "lectures" / "09_cnf_ffjord.ipynb")
    torch.manual_seed(5)
    dyn = cnf.CNFDynamics(ode.ConcatMLP(3, 16, num_layers=3), 3, trace="rademacher").double()
    state = torch.randn(32, 4, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    eps = cnf.sample_noise((32, 3), "rademacher", torch.Generator().manual_seed(6), torch.float64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            dyn.exact = True
            torch.testing.assert_close(inline["cnf_rhs"](dyn.velocity, t, state), dyn(t, state), rtol=1e-12, atol=1e-12)
            dyn.exact, dyn.noise = False, eps
            torch.testing.assert_close(inline["cnf_rhs"](dyn.velocity, t, state, eps), dyn(t, state),
                                       rtol=1e-12, atol=1e-12)
    # and the traces themselves against the Jacobian
    z = state[:, :3].clone().requires_grad_(True)
    f = dyn.velocity(t, z)
    jac = torch.func.jacrev(lambda zz: dyn.velocity(t, zz))(z)  # (B, D, B, D)
    torch.testing.assert_close(inline["exact_trace"](f, z, False), torch.einsum("bibi->b", jac))
    torch.testing.assert_close(inline["hutchinson_trace"](f, z, eps, False),
                               torch.einsum("bi,bibj,bj->b", eps, jac, eps))
