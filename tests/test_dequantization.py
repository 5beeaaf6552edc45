"""dgmlib.dequantization: discretizations sum to 1, and the dequantization bounds against an exact 1D case.

The exact case: one dimension (D = 1), K = 4 levels, and a continuous logistic density p on the real
line (location 0.45, scale 0.12), used on [0, 1). The discrete model it induces is
P(y) = ∫_0^1 p((y+u)/K) K^{-1} du = F((y+1)/K) - F(y/K) with F the logistic CDF, so -log P(y) is known
in closed form, and every bound can be compared with it.
"""

import math

import pytest
import torch

from dgmlib import dequantization as dq
from dgmlib import diffusion, units, vae

K = 4
LOC, SCALE = 0.45, 0.12


def _log_p(x):
    """log-density of the logistic(LOC, SCALE) at x of shape (B, 1); returns (B,) nats."""
    z = (x - LOC) / SCALE
    return (-z - 2 * torch.nn.functional.softplus(-z) - math.log(SCALE)).flatten(1).sum(1)


def _cdf(x):
    return torch.sigmoid((torch.as_tensor(x, dtype=torch.float64) - LOC) / SCALE)


def _exact_nll(y):
    """-log P(y) = -log(F((y+1)/K) - F(y/K)), nats."""
    return -torch.log(_cdf((y + 1) / K) - _cdf(y / K)).item()


def _levels(y, n):
    return torch.full((n, 1), float(y), dtype=torch.float64)


def _mean_and_se(values):
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def _quadrature_gap(y, log_q=None, n=200_000):
    """Exact gap of the variational bound, KL(q || q_opt), by the midpoint rule on (0, 1).

    gap = ∫ q(u) [log q(u) - log p((y+u)/K) + log K] du - (-log P(y)); q uniform when log_q is None.
    """
    u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    lq = torch.zeros(n, dtype=torch.float64) if log_q is None else log_q(u)
    integrand = lq.exp() * (lq - _log_p((y + u) / K) + math.log(K))
    return integrand.mean().item() - _exact_nll(y)


def _trained_looking_dequantizer(seed=0):
    """A VariationalDequantizer (1D data, K levels) whose q depends on y: random last layer, float64."""
    torch.manual_seed(seed)
    q = dq.VariationalDequantizer((1,), K, hidden=8).double()
    with torch.no_grad():
        q.net[-1].weight.normal_(0, 0.5)
        q.net[-1].bias.copy_(torch.tensor([0.3, -0.4], dtype=torch.float64))
    return q


class _OptimalDequantizer:
    """q*(u | y) = p((y+u)/K) K^{-1} / P(y), sampled by inverting the logistic CDF on the bin of y."""

    def sample(self, y, generator=None):
        v = torch.rand(y.shape, dtype=torch.float64, generator=generator)
        lo, hi = _cdf(y / K), _cdf((y + 1) / K)
        c = lo + v * (hi - lo)
        x = LOC + SCALE * (torch.log(c) - torch.log1p(-c))  # F^{-1}(c)
        u = (x * K - y).clamp(0.0, 1.0 - 1e-16)
        log_q = _log_p((y + u) / K) - math.log(K) - torch.log(hi - lo).flatten(1).sum(1)
        return u, log_q


# --------------------------------------------------------------------------- the bounds against the exact value


@pytest.mark.parametrize("y", range(K))
def test_uniform_and_variational_bounds_lie_above_the_exact_nll_by_their_kl_gap(y):
    """Monte Carlo (200k draws) of each bound matches its quadrature value within 5 standard errors,
    and the quadrature gap KL(q || q*) is > 0: the bounds lie above -log P(y) by that much."""
    n = 200_000
    exact = _exact_nll(y)
    ys = _levels(y, n)
    q = _trained_looking_dequantizer()
    cases = {
        "uniform": (None, _quadrature_gap(y)),
        "variational": (q, _quadrature_gap(y, lambda u: q.log_prob(u, _levels(y, len(u))).detach())),
    }
    for name, (dequantizer, gap) in cases.items():
        with torch.no_grad():
            est = dq.variational_dequantization_nll(_log_p, ys, K, dequantizer, torch.Generator().manual_seed(y))
        mean, se = _mean_and_se(est)
        assert gap > 1e-4, (name, y, gap)  # the bound is strictly above the exact NLL ...
        assert abs((mean - exact) - gap) < 5 * se + 1e-4, (name, y, mean - exact, gap, se)  # ... by KL(q || q*)
        assert mean > exact - 5 * se
    # the uniform bound of dequantized_nll (float32 noise) is the same number
    est = units.dequantized_nll(_log_p, ys, K, generator=torch.Generator().manual_seed(1))
    mean, se = _mean_and_se(est)
    assert abs((mean - exact) - cases["uniform"][1]) < 5 * se + 1e-4


