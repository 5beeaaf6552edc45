"""Flow matching (lecture 12): the paths, the CFM loss and its gradient theorem, the OT coupling, the samplers'
orders, straightness and reflow, guidance, the exact likelihood through ``dgmlib.cnf``, the models and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from dgmlib import diffusion
from dgmlib import flow_matching as fm
from dgmlib.cli import main
from dgmlib.data import load_image_data, load_toy_data
from dgmlib.models import MODELS

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class GaussianField(nn.Module):
    """The exact marginal field of N(mean, std²) data on ``path``, called as a network ``net(x, 999 t)``."""

    def __init__(self, path: fm.ProbabilityPath, mean: float, std: float) -> None:
        super().__init__()
        self.path, self.mean, self.std = path, mean, std
        self.dummy = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return fm.gaussian_marginal_velocity(self.path, x, t / 999.0, self.mean, self.std) + 0 * self.dummy


class SmoothNet(nn.Module):
    """A small tanh MLP on [x, t] (the sinusoidal embedding of 999 t would make the ODE stiff in t)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mlp(torch.cat([x, t[:, None] / 999.0], dim=1))


class SmoothConv(nn.Module):
    """A 3x3 convolution of images, scaled by a smooth function of t: a non-stiff image field."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(self.conv(x)) * (1 + t[:, None, None, None] / 999.0)


# --------------------------------------------------------------------------- 1. paths


@pytest.mark.parametrize("path", [fm.OTPath(), fm.OTPath(0.05), fm.VPPath()], ids=["ot", "ot_smin", "vp"])
def test_path_derivatives_match_finite_differences(path):
    t = torch.linspace(0.01, path.t_max - 0.01, 50, dtype=DT)
    h = 1e-6
    (a_hi, s_hi), (a_lo, s_lo) = path.alpha_sigma(t + h), path.alpha_sigma(t - h)
    d_alpha, d_sigma = path.alpha_sigma_dot(t)
    torch.testing.assert_close(d_alpha, (a_hi - a_lo) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d_sigma, (s_hi - s_lo) / (2 * h), rtol=1e-6, atol=1e-7)
    x0, x1 = torch.randn(50, 3, generator=_gen(0), dtype=DT), torch.randn(50, 3, generator=_gen(1), dtype=DT)
    # u_t is the time derivative of x_t along the conditional path
    fd = (path.interpolate(x0, x1, t + h) - path.interpolate(x0, x1, t - h)) / (2 * h)
    torch.testing.assert_close(path.conditional_velocity(x0, x1, t), fd, rtol=1e-6, atol=1e-6)


def test_paths_join_noise_to_data():
    x0, x1 = torch.randn(4, 2, generator=_gen(0), dtype=DT), torch.randn(4, 2, generator=_gen(1), dtype=DT)
    zeros, ones = torch.zeros(4, dtype=DT), torch.ones(4, dtype=DT)
    ot = fm.OTPath()
    torch.testing.assert_close(ot.interpolate(x0, x1, zeros), x0)
    torch.testing.assert_close(ot.interpolate(x0, x1, ones), x1)
    torch.testing.assert_close(ot.conditional_velocity(x0, x1, zeros + 0.3), x1 - x0)  # straight, constant speed
    torch.testing.assert_close(fm.OTPath(0.1).interpolate(x0, x1, ones), x1 + 0.1 * x0)
    vp = fm.VPPath()
    alpha, sigma = vp.alpha_sigma(torch.tensor([0.0, 0.5, vp.t_max], dtype=DT))
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(3, dtype=DT))  # variance preserving
    assert alpha[0] < 0.01 and alpha[-1] > 0.99
    # the VP path is the VP SDE of lecture 11 run backwards: alpha_t = alpha_SDE(1 - t)
    from dgmlib.score import VPSDE

    a_sde, _ = VPSDE().alpha_sigma(torch.tensor([1.0, 0.5, 1 - vp.t_max], dtype=DT))
    torch.testing.assert_close(alpha, a_sde.to(DT))


# --------------------------------------------------------------------------- 2. the marginal field and the loss


@pytest.mark.parametrize("path", [fm.OTPath(0.01), fm.VPPath()], ids=["ot", "vp"])
def test_gaussian_marginal_field_transports_the_marginal(path):
    """For data N(m, s²), p_t = N(α m, α² s² + σ²); its field moves the mean at α̇ m and the variance at
    d/dt(α² s² + σ²) = 2 · gain · var (the continuity equation for a Gaussian under a linear field)."""
    m, s = 1.5, 0.7
    t = torch.linspace(0.05, 0.95, 19, dtype=DT)
    alpha, sigma = path.alpha_sigma(t)
    d_alpha, d_sigma = path.alpha_sigma_dot(t)
    mean_t = (alpha * m)[:, None]
    torch.testing.assert_close(fm.gaussian_marginal_velocity(path, mean_t, t, m, s), (d_alpha * m)[:, None])
    var = alpha ** 2 * s ** 2 + sigma ** 2
    gain = fm.gaussian_marginal_velocity(path, mean_t + 1, t, m, s) - fm.gaussian_marginal_velocity(path, mean_t, t, m, s)
    d_var = 2 * (alpha * d_alpha * s ** 2 + sigma * d_sigma)
    torch.testing.assert_close(2 * gain[:, 0] * var, d_var)


def test_cfm_gradient_equals_the_marginal_fm_gradient():
    """Lipman et al. Theorem 2 on Gaussian data, where u_t(x) is closed form: over the same draws of (t, x0, x1),
    ∇θ L_CFM - ∇θ L_FM has mean zero (within 4 standard errors over 40 batches), while ∇θ L_FM does not."""
    torch.manual_seed(0)
    path, m, s = fm.OTPath(0.01), torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.5, 1.5], dtype=DT)
    net = diffusion.TimeMLP(2, hidden=16, num_layers=2, emb_dim=8).to(DT)
    params = list(net.parameters())

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return net(x, 999.0 * t)

    diffs, grads = [], []
    for _ in range(40):
        x1 = m + s * torch.randn(2000, 2, dtype=DT)
        x0 = torch.randn(2000, 2, dtype=DT)
        t = torch.rand(2000, dtype=DT)
        cfm = fm.cfm_loss(velocity, x0, x1, t, path).mean()
        x_t = path.interpolate(x0, x1, t)
        marginal = ((velocity(x_t, t) - fm.gaussian_marginal_velocity(path, x_t, t, m, s)) ** 2).sum(1).mean()
        g_cfm = torch.cat([g.flatten() for g in torch.autograd.grad(cfm, params)])
        g_fm = torch.cat([g.flatten() for g in torch.autograd.grad(marginal, params)])
        diffs.append(g_cfm - g_fm)
        grads.append(g_fm)
    diffs, grads = torch.stack(diffs), torch.stack(grads)
    se = diffs.std(0) / math.sqrt(len(diffs))
    assert (diffs.mean(0).abs() <= 4 * se + 1e-12).float().mean() > 0.97  # ~1 in 15 000 per entry beyond 4 SE
    assert grads.mean(0).norm() > 10 * diffs.mean(0).norm()


def test_cfm_loss_is_zero_for_the_conditional_target_and_checks_shapes():
    x0, x1 = torch.randn(5, 1, 2, 2, generator=_gen(0)), torch.randn(5, 1, 2, 2, generator=_gen(1))
    t = torch.rand(5, generator=_gen(2))
    path = fm.OTPath()
    exact = fm.cfm_loss(lambda x, s: x1 - x0, x0, x1, t, path)
    assert exact.shape == (5,) and exact.abs().max() == 0
    torch.testing.assert_close(fm.cfm_loss(lambda x, s: torch.zeros_like(x), x0, x1, t, path),
                               ((x1 - x0) ** 2).flatten(1).sum(1))
    with pytest.raises(ValueError, match="returned"):
        fm.cfm_loss(lambda x, s: x.flatten(1), x0, x1, t, path)
    with pytest.raises(ValueError, match="same shape"):
        fm.cfm_loss(lambda x, s: x, x0, x1[:4], t, path)
    with pytest.raises(ValueError, match="t must be"):
        fm.cfm_loss(lambda x, s: x, x0, x1, t[:3], path)
    with pytest.raises(TypeError, match="tensors"):
        path.interpolate(x0.numpy(), x1, t)


# --------------------------------------------------------------------------- 3. the OT coupling


def test_ot_pairing_is_the_best_permutation_by_enumeration():
    for seed in range(3):
        x0, x1 = torch.randn(6, 3, generator=_gen(seed)), torch.randn(6, 3, generator=_gen(seed + 10)) + 1
        perm = fm.ot_pairing(x0, x1)
        assert sorted(perm.tolist()) == list(range(6)) and perm.dtype == torch.int64

        def cost(p) -> float:
            return ((x0[list(p)] - x1) ** 2).sum().item()
        best = min(cost(p) for p in itertools.permutations(range(6)))
        assert cost(perm.tolist()) == pytest.approx(best, rel=1e-6)
    with pytest.raises(ValueError, match="finite"):
        fm.ot_pairing(torch.full((3, 2), math.nan), torch.zeros(3, 2))


def test_ot_coupling_shortens_the_pairs_in_training(monkeypatch):
    model = fm.FlowMatching(diffusion.TimeMLP(2, 16, 2), (2,), coupling="ot")
    x1 = load_toy_data("8gaussians").train[:256]
    x0 = torch.randn_like(x1)
    paired = x0[fm.ot_pairing(x0, x1)]
    assert ((paired - x1) ** 2).sum(1).mean() < 0.5 * ((x0 - x1) ** 2).sum(1).mean()
    calls, original = [], fm.ot_pairing

    def recording(a: Tensor, b: Tensor) -> Tensor:  # the model's coupling must ask for the assignment
        calls.append(original(a, b))
        return calls[-1]
    monkeypatch.setattr(fm, "ot_pairing", recording)
    torch.manual_seed(1)
    loss = model.training_loss(x1)
    assert loss.shape == (256,) and torch.isfinite(loss).all() and len(calls) == 1
    torch.manual_seed(1)
    independent = fm.FlowMatching(model.net, (2,)).training_loss(x1)
    assert len(calls) == 1 and loss.mean() < independent.mean()  # shorter pairs: a smaller target to regress


# --------------------------------------------------------------------------- 4. samplers


def _linear_error(sampler, num_steps: int) -> float:
    """dx/dt = -x + t, x(0) = 1: x(t) = t - 1 + 2 e^{-t}; the error at t = 1 in float64."""
    x0 = torch.ones(1, 1, dtype=DT)
    x1 = sampler(lambda x, t: -x + t[:, None], x0, num_steps)
    return abs(x1.item() - 2 * math.exp(-1.0))


@pytest.mark.parametrize("sampler, order", [(fm.euler_sample, 1), (fm.midpoint_sample, 2), (fm.heun_sample, 2)],
                         ids=["euler", "midpoint", "heun"])
def test_fixed_step_samplers_converge_at_their_order(sampler, order):
    errors = [_linear_error(sampler, n) for n in (20, 40, 80, 160)]
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    for r in ratios:
        assert r == pytest.approx(2 ** order, rel=0.08)


def test_adaptive_and_dispatching_samplers():
    x0 = torch.ones(1, 1, dtype=DT)
    x1, nfe = fm.ode_sample(lambda x, t: -x + t[:, None], x0, rtol=1e-10, atol=1e-10)
    assert abs(x1.item() - 2 * math.exp(-1.0)) < 1e-8 and nfe > 10
    for sampler, per_step in (("euler", 1), ("midpoint", 2), ("heun", 2)):
        _, nfe = fm.sample_ode(lambda x, t: -x, x0, sampler, 7)
        assert nfe == per_step * 7
    with pytest.raises(ValueError, match="sampler must be"):
        fm.sample_ode(lambda x, t: -x, x0, "rk45")
    with pytest.raises(ValueError, match="num_steps"):
        fm.euler_sample(lambda x, t: -x, x0, 0)
    with pytest.raises(ValueError, match="unknown ODE solver"):
        fm.ode_sample(lambda x, t: -x, x0, method="lsoda")
    times = torch.linspace(0, 1, 5)
    path = fm.trajectory(lambda x, t: torch.ones_like(x), torch.zeros(3, 2), times)
    assert path.shape == (5, 3, 2)
    torch.testing.assert_close(path[:, 0, 0], times)


def test_straightness_is_zero_for_straight_paths_and_reflow_pairs_follow_the_flow():
    x0 = torch.randn(8, 2, generator=_gen(0), dtype=DT)
    shift = torch.tensor([1.0, -2.0], dtype=DT)
    assert fm.straightness(lambda x, t: shift.expand_as(x), x0).abs().max() < 1e-20
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT)
    curved = fm.straightness(lambda x, t: x @ rotation.T, x0, num_steps=1000)
    # an arc of one radian at speed |x0|: S = |x0|² - |x1 - x0|² = |x0|² (1 - 4 sin²(1/2))
    torch.testing.assert_close(curved, (x0 ** 2).sum(1) * (1 - 4 * math.sin(0.5) ** 2), rtol=0.01, atol=0)
    start, end = fm.reflow_pairs(lambda x, t: x @ rotation.T, x0)
    assert start is x0
    exact = x0 @ torch.linalg.matrix_exp(rotation).T  # the rotation by 1 radian
    torch.testing.assert_close(end, exact, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 5. guidance


def test_guided_field_reduces_to_both_fields_and_is_linear_in_w():
    v_c, v_u = torch.randn(4, 3, generator=_gen(0)), torch.randn(4, 3, generator=_gen(1))
    torch.testing.assert_close(fm.guided_velocity(v_c, v_u, 0.0), v_u)
    torch.testing.assert_close(fm.guided_velocity(v_c, v_u, 1.0), v_c)
    torch.testing.assert_close(fm.guided_velocity(v_c, v_u, 3.0), v_u + 3 * (v_c - v_u))
    with pytest.raises(ValueError, match="one shape"):
        fm.guided_velocity(v_c, v_u[:2], 1.0)
    with pytest.raises(ValueError, match="finite"):
        fm.guided_velocity(v_c, v_u, math.inf)


def test_class_conditional_model_and_guided_ddpm():
    """Label dropout, the packed batch, the guided field of the model; ``GuidedNet`` makes a DDPM sample with
    classifier-free guidance (its ε at w = 1 is the conditional ε)."""
    torch.manual_seed(0)
    digits = load_image_data("digits")
    net = diffusion.UNet(1, 8, num_classes=10)
    model = fm.FlowMatching(net, (1, 8, 8), num_levels=17, num_classes=10, p_uncond=0.5)
    labels = torch.arange(8) % 10
    batch = fm.pack_labels(digits.train[:8], labels)
    y, back = model.split_batch(batch)
    assert torch.equal(y, digits.train[:8]) and torch.equal(back, labels)
    seen = []
    original = model.velocity
    model.velocity = lambda x, t, labels=None: seen.append(labels) or original(x, t, labels)
    loss = model.training_loss(batch)
    del model.velocity
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    assert set(seen[0].tolist()) - set(labels.tolist()) == {10}  # some labels dropped to ∅ (p_uncond = 0.5)
    dropped = fm.drop_labels(torch.zeros(20000, dtype=torch.long), 10, 0.1)
    assert set(dropped.tolist()) == {0, 10} and (dropped == 10).float().mean().item() == pytest.approx(0.1, abs=0.01)
    x, t = torch.randn(8, 1, 8, 8), torch.rand(8)
    torch.testing.assert_close(model.field(labels, 0.0)(x, t), model.velocity(x, t))
    torch.testing.assert_close(model.field(labels, 1.0)(x, t), model.velocity(x, t, labels))
    assert model.sample(8, "euler", 2, labels=labels, guidance=2.0).shape == (8, 1, 8, 8)
    ddpm = diffusion.DDPM(fm.GuidedNet(net, labels, 1.0), diffusion.NoiseSchedule.linear(50), (1, 8, 8))
    torch.testing.assert_close(ddpm.net(x, t), net(x, t, labels))
    assert ddpm.sample(8).shape == (8, 1, 8, 8)
    with pytest.raises(ValueError, match="labels"):
        fm.GuidedNet(net, labels, 2.0)(x[:3], t[:3])
    with pytest.raises(ValueError, match="unconditional"):
        fm.FlowMatching(diffusion.UNet(1, 8), (1, 8, 8)).velocity(x, t, labels)
    with pytest.raises(ValueError, match="pack_labels"):
        model.training_loss(digits.train[:8])
    with pytest.raises(ValueError, match="labels must have shape"):
        fm.pack_labels(digits.train[:8], labels[:3])


# --------------------------------------------------------------------------- 6. the exact likelihood


@pytest.mark.parametrize("path", [fm.OTPath(), fm.VPPath()], ids=["ot", "vp"])
def test_the_ode_density_of_the_exact_field_is_the_gaussian_density(path):
    """With the closed-form marginal field of N(m, s²) data, the CNF's log p at t_max is the density of
    p_{t_max} = N(α m, α² s² + σ²) (N(m, s²) for the OT path with σ_min = 0). The VP path starts at
    N(α_0 m, 1 - α_0² (1 - s²)), not exactly N(0, I) (α_0 = e^{-5.0}): m = 0 keeps that gap below 1e-5 nats."""
    m, s = (0.5 if isinstance(path, fm.OTPath) else 0.0), 0.8
    model = fm.FlowMatching(GaussianField(path, m, s), (2,), path).to(DT)
    x = torch.randn(16, 2, generator=_gen(3), dtype=DT) * s + m
    alpha, sigma = (v.item() for v in path.alpha_sigma(torch.tensor(path.t_max, dtype=DT)))
    var = alpha ** 2 * s ** 2 + sigma ** 2
    exact = (-0.5 * (x - alpha * m) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).sum(1)
    torch.testing.assert_close(model.log_prob(x), exact, rtol=0, atol=2e-4)
    assert model.last_nfe > 0


def test_the_flow_is_a_bijection_with_the_autograd_log_det():
    """The model's CNF: data -> latent -> data round trip, and its log-det (the integrated exact trace) against
    slogdet of the Jacobian of the ODE map by autograd through the solver, in float64."""
    torch.manual_seed(0)
    model = fm.FlowMatching(SmoothNet(), (2,)).to(DT)
    flow = model.cnf()
    flow.rtol = flow.atol = 1e-9
    x = torch.randn(3, 2, dtype=DT)
    z, log_det = flow(x)
    back, log_det_inv = flow.inverse(z)
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_det_inv, -log_det, rtol=1e-6, atol=1e-6)
    times = torch.tensor([1.0, 0.0], dtype=DT)

    def to_latent(v: Tensor) -> Tensor:  # the ODE map alone, data at 1 -> latent at 0, differentiated by autograd
        return odeint(lambda t, z: model.velocity(z, t.expand(len(z))), v[None], times, rtol=1e-9, atol=1e-9)[-1, 0]
    for i in range(3):
        jac = torch.autograd.functional.jacobian(to_latent, x[i])  # (2, 2)
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=1e-6, atol=1e-6)


def test_image_nll_is_the_dequantization_bound_and_restores_training_mode():
    torch.manual_seed(0)
    model = fm.FlowMatching(SmoothConv(), (1, 4, 4), num_levels=3)
    y = torch.randint(0, 3, (2, 1, 4, 4), generator=_gen(4)).float()
    model.train()
    g1, g2 = _gen(5), _gen(5)
    nll = model.nll(y, generator=g1)
    assert model.training  # log_prob's evaluation mode does not leak
    log_p = model.log_prob(y, generator=g2)
    torch.testing.assert_close(nll, -log_p - 16 * math.log(1.0))  # h = 2/(K-1) = 1 for K = 3: no shift
    model4 = fm.FlowMatching(model.net, (1, 4, 4), num_levels=5)  # h = 1/2: the bound adds D log 2
    torch.testing.assert_close(model4.nll(y, generator=_gen(6)), -model4.log_prob(y, generator=_gen(6)) + 16 * math.log(2))
    with pytest.raises(ValueError, match="dequantize"):
        fm.FlowMatching(SmoothConv(), (1, 4, 4), num_levels=3, dequantize=False).nll(y)


# --------------------------------------------------------------------------- 7. bad input and the models


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="sigma_min"):
        fm.OTPath(1.0)
    with pytest.raises(ValueError, match="beta_min"):
        fm.VPPath(2.0, 1.0)
    with pytest.raises(ValueError, match="path must be"):
        fm.make_path("cosine")
    with pytest.raises(ValueError, match="coupling must be"):
        fm.FlowMatching(nn.Identity(), (2,), coupling="sinkhorn")
    with pytest.raises(ValueError, match="p_uncond"):
        fm.FlowMatching(nn.Identity(), (2,), p_uncond=1.0)
    model = fm.FlowMatching(diffusion.TimeMLP(2, 8, 1), (2,))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(0)
    with pytest.raises(ValueError, match="x0 must have shape"):
        model.sample(3, "euler", 2, x0=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="num_steps"):
        model.sample(3, "euler", 0)
    with pytest.raises(ValueError, match="batch must have shape"):
        model.training_loss(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="floating"):
        model.training_loss(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        MODELS["flow_matching"].build(load_image_data("digits")).training_loss(torch.full((2, 1, 8, 8), 17.0))
    toy = load_toy_data("8gaussians")
    with pytest.raises(ValueError, match="digits"):
        MODELS["flow_matching"].build(toy, conditioning="class")
    with pytest.raises(ValueError, match="one of"):
        MODELS["flow_matching"].build(load_image_data("digits"), reflow="1", conditioning="class")


def test_latent_model_trains_and_decodes_images():
    from dgmlib.vae import build_vae

    digits = load_image_data("digits")
    vae = build_vae(latent_dim=4, hidden=16, channels=8)
    flow = fm.FlowMatching(diffusion.TimeMLP(4, 16, 2), (4,))
    model = fm.LatentFlowMatching(vae, flow, digits.train[:64])
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    z = model.encode(digits.train[:64])
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)  # standardised latents
    loss = model.training_loss(digits.train[:8])
    assert loss.shape == (8,)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.flow.parameters())
    model.train()
    assert not model.autoencoder.training
    x = model.sample(3, "euler", 2)
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="continuous vectors"):
        fm.LatentFlowMatching(vae, fm.FlowMatching(nn.Identity(), (3,)), digits.train[:8])


# --------------------------------------------------------------------------- 8. the CLI


def test_cli_trains_flow_matching_on_a_toy(tmp_path):
    """The ODE's exact NLL beside the true entropy, the samplers' distances and NFE, straightness; ~5 s."""
    assert main(["train", "flow_matching", "--data", "8gaussians", "--epochs", "1", "--fast", "--no-progress",
                 "--out", str(tmp_path / "t")]) == 0
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    for key in ("test_nll_nats", "ode_nfe", "true_entropy_nats", "straightness", "sample_distance_euler",
                "sample_distance_dopri5", "sample_nfe_heun", "sliced_euler_2", "data_distance"):
        assert key in m, key
    assert m["sample_nfe_euler"] == m["sample_nfe_heun"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["--coupling", "ot", "--reflow", "1"], ["--conditioning", "class"],
                                     ["--latent", "vae"]], ids=["plain", "reflow", "class", "latent"])
def test_cli_trains_flow_matching_on_the_digits(tmp_path, options):
    assert main(["train", "flow_matching", *options, "--epochs", "1", "--fast", "--no-progress",
                 "--out", str(tmp_path / "d")]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert (tmp_path / "d" / "samples.png").exists()
    if not options:
        assert m["test_bits_per_dim"] == pytest.approx(m["test_nll_nats"] / (64 * math.log(2)))
        assert "dequantization bound" in m["nll_method"] and m["frechet_floor"] > 0
    if "--reflow" in options:
        assert "before_reflow_frechet_euler_2" in m and "frechet_euler_2" in m and m["reflow_pairs"] > 0
    if "--conditioning" in options:
        assert {"guided_accuracy_0", "guided_accuracy_3", "guided_frechet_1"} <= set(m)
        assert "test_nll_nats" not in m
    if "--latent" in options:
        assert "frechet_vae_prior" in m and "frechet_distance_dopri5" in m


class ConditionalMLP(nn.Module):
    """ε(x, t, c) for 2D points: an MLP on [x, t / T, embedding(c)], with ∅ = 2 for two classes."""

    def __init__(self) -> None:
        super().__init__()
        self.label = nn.Embedding(3, 8)
        self.mlp = nn.Sequential(nn.Linear(11, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = torch.full((len(x),), 2, dtype=torch.long) if labels is None else labels
        return self.mlp(torch.cat([x, t[:, None].float() / 50, self.label(labels)], dim=1))


def test_classifier_free_guidance_for_a_ddpm():
    """A class-conditional DDPM trained with label dropout (``ddpm_cfg_loss``) on two classes at ±(2, 2): sampled
    through ``GuidedNet``, w = 1 draws the asked class, w = 0 both, and w = 3 the asked class, pushed further out."""
    torch.manual_seed(0)
    net = ConditionalMLP()
    labels = torch.arange(512) % 2
    x = (labels[:, None] * 4.0 - 2.0) + 0.3 * torch.randn(512, 2)
    ddpm = diffusion.DDPM(fm.GuidedNet(net, labels, 1.0), diffusion.NoiseSchedule.linear(50), (2,))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(600):
        loss = fm.ddpm_cfg_loss(ddpm, x, labels, num_classes=2, p_uncond=0.2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ones = torch.ones(400, dtype=torch.long)
    means = {}
    for w in (0.0, 1.0, 3.0):
        ddpm.net = fm.GuidedNet(net, ones, w)
        means[w] = ddpm.sample(400, generator=_gen(1)).mean(0)
    assert (means[1.0] > 1.5).all() and (means[0.0].abs() < 1.0).all()  # class 1 at (2, 2); both classes: ~0
    assert means[3.0].sum() > means[1.0].sum()  # guidance pushes away from the other class
    with pytest.raises(TypeError, match="GuidedNet"):
        fm.ddpm_cfg_loss(diffusion.DDPM(net, diffusion.NoiseSchedule.linear(50), (2,)), x, labels, 2)
