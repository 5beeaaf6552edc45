"""The VAE topic: KLs, the reparametrization, IWAE, the discretized logistic, ELBO surgery, priors."""

import math

import pytest
import torch

from dgmlib import data, vae


def _digits(n=32):
    return data.load_digits("test")[:n]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _model(prior="standard", decoder="categorical", latent_dim=4):
    torch.manual_seed(0)
    return vae.build_vae((1, 8, 8), 17, latent_dim, prior, decoder, hidden=32, channels=8,
                         pseudo_init=data.load_digits("train")[:10], num_pseudo=10, num_components=5)


# --------------------------------------------------------------------------- Gaussian maths


def test_analytic_kl_matches_monte_carlo():
    g = _gen()
    mu, log_var = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    mu_p, log_var_p = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    z = vae.reparameterize(mu, log_var, 200_000, g)  # (3, S, 4)
    log_q = vae.gaussian_log_prob(z, mu[:, None], log_var[:, None])
    for analytic, log_p in ((vae.kl_normal_standard(mu, log_var), vae.standard_normal_log_prob(z)),
                            (vae.kl_normal(mu, log_var, mu_p, log_var_p),
                             vae.gaussian_log_prob(z, mu_p[:, None], log_var_p[:, None]))):
        terms = log_q - log_p
        se = terms.std(1) / math.sqrt(terms.shape[1])
        assert (terms.mean(1) - analytic).abs().max() < 4 * se.max()
    assert torch.allclose(vae.kl_normal(mu, log_var, torch.zeros_like(mu), torch.zeros_like(mu)),
                          vae.kl_normal_standard(mu, log_var))
    assert torch.allclose(vae.kl_normal_standard(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_gaussian_log_prob_matches_torch_distributions():
    g = _gen()
    z, mu, log_var = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * log_var)).log_prob(z).sum(-1)
    assert torch.allclose(vae.gaussian_log_prob(z, mu, log_var), ref)
    assert torch.allclose(vae.standard_normal_log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_gradients_pass_through_the_reparametrization():
    mu = torch.tensor([[0.7, -1.2]], dtype=torch.float64, requires_grad=True)
    log_var = torch.tensor([[0.3, -0.5]], dtype=torch.float64, requires_grad=True)
    z = vae.reparameterize(mu, log_var, 400_000, _gen())  # (1, S, 2)
    # pathwise gradients of E[z^2]: d/dmu = 2 mu and d/dlog_var = sigma^2
    (z ** 2).mean(1).sum().backward()
    assert torch.allclose(mu.grad, 2 * mu.detach(), atol=0.02)
    assert torch.allclose(log_var.grad, torch.exp(log_var.detach()), atol=0.02)
    model = _model()
    model.nll(_digits(8)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- IWAE


def test_iwae_with_one_sample_is_the_elbo():
    log_w = torch.randn(6, 1, dtype=torch.float64)
    assert torch.equal(vae.iwae_bound(log_w), log_w[:, 0])
    y = _digits(16)
    for prior in ("flow", "vamp", "mog"):  # Monte-Carlo KL: the same noise gives the same number
        model = _model(prior)
        assert torch.allclose(model.iwae(y, 1, _gen(3)), model.elbo_terms(y, _gen(3))[0] - model.elbo_terms(y, _gen(3))[1],
                              atol=1e-4)
    model = _model("standard")  # analytic KL: equal in expectation
    with torch.no_grad():
        log_w = model.log_weights(y, 2000, _gen(1))  # (B, S): the mean of k = 1 bounds
        mu, log_var = model.encode(y)
        recon = model.decoder.log_prob(y, vae.reparameterize(mu, log_var, 2000, _gen(2))).mean(1)
    se = log_w.std(1) / math.sqrt(log_w.shape[1])
    assert ((log_w.mean(1) - (recon - vae.kl_normal_standard(mu, log_var))).abs() < 5 * se + 0.05).all()


def test_iwae_tightens_as_k_grows():
    model, y = _model("flow"), _digits(64)
    with torch.no_grad():
        bounds = [torch.stack([model.iwae(y, k, _gen(s)).mean() for s in range(5)]).mean().item()
                  for k in (1, 5, 50)]
        nll = model.importance_nll(y, k=500, chunk=64, generator=_gen(9)).mean().item()
    assert bounds[0] < bounds[1] < bounds[2] < -nll + 0.5
    assert vae.iwae_bound(torch.tensor([[-1000.0, -1001.0]])).isfinite().all()  # logsumexp, no underflow


def test_importance_nll_is_chunked_without_changing_the_estimate():
    model, y = _model(), _digits(8)
    a = model.importance_nll(y, k=300, chunk=300, generator=_gen(1))
    b = model.importance_nll(y, k=300, chunk=7, generator=_gen(2))
    assert a.shape == (8,) and (a - b).abs().max() < 1.0


# --------------------------------------------------------------------------- discretized logistic


@pytest.mark.parametrize("log_scale", [-20.0, -5.0, -1.0, 0.0, 1.5, 6.0])
@pytest.mark.parametrize("mean", [-3.0, 0.0, 0.4, 7.5, 16.0, 25.0])
def test_discretized_logistic_sums_to_one(mean, log_scale):
    levels = torch.arange(17, dtype=torch.float64)
    m = torch.full_like(levels, mean, requires_grad=True)
    s = torch.full_like(levels, log_scale, requires_grad=True)
    logp = vae.discretized_logistic_log_prob(levels, m, s, 17)
    assert torch.isfinite(logp).all()
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-9)
    logp.sum().backward()  # no NaN from the branches torch.where discards
    assert torch.isfinite(m.grad).all() and torch.isfinite(s.grad).all()


def test_discretized_logistic_matches_the_cdf_and_is_stable_at_tiny_scales():
    levels = torch.arange(17, dtype=torch.float64)
    mean, log_scale = torch.full_like(levels, 6.3), torch.full_like(levels, 0.2)
    cdf = lambda v: torch.sigmoid((v - mean) / math.exp(0.2))  # noqa: E731
    naive = torch.log(torch.where(levels == 16, 1.0, cdf(levels + 0.5)) - torch.where(levels == 0, 0.0, cdf(levels - 0.5)))
    assert torch.allclose(vae.discretized_logistic_log_prob(levels, mean, log_scale, 17), naive, atol=1e-12)
    # a scale of 2e-9 in float32: all mass on the level of the mean, large finite log-probs elsewhere
    mean = torch.full((17,), 3.2, requires_grad=True)
    log_scale = torch.full((17,), -20.0, requires_grad=True)
    logp = vae.discretized_logistic_log_prob(levels.float(), mean, log_scale, 17)
    assert logp[3].item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(logp).all() and logp[5] < -1e8
    logp.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


# --------------------------------------------------------------------------- ELBO surgery


def _quadrature_surgery(m, s, prior_log_prob):
    """Exact (to quadrature error) mean KL, marginal KL and MI for 1D Gaussian posteriors."""
    grid = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    dz = grid[1] - grid[0]
    log_q = torch.distributions.Normal(m[:, None], s[:, None]).log_prob(grid)  # (n, G)
    log_agg = torch.logsumexp(log_q, 0) - math.log(len(m))
    log_p = prior_log_prob(grid[:, None])
    q = log_q.exp()
    mean_kl = ((q * (log_q - log_p)).sum(1) * dz).mean()
    marginal_kl = (log_agg.exp() * (log_agg - log_p)).sum() * dz
    mutual_info = ((q * (log_q - log_agg)).sum(1) * dz).mean()
    return mean_kl.item(), marginal_kl.item(), mutual_info.item()


def test_elbo_surgery_identity_on_an_exact_case():
    m = torch.tensor([-2.0, 0.5, 1.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 0.3], dtype=torch.float64)
    mu, log_var = m[:, None], (2 * s.log())[:, None]
    mog = vae.MixturePrior(1, 2).double()
    for prior_log_prob, analytic in ((vae.standard_normal_log_prob, True), (lambda z: mog.log_prob(z).detach(), False)):
        mean_kl, marginal_kl, mutual_info = _quadrature_surgery(m, s, prior_log_prob)
        assert mean_kl == pytest.approx(marginal_kl + mutual_info, abs=1e-8)  # the theorem
        assert 0 <= mutual_info <= math.log(3)
        est = vae.elbo_surgery(mu, log_var, prior_log_prob, num_samples=100_000, generator=_gen(), analytic_kl=analytic)
        assert est.mean_kl == pytest.approx(est.marginal_kl + est.mutual_info, abs=1e-9)  # same samples
        assert abs(est.mutual_info - mutual_info) < 4 * est.mutual_info_se
        assert abs(est.marginal_kl - marginal_kl) < 4 * est.marginal_kl_se
        if analytic:
            assert est.mean_kl_analytic == pytest.approx(mean_kl, abs=1e-8)


def test_mutual_information_lies_between_zero_and_log_n():
    g = _gen()
    far = vae.elbo_surgery(torch.randn(50, 3, generator=g) * 100, torch.full((50, 3), -4.0),
                           vae.standard_normal_log_prob, 10, g)
    assert far.mutual_info <= far.log_n + 1e-6 and far.mutual_info == pytest.approx(far.log_n, abs=1e-3)
    same = vae.elbo_surgery(torch.zeros(50, 3), torch.zeros(50, 3), vae.standard_normal_log_prob, 10, g)
    assert same.mutual_info == pytest.approx(0.0, abs=1e-6) and same.marginal_kl == pytest.approx(0.0, abs=1e-6)
    mid = vae.elbo_surgery(torch.randn(50, 3, generator=g), torch.full((50, 3), -1.0),
                           vae.standard_normal_log_prob, 10, g)
    assert -3 * mid.mutual_info_se <= mid.mutual_info <= mid.log_n


def test_aggregate_posterior_is_the_mixture():
    g = _gen()
    mu, log_var, z = torch.randn(7, 2, generator=g), torch.randn(7, 2, generator=g), torch.randn(11, 2, generator=g)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(7)),
        torch.distributions.Independent(torch.distributions.Normal(mu, torch.exp(0.5 * log_var)), 1))
    assert torch.allclose(vae.log_aggregate_posterior(z, mu, log_var, chunk=4), mix.log_prob(z), atol=1e-5)