def test_uniform_gap_in_numbers():
    """The uniform gap KL(U || q*) of the exact case, per level, by quadrature (nats): 0.129, 0.017, 0.063,
    0.153. It is largest at the edge levels, where log p changes most across the bin, and smallest
    at level 1, whose bin [0.25, 0.5) holds the mode 0.45, where p is flattest."""
    gaps = [_quadrature_gap(y) for y in range(K)]
    assert gaps == pytest.approx([0.1294, 0.0167, 0.0633, 0.1531], abs=5e-4)


@pytest.mark.parametrize("y", range(K))
def test_variational_bound_with_the_optimal_q_is_exact(y):
    ys = _levels(y, 1000)
    est = dq.variational_dequantization_nll(_log_p, ys, K, _OptimalDequantizer(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, torch.full_like(est, _exact_nll(y)), atol=1e-8, rtol=0)  # every draw, not only on average
    iw = dq.importance_weighted_dequantization_nll(_log_p, ys, K, _OptimalDequantizer(), 5,
                                                   torch.Generator().manual_seed(0))
    torch.testing.assert_close(iw, torch.full_like(iw, _exact_nll(y)), atol=1e-8, rtol=0)


@pytest.mark.parametrize("dequantizer", ["uniform", "variational"])
def test_importance_weighted_bound_is_monotone_in_k_and_equals_the_variational_one_at_k1(dequantizer):
    q = None if dequantizer == "uniform" else _trained_looking_dequantizer()
    n = 20_000 if q is None else 5_000  # the network of q costs most of the time
    for y in (0, 2):
        exact = _exact_nll(y)
        ys = _levels(y, n)
        with torch.no_grad():
            one = dq.variational_dequantization_nll(_log_p, ys, K, q, torch.Generator().manual_seed(7))
            iw1 = dq.importance_weighted_dequantization_nll(_log_p, ys, K, q, 1, torch.Generator().manual_seed(7))
            torch.testing.assert_close(iw1, one, atol=1e-12, rtol=0)  # k = 1: the same number at the same draw
            means = []
            for k in (1, 4, 16, 64):
                est = dq.importance_weighted_dequantization_nll(_log_p, ys, K, q, k, torch.Generator().manual_seed(k))
                mean, se = _mean_and_se(est)
                assert mean > exact - 5 * se  # still a bound
                means.append((mean, se))
        for (m_small, se_small), (m_big, se_big) in zip(means, means[1:]):
            assert m_big <= m_small + 4 * math.hypot(se_small, se_big)  # non-increasing in k
        gap1, gap64 = means[0][0] - exact, means[-1][0] - exact
        # and tighter: with uniform q the gap (0.13 / 0.06 nats at k = 1) falls below a tenth by k = 64;
        # the deliberately poor q of _trained_looking_dequantizer (1.07 / 0.57 nats) has heavy-tailed
        # weights, and its gap falls more slowly (to 0.62 / 0.23 nats at k = 64, seed-dependent)
        assert gap64 < (0.1 if q is None else 0.7) * gap1, (y, gap1, gap64)


# --------------------------------------------------------------------------- the variational dequantizer


def test_variational_dequantizer_density_integrates_to_one_and_matches_its_samples():
    q = _trained_looking_dequantizer()
    n = 400_000
    u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    with torch.no_grad():
        for y in range(K):
            mass = q.log_prob(u, _levels(y, n)).exp().mean().item()
            assert mass == pytest.approx(1.0, abs=1e-4), (y, mass)
        ys = torch.arange(K, dtype=torch.float64).repeat(50)[:, None]
        us, log_q = q.sample(ys, torch.Generator().manual_seed(3))
        assert us.shape == ys.shape and us.dtype == torch.float64 and (us >= 0).all() and (us < 1).all()
        torch.testing.assert_close(log_q, q.log_prob(us, ys), atol=1e-9, rtol=0)
        # a fresh module is the logit-normal sigmoid(N(0, 1)) for every level
        fresh = dq.VariationalDequantizer((1,), K).double()
        u0, lq0 = fresh.sample(ys, torch.Generator().manual_seed(4))
        s = torch.log(u0) - torch.log1p(-u0)
        ref = -0.5 * s ** 2 - 0.5 * math.log(2 * math.pi) - torch.log(u0) - torch.log1p(-u0)
        torch.testing.assert_close(lq0, ref.sum(1), atol=1e-9, rtol=0)


def test_variational_dequantizer_log_det_matches_autograd_on_images():
    """On (C, H, W) data: log q = log N(eps) - log|du/deps| with the (diagonal) Jacobian from autograd."""
    torch.manual_seed(0)
    q = dq.VariationalDequantizer((2, 3, 3), K, hidden=4).double()
    with torch.no_grad():
        for p in q.net[-1].parameters():
            p.normal_(0, 0.3)
    y = torch.randint(0, K, (5, 2, 3, 3)).double()
    u, log_q = q.sample(y, torch.Generator().manual_seed(1))
    eps = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    h = q.net(y * (2.0 / (K - 1)) - 1.0)
    mu, log_sigma = h.detach().chunk(2, dim=1)
    u_again = torch.sigmoid(mu + log_sigma.exp() * eps)
    torch.testing.assert_close(u_again.detach(), u.detach(), atol=1e-12, rtol=0)
    (du,) = torch.autograd.grad(u_again.sum(), eps)  # elementwise map: the Jacobian is diagonal
    ref = (-0.5 * eps ** 2 - 0.5 * math.log(2 * math.pi) - du.log()).flatten(1).sum(1)
    torch.testing.assert_close(log_q, ref.detach(), atol=1e-9, rtol=0)
    # the bound is differentiable in q's parameters (reparametrization)
    nll = dq.variational_dequantization_nll(lambda x: torch.zeros(x.shape[0], dtype=x.dtype), y, K, q,
                                            torch.Generator().manual_seed(2))
    nll.mean().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in q.parameters())


