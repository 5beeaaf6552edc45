"""dgmlib.vq: the straight-through gradient, the two losses' routing, the EMA step in closed form, the
constant KL of a point-mass posterior, dead-code restarts, the prior over codes, and the VQ-VAE bound
against the exact likelihood of a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dgmlib import data, vq
from dgmlib.train import fit


def _randomise(module: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def test_straight_through_has_the_value_of_z_q_and_the_identity_jacobian():
    z_e = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    z_q = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out = vq.straight_through(z_e, z_q)
    torch.testing.assert_close(out, z_q)
    jac = torch.autograd.functional.jacobian(lambda a: vq.straight_through(a, z_q), z_e)
    torch.testing.assert_close(jac.reshape(96, 96), torch.eye(96, dtype=torch.float64))
    out.backward(torch.randn_like(out))
    assert z_q.grad is None  # nothing flows to the codes through the estimator
    with pytest.raises(ValueError, match="same shape"):
        vq.straight_through(z_e, z_q[:1])


def test_nearest_code_is_the_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(7, 3, generator=g)
    z_e = torch.randn(4, 3, 5, 6, generator=g)
    indices = vq.nearest_code(z_e, codebook)
    assert indices.shape == (4, 5, 6) and indices.dtype == torch.long
    flat = z_e.movedim(1, -1).reshape(-1, 3)
    brute = torch.stack([((v - codebook) ** 2).sum(1).argmin() for v in flat]).view(4, 5, 6)
    assert torch.equal(indices, brute)
    quantizer = vq.VectorQuantizer(7, 3)
    quantizer.codebook.copy_(codebook)
    out = quantizer.eval()(z_e)
    assert torch.equal(out.indices, brute)
    torch.testing.assert_close(out.z_q, codebook[brute].movedim(-1, 1))
    assert out.codebook_loss.shape == out.commitment_loss.shape == out.loss.shape == (4,)
    # one (B, D) vector per example works as well
    assert vq.nearest_code(flat[:5], codebook).shape == (5,)


def test_commitment_loss_trains_the_encoder_and_codebook_loss_the_codebook():
    torch.manual_seed(0)
    encoder = nn.Conv2d(1, 4, 3, padding=1)
    quantizer = vq.VectorQuantizer(8, 4, beta=0.25, ema=False)
    x = torch.randn(3, 1, 5, 5)
    out = quantizer(encoder(x))
    out.codebook_loss.sum().backward()
    assert encoder.weight.grad is None and quantizer.codebook.grad.abs().sum() > 0
    quantizer.codebook.grad = None
    out = quantizer(encoder(x))
    out.commitment_loss.sum().backward()
    assert quantizer.codebook.grad is None and encoder.weight.grad.abs().sum() > 0
    # the total: codebook + beta * commitment, the gradient of the commitment term scaled by beta
    encoder.weight.grad = None
    quantizer(encoder(x)).loss.sum().backward()
    g_total = encoder.weight.grad.clone()
    encoder.weight.grad = None
    quantizer(encoder(x)).commitment_loss.sum().backward()
    torch.testing.assert_close(g_total, 0.25 * encoder.weight.grad)
    # the decoder's gradient reaches the encoder through z_q (straight through), the codebook not at all
    encoder.weight.grad, quantizer.codebook.grad = None, None
    quantizer(encoder(x)).z_q.square().sum().backward()
    assert encoder.weight.grad.abs().sum() > 0 and quantizer.codebook.grad is None


def test_one_ema_step_equals_its_closed_form():
    """App. A.1 of van den Oord et al. 2017 with Laplace smoothing, written out for K = 3 codes in 2D."""
    k, gamma, eps = 3, 0.9, 1e-5
    quantizer = vq.VectorQuantizer(k, 2, decay=gamma, eps=eps).double()
    e0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], dtype=torch.float64)
    quantizer.codebook.copy_(e0)
    quantizer.embed_sum.copy_(e0)  # one pseudo-observation per code: N = 1, m = e
    z = torch.tensor([[0.1, -0.2], [0.2, 0.1], [0.9, 1.3], [4.0, 6.0], [1.2, 0.8]], dtype=torch.float64)
    out = quantizer.train()(z.T.reshape(1, 2, 5))  # (B=1, D=2, 5 positions)
    assert out.indices.tolist() == [[0, 0, 1, 2, 1]]
    n = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    s = torch.stack([z[0] + z[1], z[2] + z[4], z[3]])
    counts = gamma * 1.0 + (1 - gamma) * n
    sums = gamma * e0 + (1 - gamma) * s
    total = counts.sum()
    smoothed = (counts + eps) / (total + k * eps) * total
    torch.testing.assert_close(quantizer.cluster_size, counts)
    torch.testing.assert_close(quantizer.embed_sum, sums)
    torch.testing.assert_close(quantizer.codebook, sums / smoothed[:, None])
    # evaluation mode changes nothing
    state = copy.deepcopy(quantizer.state_dict())
    quantizer.eval()(z.T.reshape(1, 2, 5))
    for key, value in quantizer.state_dict().items():
        torch.testing.assert_close(value, state[key])


@pytest.mark.parametrize("ema", [False, True])
def test_lecture_07_mechanism_cells_compute_what_the_quantizer_computes(ema):
    """Lecture 07 writes the quantizer's forward pass and one EMA step inline (code cells tagged ``mechanism``). Run
    exactly those cells and compare them with ``VectorQuantizer`` on the same input and the same state: the indices,
    z_q, the three losses, the gradients they send to the encoder output and to the codebook, and (EMA) the module's
    counts, sums and codes after one training step."""
    from nbhelpers import ROOT, run_tagged_cells

    ns = run_tagged_cells(ROOT / "lectures" / "07_vq_vae.ipynb", "mechanism")
    g = torch.Generator().manual_seed(7)
    k, d, beta, gamma, eps = 8, 3, 0.25, 0.9, 1e-5
    module = vq.VectorQuantizer(k, d, beta=beta, ema=ema, decay=gamma, eps=eps, restart_threshold=None).double()
    start = torch.randn(k, d, generator=g, dtype=torch.float64)
    start[-1] += 50.0  # a code far from every input: never picked, its EMA count only decays
    with torch.no_grad():
        module.codebook.copy_(start)
        if ema:
            module.embed_sum.copy_(start)
    counts_before = module.cluster_size.clone()
    z_e = torch.randn(4, d, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)  # (B, D, H, W)
    out = module.train()(z_e)

    codebook = start.clone().requires_grad_()
    indices, z_q, codebook_loss, commitment_loss, loss = ns["quantize"](z_e, codebook, beta=beta, ema=ema)
    assert torch.equal(indices, out.indices) and not (indices == k - 1).any()
    for mine, theirs in [(z_q, out.z_q), (codebook_loss, out.codebook_loss),
                         (commitment_loss, out.commitment_loss), (loss, out.loss)]:
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    # the same gradients: straight-through to z_e, the codebook loss to the codes (without EMA), nothing else
    w = torch.randn(z_q.shape, generator=g, dtype=torch.float64)  # a linear stand-in for the decoder's loss
    mine = torch.autograd.grad((w * z_q).sum() + loss.sum(), [z_e, codebook], allow_unused=True)
    theirs = torch.autograd.grad((w * out.z_q).sum() + out.loss.sum(), [z_e] + ([] if ema else [module.codebook]))
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-12, atol=1e-12)
    if ema:
        assert mine[1] is None and not module.codebook.requires_grad  # no gradient reaches an EMA codebook
    else:
        torch.testing.assert_close(mine[1], theirs[1], rtol=1e-12, atol=1e-12)
        assert mine[1][-1].abs().max() == 0  # the unused code gets no gradient

    counts, sums, codes = ns["ema_update"](counts_before, start, z_e.detach(), indices, decay=gamma, eps=eps)
    torch.testing.assert_close(counts, module.cluster_size, rtol=1e-12, atol=1e-12)  # tracked with or without EMA
    if ema:
        torch.testing.assert_close(sums, module.embed_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(codes, module.codebook, rtol=1e-12, atol=1e-12)
        assert counts[-1] == pytest.approx(gamma)  # the unused code: one pseudo-observation, decayed once


def test_ema_codes_converge_to_the_means_of_their_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    points = centres[torch.arange(600) % 3] + 0.1 * torch.randn(600, 2)
    quantizer = vq.VectorQuantizer(3, 2, decay=0.9).train()
    quantizer.codebook.copy_(centres + 0.5)
    quantizer.embed_sum.copy_(centres + 0.5)
    for _ in range(100):
        quantizer(points.T.unsqueeze(0))
    for j in range(3):
        torch.testing.assert_close(quantizer.codebook[j], points[torch.arange(600) % 3 == j].mean(0), atol=0.02,
                                   rtol=0)


def test_the_kl_of_a_point_mass_to_the_uniform_prior_is_log_k():
    for k in (2, 5, 64):
        for code in range(min(k, 3)):
            q = torch.zeros(k, dtype=torch.float64)
            q[code] = 1.0
            p = torch.full((k,), 1.0 / k, dtype=torch.float64)
            kl = (torch.special.xlogy(q, q) - torch.special.xlogy(q, p)).sum()  # sum_k q log q/p, 0 log 0 = 0
            torch.testing.assert_close(kl, torch.tensor(math.log(k), dtype=torch.float64))
    assert vq.uniform_prior_nll(16, 64) == pytest.approx(16 * math.log(64))
    model = vq.VQVAE(channels=8)
    y = data.load_digits("test")[:5]
    recon, prior = model.nll_terms(y)
    torch.testing.assert_close(prior, torch.full((5,), 16 * math.log(64)))
    torch.testing.assert_close(model.nll(y), recon + 16 * math.log(64))


def test_perplexity_counts_the_codes_in_use():
    assert vq.codebook_perplexity(torch.zeros(10, dtype=torch.long), 8).item() == pytest.approx(1.0)
    assert vq.codebook_perplexity(torch.arange(8).repeat(3), 8).item() == pytest.approx(8.0)
    assert vq.codebook_perplexity(torch.tensor([0, 0, 1, 1]), 8).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        vq.codebook_perplexity(torch.tensor([0, 8]), 8)
    with pytest.raises(TypeError):
        vq.codebook_perplexity(torch.tensor([0.0, 1.0]), 8)


def test_restarts_revive_dead_codes():
    torch.manual_seed(0)
    quantizer = vq.VectorQuantizer(6, 2, restart_threshold=0.5, decay=0.5).train()
    far = torch.full((6, 2), 100.0)
    far[0] = 0.0  # every input picks code 0; codes 1..5 are dead
    quantizer.codebook.copy_(far)
    quantizer.embed_sum.copy_(far)
    z = torch.randn(1, 2, 64)
    assert vq.nearest_code(z, quantizer.codebook).unique().tolist() == [0]
    quantizer(z)  # counts of codes 1..5 fall to 0.5: not yet below the threshold
    assert int(quantizer.restarts) == 0
    quantizer(z)  # 0.25 < 0.5: the five dead codes restart at encoder outputs of this batch
    assert int(quantizer.restarts) == 5
    assert quantizer.dead_codes(threshold=0.5) == 0
    flat = z[0].T
    for j in range(1, 6):
        assert ((flat - quantizer.codebook[j]).abs().sum(1) < 1e-6).any()  # code j is one of the batch's vectors
    assert len(quantizer(z).indices.unique()) > 1  # the revived codes are used
    assert quantizer(z).perplexity > 1.5


def test_prior_over_codes_sums_to_one():
    """The gated PixelCNN prior of a VQ-VAE with a 1x2 code map and K = 4 codes: all 16 code maps."""
    model = vq.VQVAE((1, 2, 4), num_levels=3, num_codes=4, code_dim=2, channels=4, prior_channels=4).double()
    _randomise(model.prior, seed=1, scale=1.0)
    model.prior_fitted = True
    assert model.code_shape == (1, 2)
    maps = torch.cartesian_prod(torch.arange(4), torch.arange(4)).view(16, 1, 2)
    log_p = -model.prior_nll(maps)
    torch.testing.assert_close(torch.logsumexp(log_p, 0), torch.tensor(0.0, dtype=torch.float64))
    assert log_p.max() - log_p.min() > 0.1  # not the uniform prior


@pytest.mark.parametrize("fitted", [False, True])
def test_the_bound_lies_above_the_exact_nll_of_a_tiny_vqvae(fitted):
    """2x2 images with 2 levels (16 images), one code position with K = 3 codes. The model's exact marginal is
    P(y) = sum_c p(c) p(y | e_c); it sums to 1 over the images, and the bound -log p(y|z_q(y)) - log p(c(y))
    is above -log P(y) for every image (equal only if one code carries all the mass)."""
    torch.manual_seed(0)
    model = _randomise(vq.VQVAE((1, 2, 2), num_levels=2, num_codes=3, code_dim=2, channels=4,
                                prior_channels=4).double(), seed=2, scale=1.0)
    model.eval()
    model.prior_fitted = fitted
    images = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * 4).view(16, 1, 2, 2)
    codes = torch.arange(3).view(3, 1, 1)
    log_prior = -model.prior_nll(codes)  # (3,)
    torch.testing.assert_close(torch.logsumexp(log_prior, 0), torch.tensor(0.0, dtype=torch.float64))
    z_q = model.quantizer.quantize(codes).to(torch.float64)  # (3, D, 1, 1)
    log_lik = torch.stack([-model.recon_nll(images, z_q[c:c + 1].expand(16, -1, -1, -1)) for c in range(3)], 1)
    exact = -torch.logsumexp(log_lik + log_prior, 1)  # (16,) -log P(y)
    torch.testing.assert_close(torch.logsumexp(-exact, 0), torch.tensor(0.0, dtype=torch.float64))
    bound = model.nll(images)
    assert (bound >= exact - 1e-12).all()
    assert (bound - exact).max() > 1e-3
    # the bound is the term of the image's own code
    own = model.codes(images).flatten()
    torch.testing.assert_close(bound, -(log_lik[torch.arange(16), own] + log_prior[own]))


def test_state_dict_round_trips_the_codebook_statistics_and_the_prior_flag():
    torch.manual_seed(0)
    model = vq.VQVAE(channels=8, prior_channels=8)
    y = data.load_digits("train")[:64]
    model.train()
    model.training_loss(y)
    model.prior_fitted = True
    fresh = vq.VQVAE(channels=8, prior_channels=8)
    fresh.load_state_dict(model.state_dict())
    assert fresh.prior_fitted
    for name in ("codebook", "embed_sum", "cluster_size", "restarts"):
        assert torch.equal(getattr(fresh.quantizer, name), getattr(model.quantizer, name))
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh.nll(y), model.nll(y))


def test_training_on_digits_uses_the_codebook_and_the_prior_tightens_the_bound():
    torch.manual_seed(0)
    train, val = data.load_digits("train"), data.load_digits("val")
    model = vq.VQVAE(channels=16, num_codes=16, prior_channels=16)
    history = fit(model, train, val, loss_fn=model.training_loss, epochs=3, progress=False)
    assert history.train_loss[-1] < history.train_loss[0]
    model.eval()
    codes = model.codes(val)
    assert vq.codebook_perplexity(codes, 16) > 1.5
    uniform = model.nll(val).mean()
    vq.fit_prior(model, train, val, epochs=3, progress=False)
    assert model.prior_fitted
    assert model.nll(val).mean() < uniform - 5  # 16 positions x log 16 = 44 nats are the uniform prior's share
    samples = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1
    again = model.sample(4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, again)
    draws = model.sample(4, mean=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws * 16, (draws * 16).round())


def test_bad_input_gives_clear_errors():
    quantizer = vq.VectorQuantizer(4, 3)
    with pytest.raises(ValueError, match=r"\(B, 3, ...\)"):
        quantizer(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="floating point"):
        quantizer(torch.ones(2, 3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantizer([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        quantizer.quantize(torch.tensor([[4]]))
    with pytest.raises(TypeError, match="integers"):
        quantizer.quantize(torch.tensor([[1.0]]))
    for kwargs, match in (({"num_codes": 0}, "num_codes"), ({"dim": 2.5}, "dim"), ({"beta": -1.0}, "beta"),
                          ({"decay": 1.0}, "decay"), ({"eps": 0.0}, "eps"), ({"restart_threshold": -1.0}, "restart")):
        with pytest.raises(ValueError, match=match):
            vq.VectorQuantizer(**{"num_codes": 4, "dim": 3, **kwargs})
    with pytest.raises(ValueError, match="divisible"):
        vq.VQVAE((1, 6, 6), downsample=2)
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        vq.VQVAE((3, 8, 8))
    model = vq.VQVAE(channels=4, prior_channels=4)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model.nll(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError):
        model.nll(torch.full((2, 1, 8, 8), 17.0))  # levels go up to 16
    with pytest.raises(ValueError, match="positive"):
        model.sample(0)


def test_cli_trains_a_vqvae_with_its_prior_and_reports_the_bound(tmp_path):
    import json

    from dgmlib.cli import main
    from dgmlib.data import load_image_data
    from dgmlib.models import MODELS
    from dgmlib.train import load_checkpoint

    out = tmp_path / "vqvae"
    assert main(["train", "vqvae", "--fast", "--epochs", "2", "--no-progress", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_nll_nats"] == pytest.approx(m["recon_nll_nats"] + m["prior_nll_nats"], rel=1e-5)
    assert m["uniform_prior_nll_nats"] == pytest.approx(4 * math.log(64))  # a 2x2 code map, 64 codes
    assert m["uniform_bound_nats"] == pytest.approx(m["recon_nll_nats"] + m["uniform_prior_nll_nats"], rel=1e-5)
    assert m["nll_method"] == "VQ-VAE bound, PixelCNN prior" and m["prior_epochs_run"] >= 1
    assert 1 <= m["perplexity"] <= 64 and m["codes_used_train"] + m["dead_codes_train"] == 64
    for name in ("samples", "reconstructions", "codes", "curves"):
        assert (out / f"{name}.png").stat().st_size > 0
    # the checkpoint brings back the fitted prior and the codebook statistics
    model = MODELS["vqvae"].build(load_image_data("digits"))
    load_checkpoint(out / "model.pt", model)
    assert model.prior_fitted and int(model.quantizer.restarts) == m["restarts"]
    model.eval()
    with torch.no_grad():
        nll = model.nll(data.load_digits("test")).mean().item()
    assert nll == pytest.approx(m["test_nll_nats"], rel=1e-5)


# --------------------------------------------------------------------------- VQ-VAE-2


def _tiny_vqvae2(seed: int) -> vq.VQVAE2:
    """4x4 images with 2 levels; a 1x1 top and a 2x2 bottom code map with K = 2 codes: 2 x 16 code pairs."""
    torch.manual_seed(seed)
    model = vq.VQVAE2((1, 4, 4), num_levels=2, num_codes=2, code_dim=2, channels=4, prior_channels=4).double()
    return _randomise(model, seed=seed, scale=1.0).eval()


def _all_code_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    pairs = torch.cartesian_prod(*[torch.arange(2)] * 5)  # (32, 5): the top code, then the 4 bottom codes
    return pairs[:, :1].view(32, 1, 1), pairs[:, 1:].view(32, 2, 2)


def test_conditional_pixelcnn_is_causal_normalised_and_conditioned():
    prior = _randomise(vq.ConditionalPixelCNN((1, 4, 4), 3, cond_levels=5, cond_shape=(2, 2), channels=4),
                       seed=3, scale=0.7).double()
    cond = torch.tensor([[[0, 4], [2, 1]]])
    y = torch.tensor([[[[0.0, 1, 2, 0], [1, 1, 0, 2], [2, 0, 1, 1], [0, 2, 2, 1]]]], dtype=torch.float64)
    jac = torch.func.jacrev(lambda v: prior(v.view(1, 1, 4, 4), cond).sum(1).flatten())(y.flatten())  # (16, 16)
    assert torch.equal(jac.abs() > 0, (jac.abs() > 0) & torch.ones(16, 16, dtype=torch.bool).tril(-1))
    assert (jac.abs() > 0).sum() > 30  # and it does look at earlier positions
    maps = torch.cartesian_prod(*[torch.arange(3.0, dtype=torch.float64)] * 4).view(81, 1, 2, 2)
    small = _randomise(vq.ConditionalPixelCNN((1, 2, 2), 3, cond_levels=4, cond_shape=(1, 1), channels=4),
                       seed=4, scale=1.0).double()
    for c in range(4):
        log_p = small.log_prob(maps, torch.full((81, 1, 1), c))
        torch.testing.assert_close(torch.logsumexp(log_p, 0), torch.tensor(0.0, dtype=torch.float64))
    other = small.log_prob(maps, torch.full((81, 1, 1), 0)) - small.log_prob(maps, torch.full((81, 1, 1), 3))
    assert other.abs().max() > 1e-3  # the conditioning changes the distribution
    samples = small.sample(torch.tensor([[[1]], [[2]]]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, 2, 2) and torch.equal(samples, samples.round())
    with pytest.raises(ValueError, match="cond must have shape"):
        small.log_prob(maps[:2], torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        small.log_prob(maps[:1], torch.full((1, 1, 1), 4))
    with pytest.raises(ValueError, match="divide"):
        vq.ConditionalPixelCNN((1, 4, 4), 3, cond_levels=2, cond_shape=(3, 3))


def test_vqvae2_priors_sum_to_one_over_every_pair_of_code_maps():
    model = _tiny_vqvae2(5)
    model.prior_fitted = True
    c_top, c_bottom = _all_code_pairs()
    top, bottom = model.prior_nll(c_top, c_bottom)
    torch.testing.assert_close(torch.logsumexp(-(top + bottom), 0), torch.tensor(0.0, dtype=torch.float64))


@pytest.mark.parametrize("fitted", [False, True])
def test_vqvae2_bound_lies_above_the_exact_nll(fitted):
    """The exact -log P(y) = -log sum over all 32 code pairs of p(c_top) p(c_bottom | c_top) p(y | e_top, e_bottom),
    against the bound with the image's own codes, for 40 random 4x4 binary images."""
    model = _tiny_vqvae2(6)
    model.prior_fitted = fitted
    c_top, c_bottom = _all_code_pairs()
    log_prior = -sum(model.prior_nll(c_top, c_bottom))  # (32,)
    logits = model._decode_codes(c_top, c_bottom, torch.float64)  # (32, 2, 4, 4)
    images = torch.randint(0, 2, (40, 1, 4, 4), generator=torch.Generator().manual_seed(0)).double()
    log_lik = torch.stack([-torch.nn.functional.cross_entropy(logits[j].expand(40, -1, -1, -1),
                                                              images[:, 0].long(), reduction="none").sum((1, 2))
                           for j in range(32)], 1)  # (40, 32)
    exact = -torch.logsumexp(log_lik + log_prior, 1)
    bound = model.nll(images)
    assert (bound >= exact - 1e-10).all() and (bound - exact).max() > 1e-3
    recon, top, bottom = model.nll_terms(images)
    torch.testing.assert_close(bound, recon + top + bottom)
    if not fitted:
        torch.testing.assert_close(top + bottom, torch.full((40,), 5 * math.log(2), dtype=torch.float64))