def test_active_units_counts_varying_posterior_means():
    g = _gen()
    mu = torch.cat([torch.randn(200, 3, generator=g), 0.01 * torch.randn(200, 2, generator=g)], 1)
    count, variance = vae.active_units(mu)
    assert count == 3 and variance.shape == (5,)


# --------------------------------------------------------------------------- priors and models


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp", "flow"])
def test_every_prior_is_a_normalised_density(prior):
    model = _model(prior, latent_dim=2)
    for p in model.prior.parameters():
        p.data.add_(0.1 * torch.randn(p.shape, generator=_gen(5)))
    grid = torch.linspace(-9, 9, 601)
    zz = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        mass = model.prior.log_prob(zz).exp().sum().item() * (grid[1] - grid[0]).item() ** 2
        samples = model.prior.sample(300, generator=_gen())
    assert mass == pytest.approx(1.0, abs=2e-3)
    assert samples.shape == (300, 2) and torch.isfinite(model.prior.log_prob(samples)).all()


@pytest.mark.parametrize("decoder", ["categorical", "dlogistic", "autoregressive"])
def test_decoders_give_normalised_distributions_over_levels(decoder):
    """Enumerate every image of a 1x2 event with 3 levels: the probabilities sum to 1."""
    torch.manual_seed(0)
    dec = {"categorical": lambda: vae.CategoricalDecoder(3, (1, 2, 2), 3, channels=4),
           "dlogistic": lambda: vae.DiscretizedLogisticDecoder(3, (1, 2, 2), 3, channels=4),
           "autoregressive": lambda: vae.AutoregressiveDecoder(3, (1, 2, 2), 3, channels=4, num_layers=2)}[decoder]()
    ys = torch.cartesian_prod(*[torch.arange(3.0)] * 4).view(-1, 1, 2, 2)  # all 81 images
    z = torch.randn(1, 3).expand(len(ys), 3)
    with torch.no_grad():
        assert torch.logsumexp(dec.log_prob(ys, z), 0).item() == pytest.approx(0.0, abs=1e-5)
        sample = dec.sample(torch.randn(5, 3), generator=_gen())
    assert sample.shape == (5, 1, 2, 2) and ((sample >= 0) & (sample <= 2)).all()