def test_uniform_dequantizer_reproduces_dequantized_nll_with_a_flat_density():
    y = torch.randint(0, 17, (6, 1, 8, 8)).float()
    flat = lambda x: torch.zeros(x.shape[0])  # noqa: E731
    for k in (1, 3):
        nll = dq.importance_weighted_dequantization_nll(flat, y, 17, None, k)
        torch.testing.assert_close(nll, torch.full((6,), 64 * math.log(17)))


# --------------------------------------------------------------------------- discretizations sum to 1


SCALES = [-20.0, -6.0, -1.0, 0.0, 2.0, 8.0]  # log-scales from 2e-9 to 3000 (in the units of the mean)


@pytest.mark.parametrize("log_scale", SCALES)
def test_every_discretization_sums_to_one(log_scale):
    levels = torch.arange(17, dtype=torch.float64)
    for mean in (-3.0, 0.0, 0.4, 7.5, 16.0, 25.0):
        m = torch.full_like(levels, mean, requires_grad=True)
        s = torch.full_like(levels, log_scale, requires_grad=True)
        logp = dq.discretized_logistic_log_prob(levels, m, s, 17)
        assert torch.isfinite(logp).all() and torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-9)
        logp.sum().backward()
        assert torch.isfinite(m.grad).all() and torch.isfinite(s.grad).all()
        g = dq.discretized_gaussian_log_prob(levels, torch.full_like(levels, mean / 8 - 1), s.detach(), 17)
        assert torch.isfinite(g).all() and torch.logsumexp(g, 0).item() == pytest.approx(0.0, abs=1e-9)
    # a mixture of three components: one at this scale, one tiny, one huge
    means = torch.tensor([3.3, 12.0, 8.0], dtype=torch.float64).expand(17, 3).clone().requires_grad_()
    log_scales = torch.tensor([log_scale, -20.0, 8.0], dtype=torch.float64).expand(17, 3).clone().requires_grad_()
    logits = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).expand(17, 3).clone().requires_grad_()
    mix = dq.discretized_logistic_mixture_log_prob(levels, logits, means, log_scales, 17)
    assert mix.shape == (17,) and torch.isfinite(mix).all()
    assert torch.logsumexp(mix, 0).item() == pytest.approx(0.0, abs=1e-9)
    mix.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (means, log_scales, logits))