def test_vqvae2_trains_its_two_levels_and_their_priors():
    torch.manual_seed(0)
    train, val = data.load_digits("train"), data.load_digits("val")
    model = vq.VQVAE2(channels=16, num_codes=16, prior_channels=16)
    assert model.top_shape == (2, 2) and model.bottom_shape == (4, 4)
    history = fit(model, train, val, loss_fn=model.training_loss, epochs=2, progress=False)
    assert history.train_loss[-1] < history.train_loss[0]
    model.eval()
    uniform = model.nll(val).mean()
    vq.fit_prior(model, train, val, epochs=2, progress=False)
    assert model.prior_fitted and model.nll(val).mean() < uniform
    samples = model.sample(3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples, model.sample(3, generator=torch.Generator().manual_seed(1)))
    assert samples.shape == (3, 1, 8, 8)
    fresh = vq.VQVAE2(channels=16, num_codes=16, prior_channels=16)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert fresh.prior_fitted
    torch.testing.assert_close(fresh.nll(val[:10]), model.nll(val[:10]))
    with pytest.raises(ValueError, match="divisible by 4"):
        vq.VQVAE2((1, 6, 6))


# --------------------------------------------------------------------------- FQ-GAN and the Fréchet distance


def test_frechet_distance_against_scipy_sqrtm():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 5, generator=g, dtype=torch.float64)
    b = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 1
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    root = linalg.sqrtm((cov_a @ cov_b).numpy()).real
    expected = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root.trace())
    assert vq.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert vq.frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)
    assert abs(vq.frechet_distance(a, a)) < 1e-8
    # one dimension: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    x = torch.randn(100, 1, generator=g, dtype=torch.float64)
    y = 3 * x + 2
    assert vq.frechet_distance(x, y) == pytest.approx((2 * x.mean() + 2).item() ** 2 + (2 * x.std()).item() ** 2)
    with pytest.raises(ValueError, match="N, M >= 2"):
        vq.frechet_distance(a[:, :3], b)


