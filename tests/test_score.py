"""Score-based models (dgmlib.score, lecture 11), checked on Gaussian data where every score is closed form.

Theorems checked: the denoising score-matching minimiser is the noisy score and DSM - ESM is a constant
(Vincent 2011); implicit = sliced = explicit - ½ E||∇ log p||² (Hyvärinen 2005; Song et al. 2019);
Langevin's stationary law; the reverse SDE and the probability-flow ODE return the data and its exact
density (Song et al. 2021); DDPM is a discretised VP SDE; Tweedie; VDM's invariance to the schedule,
the discrete bound above the continuous one and the variance-minimising gradient (Kingma et al. 2021).

Monte Carlo tolerances are 4-5 standard errors computed from the same samples (a false alarm about
once in 10⁴-10⁶ runs, and every test is seeded, so a run is reproducible).
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from dgmlib import diffusion, score
from dgmlib.cli import main
from dgmlib.data import load_image_data, load_toy_data
from dgmlib.models import MODELS
from dgmlib.score_models import ncsn_sigmas

DT = torch.float64
MU = torch.tensor([0.7, -0.4], dtype=DT)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=DT)  # anisotropic: Hutchinson's estimate is not exact
ALL_SDES = {"vp": score.VPSDE(), "subvp": score.SubVPSDE(), "ve": score.VESDE()}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(n: int, seed: int) -> torch.Tensor:
    """x ~ N(MU, COV), ``(n, 2)`` float64."""
    return MU + torch.randn(n, 2, dtype=DT, generator=_gen(seed)) @ torch.linalg.cholesky(COV).T


def _marginal(sde: score.SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, 2)`` and covariance ``(B, 2, 2)`` of x_t = α x_0 + σ ε for x_0 ~ N(MU, COV)."""
    alpha, sigma = sde.alpha_sigma(t.to(DT))
    return alpha[:, None] * MU, alpha[:, None, None] ** 2 * COV + sigma[:, None, None] ** 2 * torch.eye(2, dtype=DT)