def test_mixture_matches_its_definition_and_reduces_to_one_logistic():
    torch.manual_seed(0)
    y = torch.randint(0, 17, (4, 5)).double()
    logits, means, log_scales = torch.randn(4, 5, 3).double(), 16 * torch.rand(4, 5, 3).double(), torch.randn(4, 5, 3).double()
    mix = dq.discretized_logistic_mixture_log_prob(y, logits, means, log_scales, 17)
    comps = torch.stack([dq.discretized_logistic_log_prob(y, means[..., m], log_scales[..., m], 17) for m in range(3)], -1)
    naive = torch.log((torch.softmax(logits, -1) * comps.exp()).sum(-1))
    torch.testing.assert_close(mix, naive, atol=1e-12, rtol=0)
    one = dq.discretized_logistic_mixture_log_prob(y, logits[..., :1], means[..., :1], log_scales[..., :1], 17)
    torch.testing.assert_close(one, dq.discretized_logistic_log_prob(y, means[..., 0], log_scales[..., 0], 17))
    # parameters shared across a batch broadcast against the levels
    shared = dq.discretized_logistic_mixture_log_prob(y, logits[0, 0], means[0, 0], log_scales[0, 0], 17)
    assert shared.shape == (4, 5)


def test_old_names_are_the_same_functions():
    assert units.uniform_dequantize is dq.uniform_dequantize and units.dequantized_nll is dq.dequantized_nll
    assert units.check_levels is dq.check_levels
    assert vae.discretized_logistic_log_prob is dq.discretized_logistic_log_prob
    assert vae.log_bin_probability is dq.log_bin_probability
    assert diffusion.discretized_gaussian_log_prob is dq.discretized_gaussian_log_prob


# --------------------------------------------------------------------------- bad input


def test_bad_input_gives_a_clear_error():
    y = torch.tensor([[0.0], [3.0]])
    zero = lambda x: torch.zeros(x.shape[0])  # noqa: E731
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        dq.variational_dequantization_nll(zero, torch.tensor([[4.0]]), K)
    with pytest.raises(ValueError, match="integer levels"):
        dq.importance_weighted_dequantization_nll(zero, torch.tensor([[0.5]]), K, k=2)
    with pytest.raises(ValueError, match="num_levels"):
        dq.variational_dequantization_nll(zero, y, 4.0)
    with pytest.raises(ValueError, match="num_levels"):
        dq.discretized_logistic_log_prob(y, torch.zeros(1), torch.zeros(1), 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        dq.uniform_dequantize([0, 1], K)
    with pytest.raises(ValueError, match="k must be >= 1"):
        dq.importance_weighted_dequantization_nll(zero, y, K, k=0)
    with pytest.raises(TypeError, match="k must be an integer"):
        dq.importance_weighted_dequantization_nll(zero, y, K, k=2.0)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        dq.variational_dequantization_nll(lambda x: torch.zeros(x.shape[0], 1), y, K)
    with pytest.raises(ValueError, match="batch"):
        dq.variational_dequantization_nll(zero, torch.tensor([0.0, 1.0]), K)
    with pytest.raises(ValueError, match="dequantizer.sample"):
        dq.variational_dequantization_nll(zero, y, K, _BadDequantizer())
    q = dq.VariationalDequantizer((1,), K)
    with pytest.raises(ValueError, match=r"shape \(B, 1\)"):
        q.sample(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="data_shape"):
        dq.VariationalDequantizer((1, 8), K)
    with pytest.raises(ValueError, match="same shape"):
        dq.discretized_logistic_mixture_log_prob(y, torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), torch.zeros(2, 1, 2), K)
    with pytest.raises(ValueError, match="broadcast"):
        dq.discretized_logistic_mixture_log_prob(y, torch.zeros(3, 1, 2), torch.zeros(3, 1, 2), torch.zeros(3, 1, 2), K)
    with pytest.raises(ValueError, match="NaN or inf"):
        dq.discretized_gaussian_log_prob(y, torch.tensor(float("nan")), torch.zeros(()), K)
    with pytest.raises(TypeError, match="floating point"):
        dq.discretized_logistic_log_prob(y, torch.zeros(1, dtype=torch.long), torch.zeros(1), K)


class _BadDequantizer:
    def sample(self, y, generator=None):
        return torch.rand(y.shape[0]), torch.zeros(y.shape[0])