def test_bernoulli_decoder_on_binarized_digits():
    y = (_digits(8) > 8).float()
    dec = vae.BernoulliDecoder(4, (1, 8, 8), channels=8)
    z = torch.randn(8, 3, 4)
    assert dec.log_prob(y, z).shape == (8, 3) and (dec.log_prob(y, z) < 0).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dec.log_prob(_digits(8), z)


def test_autoregressive_decoder_is_causal():
    dec = vae.AutoregressiveDecoder(2, (1, 4, 4), 5, channels=8, num_layers=3)
    for p in dec.parameters():
        p.data.normal_(0, 0.3)
    y, z = torch.randint(0, 5, (1, 16)).float(), torch.randn(1, 2)
    jac = torch.autograd.functional.jacobian(lambda v: dec.logits(v, z).sum(-1), y)[0, :, 0]  # (D, D)
    assert torch.equal(jac.triu() != 0, torch.zeros(16, 16, dtype=torch.bool))  # logit d ignores y_>=d
    assert (jac.tril(-1) != 0).sum() > 40  # ...and does use earlier pixels


def test_hierarchical_vae_bounds_and_gradients():
    torch.manual_seed(0)
    model, y = vae.HierarchicalVAE((1, 8, 8), 17, (4, 2), hidden=32, channels=8), _digits(16)
    model.nll(y).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        elbo = torch.stack([model.elbo(y) for _ in range(100)]).mean(0)
        iwae1 = model.log_weights(y, 400).mean(1)  # the mean of 400 k = 1 bounds
        nll = model.importance_nll(y, 200)
    assert (iwae1 - elbo).abs().mean() < 1.0  # the same bound, analytic KLs against Monte Carlo
    assert (-nll).mean() > elbo.mean()
    assert model.sample(4, generator=_gen()).shape == (4, 1, 8, 8)
    metrics = vae.vae_metrics(model, y, k=20, elbo_samples=2)
    assert metrics["latent_dim"] == 4 and metrics["test_nll_nats"] <= metrics["neg_elbo_nats"] + 1


