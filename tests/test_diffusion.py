"""DDPM (dgmlib.diffusion): schedules, the forward process, the posterior, the bound, the samplers.

Theorems checked (lecture 10, Ho et al. 2020): the closed form of q(x_t | x_0) (Eq. 4), the
posterior q(x_{t-1} | x_t, x_0) is Bayes' rule (Eq. 6-7), q(x_T | x_0) ≈ N(0, I), the bound's
terms add up (Eq. 5), and ancestral / DDIM sampling with the exact ε recovers the data.

Improved DDPM (Nichol & Dhariwal 2021): the learned variances interpolate between β_t and β̃_t (Eq. 15),
L_hybrid's L_vlb does not train the mean (Eq. 16, Sec. 3.1), importance sampling of t (Eq. 18) is uniform
until the history is full, then follows sqrt(E[L_t²]), and weighting by 1/p_t keeps L_vlb unbiased.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dgmlib import data, diffusion
from dgmlib.diffusion import DDPM, NoiseSchedule


@pytest.mark.parametrize("make", [lambda: NoiseSchedule.linear(1000), lambda: NoiseSchedule.linear(50),
                                  lambda: NoiseSchedule.cosine(1000), lambda: NoiseSchedule.cosine(20)])
def test_schedule_is_float64_monotone_and_consistent(make):
    s = make()
    assert s.betas.dtype == torch.float64 and len(s.alpha_bar) == s.T
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all() and 0 < s.alpha_bar[-1] < s.alpha_bar[0] < 1
    torch.testing.assert_close(s.alpha_bar, torch.cumprod(1 - s.betas, 0))
    assert s.alpha_bar_prev[0] == 1 and torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1])
    assert s.posterior_variance[0] == 0 and torch.isfinite(s.posterior_log_variance_clipped).all()
    assert (s.posterior_variance[1:] <= s.betas[1:]).all()  # β̃_t <= β_t


def test_linear_schedule_is_the_papers():
    s = NoiseSchedule.linear(1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)


def test_q_x_T_is_close_to_standard_normal():
    # KL(q(x_T | x_0) || N(0, I)) per dimension, for the extreme pixels x_0 = ±1
    for schedule in (NoiseSchedule.linear(1000), NoiseSchedule.cosine(1000)):
        x0 = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        m, v = diffusion.q_mean_variance(schedule, x0, torch.tensor([1000, 1000]))
        kl = diffusion.normal_kl(m, v.log(), torch.zeros_like(m), torch.zeros_like(m))
        assert kl.max().item() < 1e-4, kl  # linear: 2.0e-5 nats per dimension; cosine: ~1e-9


def test_q_sample_moments_match_the_closed_form_and_the_chain():
    s = NoiseSchedule.linear(100)
    n, t = 200_000, 37
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    xt = diffusion.q_sample(s, x0, torch.full((n,), t), generator=torch.Generator().manual_seed(0))
    ab = s.alpha_bar[t - 1].item()
    se_mean, se_var = math.sqrt((1 - ab) / n), (1 - ab) * math.sqrt(2 / n)
    assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 4 * se_mean
    assert abs(xt.var().item() - (1 - ab)) < 4 * se_var
    # the same moments by running the chain q(x_t | x_{t-1}) step by step (Eq. 2)
    g = torch.Generator().manual_seed(1)
    x = x0.clone()
    for k in range(t):
        x = (1 - s.betas[k]).sqrt() * x + s.betas[k].sqrt() * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert abs(x.mean().item() - math.sqrt(ab) * 0.7) < 4 * se_mean
    assert abs(x.var().item() - (1 - ab)) < 4 * se_var


def test_posterior_is_bayes_rule():
    s = NoiseSchedule.cosine(30)
    g = torch.Generator().manual_seed(2)
    x0, xt = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([2, 5, 10, 17, 29, 30])
    mean, var, log_var = diffusion.q_posterior_mean_variance(s, x0, xt, t)
    # prior x_{t-1} | x_0 ~ N(sqrt(ab') x0, 1 - ab'); likelihood x_t | x_{t-1} ~ N(sqrt(a) x_{t-1}, b)
    ab_prev, a, b = s.alpha_bar_prev[t - 1, None], s.alphas[t - 1, None], s.betas[t - 1, None]
    precision = 1 / (1 - ab_prev) + a / b
    bayes_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + a.sqrt() * xt / b) / precision
    torch.testing.assert_close(mean, bayes_mean)
    torch.testing.assert_close(var, 1 / precision)
    torch.testing.assert_close(log_var, var.log())
    # and the ε-form of Algorithm 2 equals μ̃ at the x_0 implied by ε
    eps = diffusion.predict_eps_from_x0(s, xt, t, x0)
    algorithm2 = (xt - b / (1 - s.alpha_bar[t - 1, None]).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(mean, algorithm2)


def test_discretized_gaussian_sums_to_one():
    K = 17
    y = torch.arange(K).reshape(K, 1)
    for mean, log_scale in [(0.0, -2.0), (0.93, -5.0), (-1.4, 0.5), (0.2, -20.0)]:
        logp = diffusion.discretized_gaussian_log_prob(y, torch.tensor(mean), torch.tensor(log_scale), K)
        assert torch.isfinite(logp).all()
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


class _Oracle(nn.Module):
    """The exact ε-prediction E[ε | x_t] for Gaussian data N(m, s² I): a perfect network."""

    def __init__(self, schedule: NoiseSchedule, m: float, s: float) -> None:
        super().__init__()
        self.schedule, self.m, self.s = schedule, m, s
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_t, t):
        ab = self.schedule.at(self.schedule.alpha_bar, t, x_t)
        # x_t = sqrt(ab) x0 + sqrt(1 - ab) ε with x0 ~ N(m, s²): E[ε | x_t] = sqrt(1 - ab)(x_t - sqrt(ab) m) / Var[x_t]
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * self.m) / (ab * self.s ** 2 + 1 - ab)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ancestral_sampling_with_exact_eps_recovers_gaussian_data(variance):
    s = NoiseSchedule.linear(1000)
    model = DDPM(_Oracle(s, 1.5, 0.5), s, (2,))
    x = model.sample(20_000, variance=variance, generator=torch.Generator().manual_seed(3))
    assert x.mean().item() == pytest.approx(1.5, abs=0.02)
    assert x.std().item() == pytest.approx(0.5, abs=0.02)


def test_single_point_data_and_ddim():
    s = NoiseSchedule.cosine(200)
    point = DDPM(_Oracle(s, -0.8, 1e-4), s, (2,))  # data = one point (s -> 0)
    x = point.sample(500, generator=torch.Generator().manual_seed(4))
    assert (x + 0.8).abs().max().item() < 0.02
    assert (point.ddim_sample(500, steps=20, generator=torch.Generator().manual_seed(5)) + 0.8).abs().max().item() < 0.02
    gauss = DDPM(_Oracle(s, 1.0, 0.7), s, (2,))
    x = gauss.ddim_sample(20_000, steps=50, generator=torch.Generator().manual_seed(6))
    assert x.mean().item() == pytest.approx(1.0, abs=0.02) and x.std().item() == pytest.approx(0.7, abs=0.03)
    # L_simple is zero for the exact ε on single-point data
    assert point.training_loss(torch.full((64, 2), -0.8, dtype=torch.float64)).max().item() < 1e-6


def _tiny_image_model(prediction: str = "eps", T: int = 25) -> DDPM:
    torch.manual_seed(0)
    return DDPM(diffusion.UNet(1, base=8, emb_dim=16), NoiseSchedule.linear(T), (1, 8, 8), prediction, num_levels=17)


def test_bound_terms_add_up_and_bound_is_sane():
    model = _tiny_image_model()
    y = data.load_digits("test")[:6]
    terms = model.bound_terms(y, torch.Generator().manual_seed(0))
    assert terms["diffusion"].shape == (6, 24) and (terms["diffusion"] >= -1e-5).all()
    torch.testing.assert_close(terms["total"], terms["prior"] + terms["diffusion"].sum(1) + terms["decoder"])
    assert (terms["prior"] >= 0).all() and (terms["decoder"] > 0).all()
    assert model.nll(y).shape == (6,)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_training_lowers_l_simple(prediction):
    from dgmlib.train import evaluate, fit

    torch.manual_seed(0)
    model = DDPM(diffusion.TimeMLP(2, 64, 2, 16), NoiseSchedule.linear(50), (2,), prediction)
    x = data.toy_2d("swissroll", 2000)
    before = evaluate(model, x, loss_fn=model.training_loss)
    fit(model, x, epochs=5, batch_size=128, lr=3e-3, loss_fn=model.training_loss, progress=False)
    assert evaluate(model, x, loss_fn=model.training_loss) < 0.8 * before


def test_networks_and_samplers_shapes():
    unet = diffusion.UNet(1, base=8, emb_dim=16)
    for hw in (8, 28):
        assert unet(torch.randn(3, 1, hw, hw), torch.tensor([1, 5, 9])).shape == (3, 1, hw, hw)
    model = _tiny_image_model("x0")
    assert model.sample(4).shape == (4, 1, 8, 8) and model.ddim_sample(4, steps=5).shape == (4, 1, 8, 8)
    x, kept = model.sample(2, keep=(25, 10, 0))
    assert set(kept) == {25, 10, 0} and torch.equal(kept[0], x)
    assert model.sample(3).abs().max() <= 1


def test_sliced_wasserstein():
    x = data.toy_2d("swissroll", 2000, seed=0)
    assert diffusion.sliced_wasserstein(x, x) == 0
    near = diffusion.sliced_wasserstein(x, data.toy_2d("swissroll", 2000, seed=1))
    far = diffusion.sliced_wasserstein(x, x + torch.tensor([1.0, 0.0]))
    assert near < 0.1 < far and 2 * diffusion.sliced_wasserstein(x, x * 1.1) == pytest.approx(
        diffusion.sliced_wasserstein(2 * x, 2 * x * 1.1))


@pytest.mark.parametrize("call, error, match", [
    (lambda: NoiseSchedule([0.1, 0.0]), ValueError, "strictly between 0 and 1"),
    (lambda: NoiseSchedule([0.1, 1.0]), ValueError, "strictly between 0 and 1"),
    (lambda: NoiseSchedule([0.1, float("nan")]), ValueError, "strictly between"),
    (lambda: NoiseSchedule([[0.1]]), ValueError, "1-D"),
    (lambda: NoiseSchedule.linear(0), ValueError, "positive integer"),
    (lambda: NoiseSchedule.linear(10, beta_end=2.0), ValueError, "strictly between"),
    (lambda: NoiseSchedule.linear(20), ValueError, "strictly between"),  # 1000/T scaling: beta_T = 1
    (lambda: diffusion.q_sample(NoiseSchedule.linear(50), torch.zeros(2, 2), torch.tensor([0, 1])), ValueError, "1 to T"),
    (lambda: diffusion.q_sample(NoiseSchedule.linear(50), torch.zeros(2, 2), torch.tensor([1, 51])), ValueError, "1 to T"),
    (lambda: diffusion.q_sample(NoiseSchedule.linear(50), torch.zeros(2, 2), torch.tensor([1.0, 2.0])), TypeError, "integer"),
    (lambda: diffusion.q_sample(NoiseSchedule.linear(50), torch.zeros(2, 2), torch.tensor([1, 2, 3])), ValueError, r"shape \(2,\)"),
    (lambda: diffusion.q_sample(NoiseSchedule.linear(50), torch.zeros(2, 2, dtype=torch.long), torch.tensor([1, 2])), TypeError, "floating"),
    (lambda: diffusion.q_sample(NoiseSchedule.linear(50), torch.zeros(2, 2), torch.tensor([1, 2]), noise=torch.zeros(2, 3)), ValueError, "noise"),
    (lambda: diffusion.q_posterior_mean_variance(NoiseSchedule.linear(50), torch.zeros(2, 2), torch.zeros(2, 3), torch.tensor([1, 2])), ValueError, "same shape"),
    (lambda: DDPM(nn.Linear(2, 2), NoiseSchedule.linear(50), (2,), prediction="v"), ValueError, "prediction"),
    (lambda: DDPM(nn.Linear(2, 2), [0.1], (2,)), TypeError, "NoiseSchedule"),
    (lambda: _tiny_image_model().ddim_sample(2, steps=26), ValueError, "steps"),
    (lambda: _tiny_image_model().p_sample(torch.zeros(1, 1, 8, 8), 0), ValueError, "1..25"),
    (lambda: _tiny_image_model().p_mean_variance(torch.zeros(1, 1, 8, 8), torch.tensor([1]), "sigma"), ValueError, "variance"),
    (lambda: _tiny_image_model().training_loss(torch.zeros(2, 1, 8, 8) + 20), ValueError, r"\[0, 16\]"),
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,)).nll(torch.zeros(2, 2)), ValueError, "num_levels"),
    (lambda: diffusion.UNet()(torch.zeros(1, 1, 7, 7), torch.tensor([1])), ValueError, "even"),
    (lambda: diffusion.sliced_wasserstein(torch.zeros(5, 2), torch.zeros(4, 2)), ValueError, "must both"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_the_two_reverse_variances_are_not_equivalent_for_gaussian_data():
    """Ho et al. Sec. 3.2: σ² = β_t is optimal for x0 ~ N(0, I) (β̃_t is optimal for a single point).
    With the exact mean for N(0, 1) data and T = 1000, Σ_t L_{t-1} is lower with β_t, by about
    0.465 nats per dimension (closed form: Σ_t ½ (r_t - 1 - log r_t), r_t = β_t / β̃_t)."""
    s = NoiseSchedule.linear(1000)
    model = DDPM(_Oracle(s, 0.0, 1.0), s, (1,))
    g = torch.Generator().manual_seed(0)
    n = 2000
    x0 = torch.randn(n, 1, generator=g, dtype=torch.float64).repeat_interleave(s.T - 1, dim=0)  # every t per point
    tt = torch.arange(2, s.T + 1).repeat(n)
    x_t = diffusion.q_sample(s, x0, tt, generator=g)
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(s, x0, x_t, tt)
    totals = {}
    for variance in ("beta", "beta_tilde"):
        mean, var, _ = model.p_mean_variance(x_t, tt, variance)
        totals[variance] = diffusion.normal_kl(true_mean, true_log_var, mean, var.log()).sum().item() / n
    r = (s.betas / s.posterior_variance)[1:]
    closed_form = (0.5 * (r - 1 - r.log())).sum().item()
    assert closed_form == pytest.approx(0.465, abs=0.001)
    assert totals["beta_tilde"] - totals["beta"] == pytest.approx(closed_form, abs=0.02)


def test_lecture_mechanism_cells_compute_what_dgmlib_computes():
    """Lecture 10 shows the time embedding, one U-Net block, Algorithm 1's loss and Algorithm 2's loop
    inline (code cells tagged ``mechanism``). Run exactly those cells and compare them with dgmlib on
    the same inputs and the same random draws: what a student reads is what dgmlib runs."""
    from nbhelpers import ROOT, run_tagged_cells

    ns = run_tagged_cells(ROOT / "lectures" / "10_diffusion.ipynb", "mechanism")
    # the sinusoidal time embedding, even and odd sizes
    t = torch.tensor([1, 2, 37, 500, 1000])
    for dim in (16, 17, 64):
        assert torch.equal(ns["sinusoidal_embedding"](t, dim), diffusion.timestep_embedding(t, dim))
    # one U-Net block: each of the U-Net's blocks' weights loaded into the inline ResBlock
    torch.manual_seed(0)
    unet = diffusion.UNet(1, base=8, emb_dim=16)
    emb = unet.time(diffusion.timestep_embedding(torch.tensor([3, 9]), 16))
    for name in ("down1", "mid1", "mid2", "up1"):
        ref = getattr(unet, name)
        block = ns["ResBlock"](ref.conv1.in_channels, ref.conv1.out_channels, 16)
        block.load_state_dict(ref.state_dict())  # same parameter names and shapes, or this raises
        x = torch.randn(2, ref.conv1.in_channels, 4, 4)
        torch.testing.assert_close(block(x, emb), ref(x, emb), rtol=0, atol=0)
    # Algorithm 1: the same global random state gives the same t, ε and loss, for 2D points and for images
    s = NoiseSchedule.linear(50)
    for model, batch in [(DDPM(diffusion.TimeMLP(2, 16, 2, 8), s, (2,)), torch.randn(64, 2)),
                         (DDPM(unet, s, (1, 8, 8), num_levels=17), torch.randint(0, 17, (8, 1, 8, 8)))]:
        torch.manual_seed(3)
        expected = model.training_loss(batch)
        torch.manual_seed(3)
        torch.testing.assert_close(ns["l_simple"](model.net, s, model.to_unit(batch)), expected, rtol=0, atol=0)
    # Algorithm 2: the same generator gives the same samples (the ε-form of μ_θ against dgmlib's posterior
    # mean at x̂_0: equal up to float32 rounding); models without num_levels, so dgmlib does not clip
    for net, event_shape in [(diffusion.TimeMLP(2, 16, 2, 8), (2,)), (diffusion.UNet(1, base=8, emb_dim=16), (1, 8, 8))]:
        model = DDPM(net, s, event_shape)
        expected = model.sample(64, generator=torch.Generator().manual_seed(4))
        got = ns["ddpm_sample"](net, s, (64, *event_shape), generator=torch.Generator().manual_seed(4))
        scale = expected.abs().max().item()  # untrained networks: samples far from unit scale
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------- improved DDPM (Nichol & Dhariwal 2021)


class _Stub(nn.Module):
    """A network with one parameter per half of its output: the prediction ``a x_t`` and a constant ``v = b``
    (``(B, C, ...) -> (B, 2C, ...)``), so that the gradient reaching each half can be read off; with
    ``v=None``, the prediction alone (a fixed-variance network)."""

    def __init__(self, v: float | None = 0.5, a: float = 0.3) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = None if v is None else nn.Parameter(torch.tensor(v, dtype=torch.float64))

    def forward(self, x_t, t):
        if self.b is None:
            return self.a * x_t
        return torch.cat([self.a * x_t, self.b * torch.ones_like(x_t)], dim=1)


class _RecordT(nn.Module):
    """A network that remembers the timesteps it was called with (and predicts ε = 0.1 x_t)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.1))
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t, t):
        self.seen.append(t.clone())
        return self.w * x_t