def test_the_digit_classifier_is_accurate_and_the_floor_is_below_noise():
    assert vq.classifier_accuracy() > 0.95
    test = data.load_digits("test") / 16.0
    floor = vq.frechet_digit_distance(test)
    assert floor == vq.frechet_digit_distance(test)  # trained once, deterministic
    assert floor < 0.1 * vq.frechet_digit_distance(torch.rand(447, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    shuffled = test.flatten(1)[:, torch.randperm(64, generator=torch.Generator().manual_seed(1))].view(-1, 1, 8, 8)
    assert vq.frechet_digit_distance(shuffled) > 5 * floor  # the same pixel values, no digits
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        vq.frechet_digit_distance(torch.rand(4, 64))


def test_gan_loss_routes_each_players_gradient_to_its_own_network():
    torch.manual_seed(0)
    gan = vq.GAN(channels=8, latent_dim=4, quantize=False).double()
    y = data.load_digits("train")[:16].double()
    torch.manual_seed(1)
    gan.training_loss(y).sum().backward()
    grads = {n: p.grad.clone() for n, p in gan.named_parameters()}
    gan.zero_grad()
    torch.manual_seed(1)
    x = y * (2.0 / 16) - 1
    fake = gan.generator(torch.randn(16, 4, dtype=torch.float64))
    d_real, _ = gan.discriminator(x)
    d_fake, _ = gan.discriminator(fake.detach())
    loss_d = (torch.nn.functional.softplus(-d_real) + torch.nn.functional.softplus(d_fake)).sum()
    loss_g = torch.nn.functional.softplus(-gan.discriminator(fake)[0]).sum()
    d_params = list(gan.discriminator.parameters())
    g_params = list(gan.generator.parameters())
    for p, expected in zip(d_params, torch.autograd.grad(loss_d, d_params, retain_graph=True)):
        name = next(n for n, q in gan.named_parameters() if q is p)
        torch.testing.assert_close(grads[name], expected)
    for p, expected in zip(g_params, torch.autograd.grad(loss_g, g_params)):
        name = next(n for n, q in gan.named_parameters() if q is p)
        torch.testing.assert_close(grads[name], expected)


def test_fq_gan_quantizes_real_and_fake_features_and_the_generator_pass_does_not_update(monkeypatch):
    torch.manual_seed(0)
    gan = vq.GAN(channels=8, latent_dim=4, quantize=True, num_codes=16)
    quantizer = gan.discriminator.quantizer
    assert quantizer.dim == 16 and quantizer.ema
    updates = []
    original = quantizer._update
    monkeypatch.setattr(quantizer, "_update", lambda *a: (updates.append(1), original(*a)))
    loss = gan.training_loss(data.load_digits("train")[:32])
    assert loss.shape == (32,) and len(updates) == 2  # the real and the fake batch, not the generator's pass
    loss.mean().backward()
    assert gan.generator.linear.weight.grad.abs().sum() > 0
    assert gan.discriminator.bottom[0].weight.grad.abs().sum() > 0
    assert quantizer.training


def test_minibatch_std_and_gan_samples():
    x = torch.randn(5, 3, 2, 2)
    out = vq.MinibatchStd()(x)
    assert out.shape == (5, 4, 2, 2)
    torch.testing.assert_close(out[:, 3], x.std(0, unbiased=False).mean().expand(5, 2, 2))
    gan = vq.GAN(channels=8)
    s = gan.sample(6, generator=torch.Generator().manual_seed(0))
    assert s.shape == (6, 1, 8, 8) and 0 <= s.min() and s.max() <= 1
    torch.testing.assert_close(s, gan.sample(6, generator=torch.Generator().manual_seed(0)))
    assert gan.generator.training  # sampling put it back
    with pytest.raises(ValueError, match="divisible by 4"):
        vq.GAN((1, 6, 6))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        gan.training_loss(torch.zeros(2, 64))


def test_cli_trains_a_gan_without_validation_and_reports_the_frechet_distance(tmp_path):
    import json

    from dgmlib.cli import main

    out = tmp_path / "gan"
    assert main(["train", "fqgan", "--quantize", "no", "--fast", "--epochs", "1", "--no-progress",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["frechet_distance"] > m["frechet_floor"] > 0 and m["classifier_accuracy"] > 0.95
    assert "test_nll_nats" not in m and "val_loss" not in m and m["best_epoch"] == -1
    assert "feature_perplexity" not in m and m["quantize"] == "no"
    assert (out / "samples.png").stat().st_size > 0


@pytest.mark.parametrize("two_levels", [False, True])
def test_fitted_priors_evaluate_and_sample_on_meta(two_levels):
    """The prior paths (stage 2 done) keep to the device of the parameters: on ``meta`` any tensor made on the CPU
    and mixed in, or any value read, raises (the registry's device test covers the uniform-prior paths)."""
    model = (vq.VQVAE2 if two_levels else vq.VQVAE)(channels=4, num_codes=8, prior_channels=4).to("meta").eval()
    model.prior_fitted = True
    y = torch.zeros(3, 1, 8, 8, device="meta")
    with torch.no_grad():
        assert model.nll(y).shape == (3,) and model.nll(y).device.type == "meta"
        assert model.sample(2).shape == (2, 1, 8, 8)
        assert model.sample(2, generator=torch.Generator().manual_seed(0)).device.type == "meta"


def test_vqvae2_decodes_given_code_maps_as_its_sampler_does():
    model = vq.VQVAE2((1, 8, 8), 17, num_codes=8, code_dim=4, channels=8, prior_channels=8).eval()
    c_top = torch.randint(0, 8, (3, *model.top_shape))
    c_bottom = torch.randint(0, 8, (3, *model.bottom_shape))
    images = model.decode(c_top, c_bottom)
    assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        logits = model.decode_logits(model.quant_top.quantize(c_top), model.quant_bottom.quantize(c_bottom))
    levels = torch.arange(17.0)[:, None, None]
    torch.testing.assert_close(images, (logits.softmax(1) * levels).sum(1, keepdim=True) / 16)
    with pytest.raises(ValueError, match="indices"):
        model.decode(c_top, c_bottom + 8)