def test_vae_metrics_and_sampling():
    model, y = _model("flow"), _digits(40)
    m = vae.vae_metrics(model, y, k=50, elbo_samples=2)
    for key in ("test_nll_nats", "neg_elbo_nats", "kl_nats", "mutual_info_nats", "marginal_kl_nats", "active_units"):
        assert math.isfinite(m[key]), key
    assert m["neg_elbo_nats"] == pytest.approx(m["recon_nats"] + m["kl_nats"])
    assert m["mutual_info_nats"] <= m["log_n"] + 1e-6
    assert vae.vae_metrics(model, y, k=50, elbo_samples=2) == m  # reproducible
    x = model.sample(6, generator=_gen())
    assert x.shape == (6, 1, 8, 8) and x.min() >= 0 and x.max() <= 1


def test_checkpoint_round_trip_keeps_the_prior(tmp_path):
    from dgmlib.train import load_checkpoint, save_checkpoint

    model = _model("vamp")
    save_checkpoint(tmp_path / "m.pt", model)
    other = _model("vamp")
    other.prior.pseudo_inputs.data.zero_()
    load_checkpoint(tmp_path / "m.pt", other)
    y = _digits(4)
    assert torch.equal(model.iwae(y, 3, _gen()), other.iwae(y, 3, _gen()))


# --------------------------------------------------------------------------- bad input


def test_bad_input_fails_loudly():
    model = _model()
    y = _digits(4)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        model.nll(y + 1)
    with pytest.raises(ValueError, match="integer levels"):
        model.nll(y + 0.5)
    with pytest.raises(ValueError, match="shape"):
        model.nll(y.view(4, 64))
    with pytest.raises(TypeError, match="Tensor"):
        model.nll(y.numpy())
    with pytest.raises(ValueError, match="same shape"):
        vae.reparameterize(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="floating"):
        vae.kl_normal_standard(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        vae.kl_normal_standard(torch.full((2, 3), float("nan")), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_samples"):
        vae.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="2 dimensions"):
        vae.iwae_bound(torch.zeros(5))
    with pytest.raises(ValueError, match="k must be"):
        model.importance_nll(y, k=0)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        vae.discretized_logistic_log_prob(torch.tensor([17.0]), torch.zeros(1), torch.zeros(1), 17)
    with pytest.raises(ValueError, match="unknown prior"):
        vae.build_vae(prior="gaussian")
    with pytest.raises(ValueError, match="unknown decoder"):
        vae.build_vae(decoder="bernoulli")
    with pytest.raises(ValueError, match="at least 2"):
        vae.active_units(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="n >= 2"):
        vae.elbo_surgery(torch.zeros(1, 3), torch.zeros(1, 3), vae.standard_normal_log_prob)
    with pytest.raises(ValueError, match="same L"):
        vae.log_aggregate_posterior(torch.zeros(4, 2), torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="latent_dim"):
        vae.VAE(vae.GaussianEncoder((1, 8, 8), 3), vae.CategoricalDecoder(4, (1, 8, 8), 17), vae.StandardNormalPrior(4), 17)
    with pytest.raises(ValueError, match="z must be"):
        model.decoder.log_prob(y, torch.zeros(3, 4))