def _points(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("v, expected", [(1.0, "betas"), (0.0, "posterior_variance")])
def test_learned_variance_interpolates_between_beta_and_beta_tilde(v, expected):
    """Nichol & Dhariwal Eq. 15: Σ = exp(v log β_t + (1 - v) log β̃_t); v = 1 is β_t, v = 0 is β̃_t (β̃_1 = 0
    clipped to β̃_2)."""
    s = NoiseSchedule.cosine(30)
    model = DDPM(_Stub(v), s, (2,), variance="learned")
    x_t, t = _points(30), torch.arange(1, 31)
    _, var, _ = model.p_mean_variance(x_t, t)  # the default is the model's own: the learned one
    want = getattr(s, expected).clone()
    if expected == "posterior_variance":
        want[0] = want[1]
    torch.testing.assert_close(var, want[:, None].expand(30, 2))
    torch.testing.assert_close(model.learned_log_variance(t, torch.full((30, 2), v, dtype=torch.float64)),
                               want.log()[:, None].expand(30, 2))
    # the mean comes from the first half alone (ε = 0.3 x_t)
    eps = 0.3 * x_t
    mean, _, _ = model.p_mean_variance(x_t, t)
    x0_hat = diffusion.predict_x0_from_eps(s, x_t, t, eps)
    torch.testing.assert_close(mean, diffusion.q_posterior_mean_variance(s, x0_hat, x_t, t)[0])
    # sampling uses the learned variance by default: with v = 1 it samples as with β_t, with v = 0 as with β̃_t
    ref = "beta" if v == 1.0 else "beta_tilde"
    a = model.sample(5, generator=torch.Generator().manual_seed(0))
    b = model.sample(5, variance=ref, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_learned_variance_network_sizes():
    unet = diffusion.UNet(2, base=8, emb_dim=16, in_channels=1)
    assert unet(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])).shape == (3, 2, 8, 8)
    assert diffusion.TimeMLP(2, 16, 2, 8, out_dim=4)(torch.randn(3, 2), torch.tensor([1, 2, 3])).shape == (3, 4)
    torch.manual_seed(0)
    model = DDPM(unet, NoiseSchedule.linear(25), (1, 8, 8), num_levels=17, variance="learned")
    eps, x0 = model.predict_eps_x0(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    assert eps.shape == x0.shape == (3, 1, 8, 8)
    assert model.ddim_sample(2, steps=5).shape == (2, 1, 8, 8) and model.sample(2).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("images", [False, True])
def test_hybrid_loss_trains_the_variance_only_through_l_vlb(images):
    """L_hybrid = L_simple + λ L_vlb (Eq. 16) with a stop-gradient on the mean in L_vlb (Sec. 3.1): the
    prediction's parameter gets exactly L_simple's gradient, v gets a gradient from L_vlb alone."""
    if images:
        s, shape, levels = NoiseSchedule.linear(25), (1, 8, 8), 17
        batch = data.load_digits("test")[:8]
    else:
        s, shape, levels = NoiseSchedule.linear(25), (2,), None
        batch = _points(8)
    model = DDPM(_Stub(0.4), s, shape, num_levels=levels, variance="learned")
    torch.manual_seed(1)
    loss = model.training_loss(batch)
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.sum().backward()
    grad_a, grad_b = model.net.a.grad.clone(), model.net.b.grad.clone()
    # the same draws by hand: t, then ε, from the global stream
    torch.manual_seed(1)
    x0 = model.to_unit(batch)
    t = torch.randint(1, s.T + 1, (8,))
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(s, x0, t, noise)
    model.net.a.grad = None
    simple = (model.net.a * x_t - noise).pow(2).flatten(1).mean(1)
    simple.sum().backward()
    torch.testing.assert_close(grad_a, model.net.a.grad)  # λ L_vlb adds nothing to the mean's gradient
    assert grad_b.abs() > 0  # ... and trains v
    vlb = model.vlb_term(batch, t, noise)
    D = math.prod(shape)
    torch.testing.assert_close(loss, simple.detach() + diffusion.HYBRID_LAMBDA * s.T * vlb.detach() / (D * math.log(2)))
    # without the stop-gradient (the L_vlb objective) the mean does get a gradient from the bound
    model.net.a.grad = None
    model.vlb_term(batch, t, noise).sum().backward()
    assert model.net.a.grad.abs() > 0


@pytest.mark.parametrize("images", [False, True])
def test_improved_ddpm_losses_are_finite_and_per_example(images):
    torch.manual_seed(0)
    for variance in diffusion.VARIANCE_MODES:
        for t_sampling in diffusion.T_SAMPLINGS:
            k = 2 if variance == "learned" else 1
            if images:
                net = diffusion.UNet(k, base=8, emb_dim=16, in_channels=1)
                model = DDPM(net, NoiseSchedule.cosine(20), (1, 8, 8), num_levels=17, variance=variance,
                             t_sampling=t_sampling)
                batch = data.load_digits("test")[:12]
            else:
                net = diffusion.TimeMLP(2, 16, 2, 8, out_dim=2 * k)
                model = DDPM(net, NoiseSchedule.cosine(20), (2,), variance=variance, t_sampling=t_sampling)
                batch = _points(12).float()
            loss = model.training_loss(batch)
            assert loss.shape == (12,) and torch.isfinite(loss).all(), (variance, t_sampling)
            loss.mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            # every t, t = 1 (the decoder) included, has a finite term with finite gradients
            model.zero_grad()
            terms = model.vlb_term(batch[:1].expand(20, *batch.shape[1:]), torch.arange(1, 21))
            assert terms.shape == (20,) and torch.isfinite(terms).all()
            terms.sum().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_importance_sampling_is_uniform_until_every_history_is_full():
    T, H = 20, diffusion.HISTORY_PER_TERM
    net = _RecordT()
    model = DDPM(net, NoiseSchedule.cosine(T), (2,), t_sampling="importance")
    torch.testing.assert_close(model.t_probabilities(), torch.full((T,), 1 / T))
    model.loss_history.uniform_(1, 100)
    model.loss_count.fill_(H)
    model.loss_count[7] = H - 1  # one t short of a full history
    torch.testing.assert_close(model.t_probabilities(), torch.full((T,), 1 / T))
    model.eval()
    torch.manual_seed(0)
    model.training_loss(_points(40_000).float())
    counts = torch.bincount(net.seen[-1] - 1, minlength=T).double()
    assert ((counts - 2000).abs() < 4 * math.sqrt(2000 * (1 - 1 / T))).all(), counts
    # the loss is the term over p_t = 1/T: T L_{t-1}, the same draws (t from torch.multinomial, then ε)
    batch = _points(16).float()
    torch.manual_seed(3)
    loss = model.training_loss(batch)
    torch.manual_seed(3)
    t = torch.multinomial(torch.full((T,), 1 / T), 16, replacement=True) + 1
    torch.testing.assert_close(loss, T * model.vlb_term(batch, t, torch.randn_like(batch)))


def test_importance_probabilities_are_the_root_mean_square_of_the_history():
    """Nichol & Dhariwal Eq. 18: p_t ∝ sqrt(E[L_t²]) over the last 10 values, here mixed with a little of
    the uniform distribution (``UNIFORM_MIX``, as improved-diffusion does) so that no p_t is 0."""
    T, H, u = 20, diffusion.HISTORY_PER_TERM, diffusion.UNIFORM_MIX
    net = _RecordT()
    model = DDPM(net, NoiseSchedule.cosine(T), (2,), t_sampling="importance").eval()
    history = torch.rand(T, H, generator=torch.Generator().manual_seed(0)) * torch.arange(1, T + 1)[:, None] ** 2
    model.loss_history.copy_(history)
    model.loss_count.fill_(H)
    w = history.double().pow(2).mean(1).sqrt()
    expected = (1 - u) * w / w.sum() + u / T
    p = model.t_probabilities()
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-7)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6) and (p > 0).all()
    # the draws follow p
    torch.manual_seed(0)
    n = 50_000
    model.training_loss(_points(n).float())
    counts = torch.bincount(net.seen[-1] - 1, minlength=T).double()
    assert ((counts - n * expected).abs() < 4 * (n * expected * (1 - expected)).sqrt() + 1).all()