def _true_score(sde: score.SDE):
    """∇ log p_t(x) = -V_t⁻¹ (x - α μ); one 2x2 inverse when the batch shares its time (the samplers)."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if (t == t[0]).all():
            mean, cov = _marginal(sde, t[:1])
            return -(x - mean) @ torch.linalg.inv(cov[0])  # V_t is symmetric
        mean, cov = _marginal(sde, t)
        return -torch.linalg.solve(cov, (x - mean).unsqueeze(-1)).squeeze(-1)
    return fn


def _log_normal(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


def _prior_draws(sde: score.SDE, n: int, seed: int) -> torch.Tensor:
    """Draws of the exact marginal at t = 1 (so only the sampler's error remains)."""
    mean, cov = _marginal(sde, torch.ones(1, dtype=DT))
    return mean + torch.randn(n, 2, dtype=DT, generator=_gen(seed)) @ torch.linalg.cholesky(cov[0]).T


def _se_mean(v: torch.Tensor) -> float:
    return (v.std() / math.sqrt(len(v))).item()


# --------------------------------------------------------------------------- 1. score matching on Gaussians


def test_denoising_score_matching_minimiser_is_the_noisy_score():
    """Minimise DSM over s(x) = a x + b (the loss is quadratic, so one Newton step from 0 is exact) at
    fixed σ for x ~ N(μ, s² I): a = -1/(s² + σ²), b = μ/(s² + σ²). Standard errors of least squares of
    the target -ε/σ on x̃: residual variance 1/σ² - 1/(s² + σ²), over N·D = 4e5 pairs: SE(a) ≈ 0.0025."""
    n, s, sig = 200_000, 1.2, 0.5
    x = MU + s * torch.randn(n, 2, dtype=DT, generator=_gen(0))
    noise = torch.randn(n, 2, dtype=DT, generator=_gen(1))
    sigma = torch.full((n,), sig, dtype=DT)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return score.denoising_score_matching_loss(lambda xt, _: theta[0] * xt + theta[1:], x, sigma, noise).mean()

    theta0 = torch.zeros(3, dtype=DT)
    grad = torch.autograd.functional.jacobian(loss, theta0)
    hess = torch.autograd.functional.hessian(loss, theta0)
    theta = theta0 - torch.linalg.solve(hess, grad)
    var_noisy = s ** 2 + sig ** 2
    resid = 1 / sig ** 2 - 1 / var_noisy
    se_a = math.sqrt(resid / (2 * n * var_noisy))
    se_b = math.sqrt(resid / n * (1 + (MU ** 2).max().item() / var_noisy))
    assert abs(theta[0].item() + 1 / var_noisy) < 5 * se_a, (theta, se_a)
    assert torch.allclose(theta[1:], MU / var_noisy, atol=5 * se_b), (theta, se_b)


def test_dsm_minus_noisy_esm_is_one_constant():
    """Vincent 2011: E[DSM(s)] - σ² E[ESM_{q_σ}(s)] = ½ D (1 - σ²/(s² + σ²)) for every s. The per-sample
    difference has mean that constant; we check it for two different score functions within 5 SE."""
    n, s, sig = 100_000, 1.0, 0.7
    x = MU + s * torch.randn(n, 2, dtype=DT, generator=_gen(2))
    noise = torch.randn(n, 2, dtype=DT, generator=_gen(3))
    sigma = torch.full((n,), sig, dtype=DT)
    x_noisy = x + sig * noise
    true = -(x_noisy - MU) / (s ** 2 + sig ** 2)
    const = 0.5 * 2 * (1 - sig ** 2 / (s ** 2 + sig ** 2))
    for fn in (lambda z: torch.zeros_like(z), lambda z: torch.sin(z) - 0.3 * z ** 2):
        dsm = score.denoising_score_matching_loss(lambda z, _, fn=fn: fn(z), x, sigma, noise)
        esm = sig ** 2 * score.explicit_score_matching_loss(fn(x_noisy), true)
        diff = dsm - esm
        assert abs(diff.mean().item() - const) < 5 * _se_mean(diff), (diff.mean(), const)


def _non_optimal_score(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor([[-0.8, 0.3], [0.5, -1.5]], dtype=x.dtype)
    return x @ m.T + 0.2 + 0.4 * torch.tanh(x)


def test_sliced_implicit_and_explicit_score_matching_agree_in_expectation():
    """Per sample: sliced - implicit has mean 0 (E[vᵀJv] = tr J, E[(vᵀs)²] = ‖s‖²), and
    implicit + ½‖∇log p‖² - explicit has mean 0 (Hyvärinen 2005, Theorem 1); each within 5 SE."""
    n = 40_000
    x = _data(n, 4)
    implicit = score.implicit_score_matching_loss(_non_optimal_score, x)
    true = -torch.linalg.solve(COV, (x - MU).T).T
    explicit = score.explicit_score_matching_loss(_non_optimal_score(x), true)
    hyv = implicit + 0.5 * (true ** 2).sum(1) - explicit
    assert abs(hyv.mean().item()) < 5 * _se_mean(hyv), (hyv.mean(), _se_mean(hyv))
    for vr in (False, True):
        sliced = score.sliced_score_matching_loss(_non_optimal_score, x, num_projections=4, variance_reduced=vr,
                                                  generator=_gen(5))
        d = sliced - implicit
        assert abs(d.mean().item()) < 5 * _se_mean(d), (vr, d.mean(), _se_mean(d))
    # many projections on a few points: close per point (the error falls like 1/sqrt(projections))
    few = x[:5]
    sliced = score.sliced_score_matching_loss(_non_optimal_score, few, num_projections=4000, generator=_gen(6))
    torch.testing.assert_close(sliced, score.implicit_score_matching_loss(_non_optimal_score, few), atol=0.2, rtol=0)


def test_langevin_dynamics_has_the_right_stationary_law():
    """x ~ N(μ, s² I) with its true score; step ε = 0.02. The Euler-Maruyama chain's exact stationary
    variance is s²/(1 - ε/(4 s²)) (0.5% above s²); after 1500 steps from 0 the start is forgotten
    (contraction (1 - ε/(2 s²))^1500 ≈ e^-15). 10 000 chains × 2 dims: SE(var) ≈ 1%, SE(mean) = 0.01."""
    s, eps, chains = 1.0, 0.02, 10_000
    x0 = torch.zeros(chains, 2, dtype=DT)
    x = score.langevin_dynamics(lambda z: -(z - MU) / s ** 2, x0, eps, 1500, generator=_gen(7))
    var = s ** 2 / (1 - eps / (4 * s ** 2))
    n = x.numel()
    assert ((x.mean(0) - MU).abs() < 5 * math.sqrt(var / chains)).all(), x.mean(0)
    assert abs(x.var(0).mean().item() - var) < 5 * var * math.sqrt(2 / n), x.var(0)


@pytest.mark.parametrize("name", list(ALL_SDES))
def test_reverse_sde_samplers_return_the_data(name):
    """From the exact marginal at t = 1 with the analytic score: Euler-Maruyama and predictor-corrector
    (1000 steps) and the probability-flow ODE give x_0 ~ N(μ, Σ). 8000 draws: SE(mean) ≈ 0.011, the
    relative SE of a variance ≈ 1.6%; the SDE samplers' discretisation bias (measured ≤ 1.5% of the
    variance at 1000 steps) stays well inside 5 SE + 2%."""
    sde = ALL_SDES[name]
    fn = _true_score(sde)
    n = 8000
    x1 = _prior_draws(sde, n, 8)
    samples = {"em": score.euler_maruyama_sample(sde, fn, x1, 1000, generator=_gen(9)),
               "pc": score.predictor_corrector_sample(sde, fn, x1, 1000, generator=_gen(10))}
    ode, nfe = score.probability_flow_sample(sde, fn, x1, denoise=True)
    samples["ode"] = ode
    assert nfe > 0
    for key, x in samples.items():
        se_mean = (COV.diagonal() / n).sqrt()
        assert ((x.mean(0) - MU).abs() < 5 * se_mean).all(), (key, x.mean(0))
        cov = torch.cov(x.T)
        tol = 5 * COV.diagonal() * math.sqrt(2 / n) + 0.02 * COV.diagonal()
        assert ((cov.diagonal() - COV.diagonal()).abs() < tol).all(), (key, cov)
        assert abs(cov[0, 1] - COV[0, 1]) < 0.06, (key, cov)


@pytest.mark.parametrize("name", list(ALL_SDES))
def test_probability_flow_is_the_exact_gaussian_map(name):
    """For Gaussian data the flow is linear: x(t_min) = m_min + V_min^½ V_1^-½ (x(1) - m_1), since V_t =
    α² Σ + σ² I all commute. dopri5 at rtol = atol = 1e-5 (from the default): agreement to 1e-4."""
    sde = ALL_SDES[name]
    x1 = _prior_draws(sde, 200, 11)
    out, _ = score.probability_flow_sample(sde, _true_score(sde), x1)
    m1, _ = _marginal(sde, torch.ones(1, dtype=DT))
    m0, _ = _marginal(sde, torch.full((1,), sde.t_min, dtype=DT))
    lam, q = torch.linalg.eigh(COV)
    a1, s1 = (x.item() for x in sde.alpha_sigma(torch.ones(1, dtype=DT)))
    a0, s0 = (x.item() for x in sde.alpha_sigma(torch.full((1,), sde.t_min, dtype=DT)))
    scale = q @ torch.diag(((a0 ** 2 * lam + s0 ** 2) / (a1 ** 2 * lam + s1 ** 2)).sqrt()) @ q.T
    expected = m0 + (x1 - m1) @ scale.T
    torch.testing.assert_close(out, expected, atol=1e-4 * (1 + x1.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("name", list(ALL_SDES))
def test_probability_flow_log_prob_is_the_exact_density(name):
    """log p_{t_min}(x) by the ODE with the exact marginal at t = 1 as prior: exact trace within 1e-3 nats
    (dopri5, rtol = atol = 1e-5; measured < 1e-4). Hutchinson (Rademacher, fixed per point over the
    solve) is unbiased: the mean error over 2000 points lies within 5 of its standard errors."""
    sde = ALL_SDES[name]
    fn = _true_score(sde)
    m1, v1 = _marginal(sde, torch.ones(1, dtype=DT))
    prior = lambda z: _log_normal(z, m1[0], v1[0])
    m0, v0 = _marginal(sde, torch.full((1,), sde.t_min, dtype=DT))
    x = _data(50, 12)
    exact = _log_normal(x, m0[0], v0[0])
    log_p, nfe = score.probability_flow_log_prob(sde, fn, x, "exact", prior_log_prob=prior)
    assert nfe > 0 and log_p.shape == (50,)
    torch.testing.assert_close(log_p, exact, atol=1e-3, rtol=0)
    x = _data(2000, 13)
    exact = _log_normal(x, m0[0], v0[0])
    hutch, _ = score.probability_flow_log_prob(sde, fn, x, "rademacher", generator=_gen(14), prior_log_prob=prior)
    err = hutch - exact
    assert err.std() > 1e-3  # the estimate is random (Σ is not diagonal) ...
    assert abs(err.mean().item()) < 5 * _se_mean(err), (err.mean(), _se_mean(err))  # ... and unbiased


# --------------------------------------------------------------------------- 2. SDE consistency


def _d_dt(fn, t: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central difference in float64 (error O(h²) + rounding 1e-16/h ≈ 1e-10)."""
    return (fn(t + h) - fn(t - h)) / (2 * h)


@pytest.mark.parametrize("make", [score.VPSDE, score.SubVPSDE, score.VESDE,
                                  lambda: score.GammaSDE(score.LinearGamma().double()),
                                  lambda: score.GammaSDE(score.MonotoneGamma(hidden=64).double())],
                         ids=["vp", "subvp", "ve", "linear_gamma", "monotone_gamma"])
def test_sde_drift_and_diffusion_match_the_marginals(make):
    """f = d log α/dt and g² = dσ²/dt - 2 f σ² (Song et al. 2021, App. B): autograd on t for the closed-form
    SDEs; GammaSDE computes γ from a detached t (its γ' by its own autograd), so central differences
    there. float64; agreement to 1e-6 relative."""
    sde = make()
    t = torch.linspace(0.02, 0.98, 25, dtype=DT)
    f, g2 = sde.f_g2(t)
    if isinstance(sde, score.GammaSDE):
        with torch.no_grad():
            dlog_alpha = _d_dt(lambda u: sde.alpha_sigma(u)[0].log(), t)
            dvar = _d_dt(lambda u: sde.alpha_sigma(u)[1] ** 2, t)
    else:
        tt = t.clone().requires_grad_(True)
        alpha, sigma = sde.alpha_sigma(tt)
        dlog_alpha = (torch.autograd.grad(alpha.log().sum(), tt, retain_graph=True)[0]
                      if alpha.requires_grad else torch.zeros_like(t))
        dvar = torch.autograd.grad((sigma ** 2).sum(), tt)[0]
    sigma = sde.alpha_sigma(t)[1].detach()
    torch.testing.assert_close(f.detach(), dlog_alpha, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g2.detach(), dvar - 2 * f.detach() * sigma ** 2, rtol=1e-6, atol=1e-6)


def test_monotone_gamma_is_increasing_with_its_endpoints():
    gamma = score.MonotoneGamma(-7.0, 4.0, hidden=32).double()
    with torch.no_grad():
        gamma.gamma_0.fill_(-6.5)
        gamma.log_range.fill_(math.log(9.0))
    t = torch.linspace(0, 1, 501, dtype=DT)
    g, dg = gamma.gamma_and_derivative(t)
    assert (g[1:] > g[:-1]).all() and (dg > 0).all()
    assert g[0].item() == pytest.approx(-6.5, abs=1e-12) and g[-1].item() == pytest.approx(2.5, abs=1e-12)
    torch.testing.assert_close(dg[1:-1].detach(), _d_dt(lambda u: gamma(u), t[1:-1]).detach(), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- 3. DDPM is a discretised VP SDE


def test_vp_discrete_betas_are_ddpms_linear_schedule():
    torch.testing.assert_close(score.VPSDE().discrete_betas(1000), diffusion.NoiseSchedule.linear(1000).betas,
                               rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="num_steps"):
        score.VPSDE().discrete_betas(0)


def test_ddpm_ancestral_step_tends_to_the_reverse_vp_euler_maruyama_step():
    """At DDPM step i (t_i = (i-1)/(N-1), β_i = β(t_i)/N): the ancestral mean (posterior mean at x̂_0 from ε̂
    of the true score of q(x_i)) minus the reverse-SDE Euler-Maruyama mean with Δt = 1/N, over Δt, is
    O(1/N): N × that ratio is the same within 10% for N = 100, 1000, 10000. The variances β_i and
    g(t_i)² Δt are equal."""
    sde = score.VPSDE()
    x = torch.linspace(-3, 3, 7, dtype=DT)[:, None] * torch.tensor([1.0, -0.5], dtype=DT) + 0.2
    scaled = []
    for n in (100, 1000, 10_000):
        schedule = diffusion.NoiseSchedule(sde.discrete_betas(n))
        i = n // 2
        t_cont = torch.full((len(x),), (i - 1) / (n - 1), dtype=DT)
        ab = schedule.alpha_bar[i - 1].item()
        t_int = torch.full((len(x),), i)
        # the true score of DDPM's marginal q(x_i) = N(sqrt(ᾱ) μ, ᾱ Σ + (1 - ᾱ) I)
        s_ddpm = -torch.linalg.solve(ab * COV + (1 - ab) * torch.eye(2, dtype=DT), (x - math.sqrt(ab) * MU).T).T
        eps = score.eps_from_score(s_ddpm, math.sqrt(1 - ab))
        x0_hat = diffusion.predict_x0_from_eps(schedule, x, t_int, eps)
        ddpm_mean, _, _ = diffusion.q_posterior_mean_variance(schedule, x0_hat, x, t_int)
        em_mean = x - score.reverse_drift(sde, _true_score(sde), x, t_cont) / n
        scaled.append(n * ((ddpm_mean - em_mean).abs().max().item() * n))
        assert sde.f_g2(t_cont)[1][0].item() / n == pytest.approx(schedule.betas[i - 1].item(), rel=1e-12)
    assert scaled[0] / scaled[1] == pytest.approx(1, abs=0.1) and scaled[1] / scaled[2] == pytest.approx(1, abs=0.1), scaled


# --------------------------------------------------------------------------- 4. Tweedie, ε <-> score


def test_tweedie_is_the_posterior_mean_for_gaussian_data():
    """E[x_0 | x_t] = μ + α Σ (α² Σ + σ² I)⁻¹ (x_t - α μ), with per-example α, σ ``(B,)`` and floats."""
    sde = score.VPSDE()
    t = torch.linspace(0.05, 0.95, 64, dtype=DT)
    alpha, sigma = sde.alpha_sigma(t)
    xt = torch.randn(64, 2, dtype=DT, generator=_gen(15))
    mean, cov = _marginal(sde, t)
    s = _true_score(sde)(xt, t)
    expected = MU + alpha[:, None] * torch.linalg.solve(cov, (xt - mean).unsqueeze(-1)).squeeze(-1) @ COV
    torch.testing.assert_close(score.tweedie_denoise(xt, s, alpha, sigma), expected, rtol=1e-10, atol=1e-10)
    one = score.tweedie_denoise(xt[:1], s[:1], alpha[0].item(), sigma[0].item())
    torch.testing.assert_close(one, expected[:1], rtol=1e-10, atol=1e-10)


def test_tweedie_is_the_posterior_mean_by_monte_carlo():
    """E[(x_0 - tweedie(x_t)) h(x_t)] = 0 for any h (the posterior mean is the projection): h = 1, x_t."""
    n, a, sg = 100_000, 0.8, 0.6
    x0 = _data(n, 16)
    xt = a * x0 + sg * torch.randn(n, 2, dtype=DT, generator=_gen(17))
    sde_cov = a ** 2 * COV + sg ** 2 * torch.eye(2, dtype=DT)
    s = -torch.linalg.solve(sde_cov, (xt - a * MU).T).T
    r = x0 - score.tweedie_denoise(xt, s, a, sg)
    for h in (torch.ones(n, 1, dtype=DT), xt[:, :1], xt[:, 1:]):
        v = (r * h).flatten()
        assert abs(v.mean().item()) < 5 * _se_mean(v)


def test_score_and_eps_round_trip():
    eps = torch.randn(4, 3, 5, 5, dtype=DT)
    for sigma in (0.3, torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=DT)):
        s = score.score_from_eps(eps, sigma)
        torch.testing.assert_close(score.eps_from_score(s, sigma), eps, rtol=1e-14, atol=1e-14)
        expect = -eps / (sigma if isinstance(sigma, float) else sigma[:, None, None, None])
        torch.testing.assert_close(s, expect)


# --------------------------------------------------------------------------- 5. VDM


class _OptimalEps(nn.Module):
    """ε̂ = E[ε | z_γ] for x ~ N(0, s² I) scaled by a learnable ``w`` (w = 1: optimal); recovers γ from c."""

    def __init__(self, gamma_range: tuple[float, float], s: float = 0.8, w: float = 1.0) -> None:
        super().__init__()
        self.lo, self.hi, self.s = *gamma_range, s
        self.w = nn.Parameter(torch.tensor(w, dtype=DT))

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma = self.lo + c * (self.hi - self.lo) / 1000
        a2, s2 = torch.sigmoid(-gamma)[:, None], torch.sigmoid(gamma)[:, None]
        return self.w * s2.sqrt() * z / (a2 * self.s ** 2 + s2)


def _vdm(schedule: str, lo: float = -6.0, hi: float = 6.0, w: float = 1.0, **kw) -> score.VDM:
    model = score.VDM(_OptimalEps((lo, hi), w=w), (2,), num_levels=None, schedule=schedule, gamma_min=lo,
                      gamma_max=hi, **kw).double()
    if schedule == "learned":
        torch.manual_seed(3)
        with torch.no_grad():  # a clearly non-linear shape (steep sigmoids at h in [0.14, 0.35]), the endpoints (lo, hi)
            gamma = model.gamma
            gamma.l1.raw.fill_(0.0)  # h = l1(t) = log(2) t
            gamma.l2.raw.fill_(20.0)  # slopes ≈ 20
            gamma.l2.bias.copy_(-20 * math.log(2) * (0.2 + 0.3 * torch.rand_like(gamma.l2.bias)))
            gamma.l3.raw.fill_(0.0)
            model.gamma.gamma_0.fill_(lo)
            model.gamma.log_range.fill_(math.log(hi - lo))
    return model


def _l_inf(s: float, lo: float, hi: float, d: int = 2) -> float:
    """½ D ∫ s²/(s² + e^γ) dγ from lo to hi: the continuous loss of the optimal ε̂ for N(0, s² I)."""
    prim = lambda g: g - math.log(s ** 2 + math.exp(g))
    return 0.5 * d * (prim(hi) - prim(lo))


def test_vdm_continuous_loss_does_not_depend_on_the_schedule():
    """Kingma et al. 2021, Sec. 5.1: with the optimal ε̂ both schedules give L_∞ = ½ D ∫ s²/(s² + e^γ) dγ.
    Each estimate: 8 × 4096 points; within 5 SE of the closed form and of each other."""
    x = 0.8 * torch.randn(4096, 2, dtype=DT, generator=_gen(18))
    linear, learned = _vdm("fixed"), _vdm("learned")
    t = torch.linspace(0, 1, 11, dtype=DT)
    assert (learned.gamma(t) - linear.gamma(t)).abs().max() > 0.5  # different shapes ...
    torch.testing.assert_close(learned.gamma(t[[0, -1]]), linear.gamma(t[[0, -1]]))  # ... same endpoints
    g = _gen(19)
    with torch.no_grad():
        est = {name: torch.cat([m.diffusion_loss(x, generator=g) for _ in range(8)])
               for name, m in (("linear", linear), ("learned", learned))}
    exact = _l_inf(0.8, -6.0, 6.0)
    for name, v in est.items():
        assert abs(v.mean().item() - exact) < 5 * _se_mean(v), (name, v.mean(), exact)
    se = math.hypot(_se_mean(est["linear"]), _se_mean(est["learned"]))
    assert abs(est["linear"].mean().item() - est["learned"].mean().item()) < 5 * se


def test_vdm_discrete_bound_lies_above_the_continuous_one():
    """T = 10: the T-step loss ½ Σ_i (e^{γ_i - γ_{i-1}} - 1) D s²/(s² + e^{γ_i}) exceeds L_∞ (by 4.0 nats here: 9.6 against 5.6);
    the MC estimates (8 × 4096 draws) match both closed forms within 5 SE and the gap is > 10 SE."""
    x = 0.8 * torch.randn(4096, 2, dtype=DT, generator=_gen(20))
    model = _vdm("fixed")
    g = _gen(21)
    with torch.no_grad():
        cont = torch.cat([model.diffusion_loss(x, generator=g) for _ in range(8)])
        disc = torch.cat([model.discrete_diffusion_loss(x, 10, generator=g) for _ in range(8)])
    gam = [-6.0 + 12.0 * i / 10 for i in range(11)]
    exact_disc = sum(0.5 * math.expm1(gam[i] - gam[i - 1]) * 2 * 0.64 / (0.64 + math.exp(gam[i]))
                     for i in range(1, 11))
    exact_cont = _l_inf(0.8, -6.0, 6.0)
    assert exact_disc > exact_cont
    assert abs(disc.mean().item() - exact_disc) < 5 * _se_mean(disc), (disc.mean(), exact_disc)
    assert abs(cont.mean().item() - exact_cont) < 5 * _se_mean(cont), (cont.mean(), exact_cont)
    assert disc.mean() - cont.mean() > 10 * math.hypot(_se_mean(disc), _se_mean(cont))


def test_vdm_schedule_shape_gets_the_gradient_of_the_squared_loss():
    """App. I.2: with the same draws, training_loss(batch).sum() gives the shape (l1, l2, l3) the gradient
    of Σ L_diffusion², and γ_0, log_range and the network the gradient of the bound."""
    x = 0.8 * torch.randn(64, 2, dtype=DT, generator=_gen(22))
    model = _vdm("learned", w=0.9)
    shape = [p for n, p in model.named_parameters() if n.startswith(("gamma.l1", "gamma.l2", "gamma.l3"))]
    ends = [model.gamma.gamma_0, model.gamma.log_range, model.net.w]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(loss, shape + ends)

    torch.manual_seed(5)
    loss = model.training_loss(x)
    g_train = grads(loss.sum())
    torch.manual_seed(5)
    g_square = grads((model.diffusion_loss(x) ** 2).sum())
    torch.manual_seed(5)
    bound = model.bound_terms(x)["total"]
    torch.testing.assert_close(loss, bound)  # the same draws: the same values
    g_bound = grads(bound.sum())
    for a, b in zip(g_train[:len(shape)], g_square[:len(shape)]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert not all(torch.allclose(a, c) for a, c in zip(g_train[:len(shape)], g_bound[:len(shape)]))
    for a, c in zip(g_train[len(shape):], g_bound[len(shape):]):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- 6. the discrete decoder


def test_vdm_decoder_sums_to_one_over_every_image():
    """K = 3 levels, a 2-pixel image: the 9 images' probabilities Π_i p(y_i | z_0) sum to 1, and the
    reconstruction loss is -log of the probability of the given image under the same z_0."""
    model = score.VDM(nn.Linear(1, 1), (1, 1, 2), num_levels=3, schedule="fixed", gamma_min=-1.0, gamma_max=5.0)
    model = model.double()
    g0 = model.gamma(torch.zeros(1, dtype=DT))
    z0 = torch.randn(5, 1, 1, 2, dtype=DT, generator=_gen(23))
    logp = model.decoder_log_probs(z0, g0)
    assert logp.shape == (5, 1, 1, 2, 3)
    total = sum(torch.exp(logp[..., 0, 0, 0, a] + logp[..., 0, 0, 1, b]) for a, b in itertools.product(range(3), repeat=2))
    torch.testing.assert_close(total, torch.ones(5, dtype=DT), rtol=1e-12, atol=1e-12)
    y = torch.tensor([[[[0.0, 2.0]]], [[[1.0, 1.0]]]], dtype=DT)
    x = model.to_unit(y)
    loss = model.reconstruction_loss(y, x, _gen(24))
    eps = torch.randn(x.shape, dtype=DT, generator=_gen(24))
    lp = model.decoder_log_probs(x + (0.5 * g0).exp() * eps, g0)
    expect = -(lp.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)).flatten(1).sum(1)
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- 7. bad input


def test_bad_input_raises_naming_the_problem():
    x = torch.randn(4, 2)
    fn = lambda z, s: -z
    with pytest.raises(ValueError, match="sigma"):
        score.denoising_score_matching_loss(fn, x, torch.tensor([0.1, 0.0, 0.2, 0.3]))
    with pytest.raises(ValueError, match="sigma"):
        score.score_from_eps(x, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        score.eps_from_score(x, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        score.tweedie_denoise(x, x, 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        score.tweedie_denoise(x, x[:2], 1.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        score.denoising_score_matching_loss(fn, torch.full((4, 2), float("nan")), torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        score.probability_flow_log_prob(score.VPSDE(), fn, torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match=r"sigma must be a tensor of shape \(4,\)"):
        score.denoising_score_matching_loss(fn, x, torch.ones(4, 1))
    with pytest.raises(ValueError, match="noise"):
        score.denoising_score_matching_loss(fn, x, torch.ones(4), noise=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="floating"):
        score.denoising_score_matching_loss(fn, torch.ones(4, 2, dtype=torch.long), torch.ones(4))
    with pytest.raises(TypeError, match="floating"):
        score.probability_flow_log_prob(score.VPSDE(), fn, torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="sde must be one of"):
        score.make_sde("vpsde")
    with pytest.raises(ValueError, match="trace"):
        score.probability_flow_log_prob(score.VPSDE(), fn, x, trace="hutchinson")
    with pytest.raises(ValueError, match="num_steps"):
        score.euler_maruyama_sample(score.VPSDE(), fn, x, 0)
    with pytest.raises(ValueError, match="snr"):
        score.predictor_corrector_sample(score.VPSDE(), fn, x, 2, snr=0.0)
    with pytest.raises(ValueError, match="step_size"):
        score.langevin_dynamics(lambda z: -z, x, -0.1, 3)
    with pytest.raises(ValueError, match="num_projections"):
        score.sliced_score_matching_loss(lambda z: -z, x, num_projections=0)
    with pytest.raises(ValueError, match="decreasing"):
        score.annealed_langevin_sample(fn, x, torch.tensor([1.0, 1.0, 0.1]))
    with pytest.raises(ValueError, match="decreasing"):
        score.NCSN(nn.Identity(), torch.tensor([0.1, 1.0]), (2,))
    with pytest.raises(ValueError, match="sigma_max > sigma_min"):
        score.geometric_sigmas(0.1, 1.0, 5)
    with pytest.raises(ValueError, match="beta_min"):
        score.VPSDE(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="sigma_min"):
        score.VESDE(sigma_min=0.0)
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        score.MonotoneGamma(1.0, -1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        score.VDM(nn.Identity(), (2,), schedule="cosine")
    with pytest.raises(TypeError, match="sde must be an SDE"):
        score.ScoreSDE(nn.Identity(), "vp", (2,))
    toy, digits = load_toy_data("8gaussians"), load_image_data("digits")
    for name in ("ncsn", "score_sde", "vdm"):
        with pytest.raises(TypeError, match="floating"):  # 2D points must be floats
            MODELS[name].build(toy).training_loss(toy.train[:4].long())
        images = MODELS[name].build(digits)
        bad = digits.train[:2].clone()
        bad[0, 0, 0, 0] = digits.num_levels
        with pytest.raises(ValueError, match=rf"\[0, {digits.num_levels - 1}\]"):
            images.training_loss(bad)
        if name != "ncsn":
            with pytest.raises(ValueError, match="sampler"):
                images.sample(2, "langevin")
        with pytest.raises(ValueError, match="n must be a positive integer"):
            images.sample(0)


# --------------------------------------------------------------------------- 8. the models


def test_ncsn_sigmas_start_at_the_largest_pairwise_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    sig = ncsn_sigmas(x, sigma_min=0.01, num_levels=6)
    assert sig.dtype == DT and len(sig) == 6 and (sig[1:] < sig[:-1]).all()
    assert sig[0].item() == pytest.approx(5.0) and sig[-1].item() == pytest.approx(0.01)
    ratios = sig[1:] / sig[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand(5))  # geometric


@pytest.mark.parametrize("name", ["ncsn", "score_sde", "vdm"])
def test_score_models_train_and_sample(name):
    """``training_loss`` is ``(B,)``, finite, and backpropagates to every parameter; samples have the
    event's shape, on the digits (levels mapped to [-1, 1]) and on 2D points."""
    spec = MODELS[name]
    for d in (load_image_data("digits"), load_toy_data("8gaussians")):
        model = spec.build(d)
        batch = d.train[:8]
        loss = model.training_loss(batch)
        assert loss.shape == (8,) and torch.isfinite(loss).all()
        loss.mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.eval()
        shape = (3, *batch.shape[1:])
        g = _gen(25)
        if name == "ncsn":
            draws = [model.sample(3, generator=g, steps_per_level=2)]
        else:
            draws = [model.sample(3, s, generator=g, num_steps=3) for s in ("euler_maruyama", "predictor_corrector")]
            if name == "vdm":
                draws.append(model.sample(3, "ancestral", generator=g, num_steps=3))
            if batch.dim() == 2:  # the adaptive ODE on the 2D data only (the untrained UNet makes it stiff)
                draws.append(model.sample(3, "ode", generator=g))
        for x in draws:
            assert x.shape == shape and torch.isfinite(x).all()
            if len(shape) > 2 and name == "vdm":  # the decoder's most likely level, in [-1, 1]
                assert x.abs().max() <= 1
        if name != "ncsn" and batch.dim() == 2:  # image nll: tests/test_device.py
            with torch.no_grad():
                nll = model.nll(batch)
            assert nll.shape == (8,) and torch.isfinite(nll).all()


# --------------------------------------------------------------------------- 9. the CLI


@pytest.mark.slow
def test_cli_trains_vdm(tmp_path):
    """The digits (the bound and its terms, bits per dimension) and 8gaussians (the ODE's NLL); ~15 s."""
    assert main(["train", "vdm", "--epochs", "1", "--fast", "--no-progress", "--out", str(tmp_path / "d")]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    for key in ("test_nll_nats", "test_bits_per_dim", "bound_prior_nats", "bound_diffusion_nats",
                "bound_reconstruction_nats", "discrete_bound_nats", "gamma_0", "gamma_1"):
        assert key in m, key
    terms = m["bound_prior_nats"] + m["bound_diffusion_nats"] + m["bound_reconstruction_nats"]
    assert m["test_nll_nats"] == pytest.approx(terms, rel=1e-6)
    assert m["test_bits_per_dim"] == pytest.approx(m["test_nll_nats"] / (64 * math.log(2)))
    assert m["gamma_0"] < m["gamma_1"]
    assert main(["train", "vdm", "--data", "8gaussians", "--epochs", "1", "--fast", "--no-progress",
                 "--out", str(tmp_path / "g")]) == 0
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert math.isfinite(m["ode_nll_nats"]) and m["ode_nfe"] > 0 and math.isfinite(m["test_nll_nats"])


def test_cli_trains_score_sde_and_ncsn_on_8gaussians(tmp_path):
    assert main(["train", "score_sde", "--sde", "ve", "--data", "8gaussians", "--epochs", "1", "--fast",
                 "--no-progress", "--out", str(tmp_path / "s")]) == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["sde"] == "VESDE" and m["ode_nfe"] > 0 and m["test_nll_nats"] == m["ode_nll_nats"]
    for s in score.SAMPLERS:
        assert math.isfinite(m[f"sample_distance_{s}"])
    assert main(["train", "ncsn", "--data", "8gaussians", "--epochs", "1", "--fast", "--no-progress",
                 "--out", str(tmp_path / "n")]) == 0
    m = json.loads((tmp_path / "n" / "metrics.json").read_text())
    assert "test_nll_nats" not in m and m["noise_levels"] >= 2 and m["sigma_max"] > m["sigma_min"]
    assert 0 < m["data_distance"] and math.isfinite(m["sample_distance_langevin"])


def test_lecture_mechanism_cells_compute_what_dgmlib_computes():
    """Lecture 11 shows denoising score matching, annealed Langevin sampling, the reverse SDE's
    Euler–Maruyama step and VDM's continuous loss inline (code cells tagged ``mechanism``). Run exactly
    those cells and compare them with dgmlib on the same inputs and random draws."""
    from nbhelpers import ROOT, run_tagged_cells

    from dgmlib import diffusion
    from dgmlib import score as S

    ns = run_tagged_cells(ROOT / "lectures" / "11_score_sde.ipynb", "mechanism")
    torch.manual_seed(0)
    net = diffusion.TimeMLP(2, 16, 2, 8)

    def score_fn(x, t):
        return net(x, t) - x

    # denoising score matching, with the same noise
    x, sigma, noise = torch.randn(32, 2), torch.rand(32) + 0.1, torch.randn(32, 2)
    torch.testing.assert_close(ns["dsm_loss"](score_fn, x, sigma, noise),
                               S.denoising_score_matching_loss(score_fn, x, sigma, noise), rtol=0, atol=0)
    # annealed Langevin: one step, and the whole loop with the same generator
    s = score_fn(x, sigma)
    torch.testing.assert_close(ns["annealed_step"](s, x, 0.5, 0.01, 2e-5, noise),
                               S.annealed_langevin_step(s, x, 0.5, 0.01, 2e-5, noise), rtol=0, atol=0)
    sigmas = S.geometric_sigmas(3.0, 0.05, 4)
    got = ns["annealed_langevin"](score_fn, x, sigmas, 1e-3, 5, generator=torch.Generator().manual_seed(1))
    want = S.annealed_langevin_sample(score_fn, x, sigmas, 1e-3, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the reverse SDE by Euler–Maruyama, every SDE, same generator, no final denoising
    for name in S.SDES:
        sde = S.make_sde(name)
        z = sde.prior_sample((16, 2), "cpu")
        got = ns["reverse_em"](sde, score_fn, z, 20, generator=torch.Generator().manual_seed(2))
        want = S.euler_maruyama_sample(sde, score_fn, z, 20, denoise=False, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
    # VDM's continuous loss at fixed t and ε, for the linear and the learned schedule
    for schedule in S.VDM.SCHEDULES:
        model = S.VDM(diffusion.TimeMLP(2, 16, 2, 8), (2,), schedule=schedule)
        t = torch.rand(32)
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # the draw diffusion_loss makes
        got = ns["vdm_diffusion_loss"](model.eps, model.gamma, x, t, eps)
        want = model.diffusion_loss(x, t, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_predictor_corrector_step_size_uses_one_minus_beta():
    """Algorithm 5's corrector step is ε = 2 α_i (r ‖z‖ / ‖s‖)² with α_i = 1 - β_i = α(t)² / α(t')² < 1 for a
    step from t down to t'; one predictor and one corrector step replayed by hand with the same draws."""
    sde, snr = score.VPSDE(), 0.16
    x = torch.ones(4, 2, dtype=DT)
    const = torch.tensor([0.3, -0.2], dtype=DT)

    def score_fn(y, t):
        return const.expand_as(y)

    got = score.predictor_corrector_sample(sde, score_fn, x, 2, snr=snr, denoise=False,
                                           generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    times = torch.linspace(1.0, sde.t_min, 3, dtype=DT)
    y = x
    for i in range(2):
        t, t_next = times[i].expand(4), times[i + 1].expand(4)
        dt = float(times[i] - times[i + 1])
        f, g2 = sde.f_g2(t)
        y = y - (f[:, None] * y - g2[:, None] * const) * dt + (g2 * dt).sqrt()[:, None] * torch.randn(y.shape, generator=g, dtype=DT)
        alpha_i = (sde.alpha_sigma(t)[0] / sde.alpha_sigma(t_next)[0]) ** 2
        assert (alpha_i < 1).all()
        z = torch.randn(y.shape, generator=g, dtype=DT)
        step = 2 * alpha_i * (snr * z.norm(dim=1).mean() / const.norm()) ** 2
        y = y + step[:, None] * const + (2 * step).sqrt()[:, None] * z
    torch.testing.assert_close(got, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", score.SDES)
def test_likelihood_weighting_samples_t_uniformly_in_log_snr(name):
    """ScoreSDE(weighting="likelihood"): γ(t) = log(σ²/α²) is inverted by bisection, and with a network that
    predicts ε̂ = 0 the loss ½ (γ(1) - γ(t_min)) ‖ε‖² has mean ½ (γ(1) - γ(t_min)) D, the weight g²/σ² = γ'(t)
    integrated over [t_min, 1] (Song, Durkan et al. 2021)."""
    class Zero(nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    model = score.ScoreSDE(Zero(), score.make_sde(name), (2,), weighting="likelihood").double()
    gamma = torch.linspace(model._log_snr_ends[0] + 0.01, model._log_snr_ends[1] - 0.01, 101, dtype=DT)
    torch.testing.assert_close(model.log_snr(model.log_snr_inverse(gamma)), gamma, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    loss = model.training_loss(torch.randn(20_000, 2, dtype=DT))
    expected = 0.5 * (model._log_snr_ends[1] - model._log_snr_ends[0]) * 2
    assert abs(loss.mean().item() - expected) < 5 * loss.std().item() / math.sqrt(len(loss))
    with pytest.raises(ValueError, match="weighting"):
        score.ScoreSDE(Zero(), score.make_sde(name), (2,), weighting="uniform")