def test_importance_weighted_l_vlb_is_unbiased():
    """E_{t~p}[L_{t-1} / p_t] = Σ_t L_{t-1}: enumerate t with its probability, the same ε for every t."""
    T = 20
    torch.manual_seed(0)
    for variance, k in (("fixed", 1), ("learned", 2)):
        net = diffusion.UNet(k, base=8, emb_dim=16, in_channels=1)
        model = DDPM(net, NoiseSchedule.cosine(T), (1, 8, 8), num_levels=17, variance=variance,
                     t_sampling="importance").eval()
        model.loss_history.copy_(torch.rand(T, diffusion.HISTORY_PER_TERM) * 50 + 1)
        model.loss_count.fill_(diffusion.HISTORY_PER_TERM)
        p = model.t_probabilities()
        assert not torch.allclose(p, torch.full_like(p, 1 / T))
        batch = data.load_digits("test")[:4]
        with torch.no_grad():
            estimate, exact = torch.zeros(4), torch.zeros(4)
            for t in range(1, T + 1):
                tt = torch.full((4,), t)
                torch.manual_seed(5)
                estimate += p[t - 1] * model.training_loss(batch, tt)
                torch.manual_seed(5)
                exact += model.vlb_term(batch, tt, torch.randn(4, 1, 8, 8))
        torch.testing.assert_close(estimate, exact, rtol=1e-5, atol=1e-4)
        # and Σ_t L_{t-1} (with L_T) is the bound, term by term, with bound_terms' draws
        g = torch.Generator().manual_seed(7)
        terms = model.bound_terms(batch, g)
        g = torch.Generator().manual_seed(7)
        noises = {t: torch.randn(4, 1, 8, 8, generator=g) for t in [*range(2, T + 1), 1]}
        with torch.no_grad():
            mine = torch.stack([model.vlb_term(batch, torch.full((4,), t), noises[t]) for t in range(1, T + 1)], 1)
        torch.testing.assert_close(mine[:, 1:], terms["diffusion"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine[:, 0], terms["decoder"], rtol=1e-4, atol=1e-4)


def test_the_loss_history_is_a_ring_of_the_last_values():
    T, H = 5, diffusion.HISTORY_PER_TERM
    model = DDPM(_RecordT(), NoiseSchedule([0.1] * T), (2,), t_sampling="importance")
    model.update_loss_history(torch.tensor([2, 2, 4]), torch.tensor([1.0, 2.0, 3.0]))
    assert model.loss_count.tolist() == [0, 2, 0, 1, 0]
    assert model.loss_history[1, :2].tolist() == [1.0, 2.0] and model.loss_history[3, 0] == 3.0
    # 13 more values of t = 2 in one batch: 15 in all, the last 10 stay, in ring order; NaN is skipped
    values = torch.arange(3, 16, dtype=torch.float32)
    model.update_loss_history(torch.full((14,), 2), torch.cat([values, torch.tensor([float("nan")])]))
    assert model.loss_count[1] == 15
    assert sorted(model.loss_history[1].tolist()) == list(range(6, 16))
    assert model.loss_history[1, 14 % H] == 15.0
    # training mode records the drawn terms; evaluation does not
    batch = _points(32).float()
    model.eval()
    model.training_loss(batch)
    assert model.loss_count.sum() == 16
    model.train()
    model.training_loss(batch)
    assert model.loss_count.sum() == 16 + 32


def test_the_importance_buffers_move_and_are_saved():
    model = DDPM(diffusion.TimeMLP(2, 16, 2, 8), NoiseSchedule.linear(30), (2,), t_sampling="importance")
    state = model.state_dict()
    assert state["loss_history"].shape == (30, diffusion.HISTORY_PER_TERM) and state["loss_count"].shape == (30,)
    model.loss_history.fill_(2.0)
    model.loss_count.fill_(10)
    again = DDPM(diffusion.TimeMLP(2, 16, 2, 8), NoiseSchedule.linear(30), (2,), t_sampling="importance")
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.loss_history, model.loss_history) and torch.equal(again.loss_count, model.loss_count)
    model.to(torch.float64)
    assert model.loss_history.dtype == torch.float64 and model.loss_count.dtype == torch.long
    model.to("meta")
    assert model.loss_history.device.type == "meta" and model.loss_count.device.type == "meta"
    assert model.t_probabilities().device.type == "meta"
    loss = model.training_loss(torch.zeros(8, 2, device="meta", dtype=torch.float64))  # no value is read
    assert loss.shape == (8,) and loss.device.type == "meta" and model.loss_count.device.type == "meta"
    # a uniform-t model keeps the state_dict it always had
    assert "loss_history" not in DDPM(diffusion.TimeMLP(2, 16, 2, 8), NoiseSchedule.linear(30), (2,)).state_dict()


def test_bound_terms_with_learned_variances():
    torch.manual_seed(0)
    model = DDPM(diffusion.UNet(2, base=8, emb_dim=16, in_channels=1), NoiseSchedule.linear(25), (1, 8, 8),
                 num_levels=17, variance="learned")
    y = data.load_digits("test")[:6]
    terms = model.bound_terms(y, torch.Generator().manual_seed(0))
    assert terms["diffusion"].shape == (6, 24) and (terms["diffusion"] >= -1e-4).all()
    assert all(torch.isfinite(v).all() for v in terms.values())
    torch.testing.assert_close(terms["total"], terms["prior"] + terms["diffusion"].sum(1) + terms["decoder"])
    assert (terms["decoder"] > 0).all() and model.nll(y).shape == (6,)
    # v = 0 gives the fixed model's KL terms (β̃_t), v = 1 its decoder (β_1): the same ε, the same draws
    s = NoiseSchedule.linear(25)
    ref = DDPM(_Stub(None), s, (1, 8, 8), num_levels=17).bound_terms(y, torch.Generator().manual_seed(1))
    bounds = {v: DDPM(_Stub(v), s, (1, 8, 8), num_levels=17, variance="learned").bound_terms(
        y, torch.Generator().manual_seed(1)) for v in (0.0, 1.0)}
    torch.testing.assert_close(bounds[0.0]["diffusion"], ref["diffusion"])
    torch.testing.assert_close(bounds[1.0]["decoder"], ref["decoder"])
    assert not torch.allclose(bounds[1.0]["diffusion"], ref["diffusion"])


@pytest.mark.parametrize("call, error, match", [
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,), variance="sigma"), ValueError,
     "variance.*'sigma'"),
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,), t_sampling="stratified"), ValueError,
     "t_sampling.*'stratified'"),
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,)).p_mean_variance(
        torch.zeros(1, 2), torch.tensor([1]), "learned"), ValueError, "variance='learned'"),
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,), variance="learned").training_loss(
        torch.zeros(4, 2)), ValueError, "twice the channels"),
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,)).update_loss_history(
        torch.tensor([1]), torch.tensor([1.0])), RuntimeError, "t_sampling='importance'"),
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,), t_sampling="importance").update_loss_history(
        torch.tensor([1, 2]), torch.tensor([1.0])), ValueError, "losses"),
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,), t_sampling="importance").update_loss_history(
        torch.tensor([0]), torch.tensor([1.0])), ValueError, "1 to T"),
    (lambda: DDPM(diffusion.TimeMLP(), NoiseSchedule.linear(50), (2,)).training_loss(
        torch.zeros(4, 2), torch.tensor([1, 2, 3, 51])), ValueError, "1 to T"),
    (lambda: NoiseSchedule.from_name("quadratic", 50), ValueError, "schedule.*'quadratic'"),
])
def test_bad_improved_ddpm_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_the_registry_builds_every_improved_ddpm(monkeypatch):
    """``dgm train ddpm --schedule S --variance V --t_sampling M``: each combination builds, and the default
    is Ho et al.'s model as before (the same parameters, the same state_dict keys)."""
    from dgmlib.models import MODELS

    monkeypatch.setenv("DGM_FAST", "1")
    spec = MODELS["ddpm"]
    assert spec.resolve_options({}) == {"schedule": "linear", "variance": "fixed", "t_sampling": "uniform"}
    digits, toy = data.load_image_data("digits"), data.load_toy_data("swissroll")
    default = spec.build(digits)
    assert default.variance == "fixed" and default.t_sampling == "uniform"
    assert torch.allclose(default.schedule.betas, NoiseSchedule.linear(100).betas)
    for schedule in diffusion.SCHEDULES:
        for variance in diffusion.VARIANCE_MODES:
            for t_sampling in diffusion.T_SAMPLINGS:
                for d in (digits, toy):
                    model = spec.build(d, schedule=schedule, variance=variance, t_sampling=t_sampling)
                    assert (model.variance, model.t_sampling) == (variance, t_sampling)
                    torch.testing.assert_close(model.schedule.betas, NoiseSchedule.from_name(schedule, 100).betas)
                    assert model.training_loss(d.train[:4]).shape == (4,)
    with pytest.raises(ValueError, match="variance"):
        spec.build(digits, variance="large")
