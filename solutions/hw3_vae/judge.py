"""The judges of hw3_vae: every test cell's points, decided in the grader (``dgmlib.grading.judge``).

Each judge draws its inputs and parameters from ``rng`` (a secret seed per submission), calls the student's
code through the cell's probe, and compares with the reference: the solution's own cells (``REF``) and
``dgmlib.vae``, both here in the grader. The bounds and the VampPrior take a model, an encoder or a prior as an
argument, which cannot cross the wire: the judge builds them *in the kernel* with the given constructors the probe
exposes (``small_vae``, ``vae.GaussianEncoder``, ``vae.MixturePrior``), loads parameters it drew itself into them,
and passes the resulting handles; noise is reproduced by seeding a kernel ``torch.Generator`` with a seed drawn
here, so the reference sees the same draws. The trained model's test NLL is measured by loading its parameters
into the reference ``vae.VAE`` with a VampPrior and estimating it with ``dgmlib.vae`` here: the student's methods
are never asked for a number that earns points.

This file is the instructor's: it is never released, and the student's kernel never sees it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dgmlib import data, vae
from dgmlib.grading.judge import secret_int as _int, secret_seed as _seed
from dgmlib.grading.judge import (JudgeFailure, as_tensor, expect, expect_close, expect_equal, expect_le,
                                  expect_shape, judge, parameters, randomise, solution_cells)

REF = solution_cells(Path(__file__).with_name("hw3_vae.ipynb"), "bounds", "surgery", "vamp")

F64 = torch.float64
SHAPE, LEVELS = (1, 8, 8), 17


def _gen(k, seed: int):
    """A ``torch.Generator`` in the kernel seeded with ``seed`` (a handle the student's code draws from)."""
    generator = k.Generator()
    generator.manual_seed(seed)
    return generator


def _levels(rng: torch.Generator, n: int) -> torch.Tensor:
    """``n`` images of levels (B, 1, 8, 8), float32: real digits of a random split, and some random levels."""
    split = ("train", "val", "test")[_int(rng, 0, 2)]
    digits = data.load_digits(split)
    real = digits[torch.randperm(len(digits), generator=rng)[: n - n // 4]]
    noise = torch.randint(0, LEVELS, (n // 4, *SHAPE), generator=rng).float()
    return torch.cat([real, noise])


def _random_vae(prior: str, latent_dim: int, rng: torch.Generator, scale: float = 0.2) -> vae.VAE:
    """The architecture of the notebook's ``small_vae``, with every parameter drawn from ``rng`` (float32)."""
    model = vae.build_vae(SHAPE, LEVELS, latent_dim, prior, hidden=32, channels=8, num_pseudo=5)
    randomise(model, rng, scale)
    if prior == "mog":
        with torch.no_grad():
            model.prior.means.mul_(1.0 / scale)  # components about one unit apart, as at initialisation
    return model.float().eval()


def _remote_vae(k, prior: str, latent_dim: int, reference: vae.VAE):
    """``small_vae(prior, latent_dim)`` built in the kernel, with the reference's parameters and buffers."""
    model = k.small_vae(prior, latent_dim)
    model.load_state_dict(reference.state_dict())
    return model


def _pair(value, what: str) -> torch.Tensor:
    """The two numbers of ``value`` (floats or one-element tensors) as a float64 tensor of shape (2,)."""
    expect(isinstance(value, (tuple, list)) and len(value) == 2, f"{what} must return the pair (mutual_info, "
                                                                   f"marginal_kl)")
    out = []
    for v in value:
        if isinstance(v, torch.Tensor):
            expect(v.numel() == 1 and not v.is_complex(), f"{what} must return two numbers")
            v = float(v.reshape(()))
        expect(isinstance(v, (int, float)) and not isinstance(v, bool), f"{what} must return two floats")
        out.append(float(v))
    return torch.tensor(out, dtype=F64)


# ------------------------------------------------------------------ Part 1: the bounds


@judge("test_kl")
def kl(k, rng):
    mine = k.gaussian_kl(torch.zeros(4, 3, dtype=F64), torch.zeros(4, 3, dtype=F64))
    expect_close(mine, torch.zeros(4), msg="KL(N(0, I) || N(0, I)) = 0, shape (B,)")
    for b, l, scale in ((1, 1, 1.0), (_int(rng, 2, 9), 1, 2.0), (_int(rng, 2, 9), _int(rng, 2, 8), 1.0),
                        (_int(rng, 5, 20), _int(rng, 8, 24), 3.0)):
        mu = scale * torch.randn(b, l, generator=rng, dtype=F64)
        log_var = scale * torch.randn(b, l, generator=rng, dtype=F64)
        mine = expect_shape(k.gaussian_kl(mu, log_var), (b,), f"gaussian_kl of ({b}, {l}) inputs")
        expect_close(mine, vae.kl_normal_standard(mu, log_var),
                     msg="1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2), summed over the latent axis")


@judge("test_elbo")
def elbo(k, rng):
    for latent_dim, n in ((4, 8), (_int(rng, 2, 8), _int(rng, 6, 16)), (_int(rng, 1, 6), 5)):
        reference = _random_vae("standard", latent_dim, rng)
        model = _remote_vae(k, "standard", latent_dim, reference)
        y, seed = _levels(rng, n), _seed(rng)
        mine = expect_shape(k.elbo(model, y, _gen(k, seed)), (n,), "elbo(model, y, generator)")
        with torch.no_grad():
            expected = REF.elbo(reference, y, torch.Generator().manual_seed(seed))
            recon, kl_term = reference.elbo_terms(y, torch.Generator().manual_seed(seed))
        expect_close(expected, recon - kl_term, atol=1e-3, rtol=1e-5, msg="the reference agrees with dgmlib")
        expect_close(mine, expected, atol=1e-3, rtol=1e-5,
                     msg="log p(y | z) - KL(q(z | y) || N(0, I)), z from one vae.reparameterize call with the "
                         "generator, the closed-form KL")
        expect(bool((mine <= 0).all()), "the ELBO of discrete data is at most 0")


@judge("test_iwae")
def iwae(k, rng):
    # iwae_bound: stable, the log of the mean weight, for every k (k = 1 included)
    for log_w in (torch.tensor([[-3.0], [-1000.0]], dtype=F64), torch.full((1, 3), -1000.0, dtype=F64),
                  50 * torch.randn(_int(rng, 3, 12), _int(rng, 2, 20), generator=rng, dtype=F64),
                  -1000 + 5 * torch.randn(_int(rng, 2, 6), _int(rng, 1, 9), generator=rng, dtype=F64)):
        mine = expect_shape(k.iwae_bound(log_w), (log_w.shape[0],), f"iwae_bound of {tuple(log_w.shape)} log-weights")
        expect_close(mine, vae.iwae_bound(log_w), msg="log (1/k) sum_s w_s, with torch.logsumexp")
    # iwae: the same draws as the reference give the same bound, for every prior and k
    for prior, k_samples in (("mog", 20), ("standard", _int(rng, 2, 9)), ("flow", 1), ("flow", _int(rng, 5, 12)),
                             ("mog", 1)):
        latent_dim, n = _int(rng, 2, 6), _int(rng, 4, 10)
        reference = _random_vae(prior, latent_dim, rng)
        model = _remote_vae(k, prior, latent_dim, reference)
        y, seed = _levels(rng, n), _seed(rng)
        mine = expect_shape(k.iwae(model, y, k_samples, _gen(k, seed)), (n,), "iwae(model, y, k, generator)")
        with torch.no_grad():
            expected = REF.iwae(reference, y, k_samples, torch.Generator().manual_seed(seed))
            dgm = reference.iwae(y, k_samples, torch.Generator().manual_seed(seed))
        expect_close(expected, dgm, atol=1e-3, rtol=1e-5, msg="the reference agrees with dgmlib")
        expect_close(mine, expected, atol=1e-3, rtol=1e-5,
                     msg=f"IWAE with the {prior} prior, k = {k_samples}: log w_s = log p(y | z_s) + log p(z_s) - "
                         "log q(z_s | y), all k draws from one vae.reparameterize call")
    # it tightens with k: the means of the student's bounds over 4 draws for k = 1, 10, 100
    reference = _random_vae("standard", 4, rng, scale=0.3)
    model = _remote_vae(k, "standard", 4, reference)
    y = _levels(rng, 12)
    means = []
    for k_samples in (1, 10, 100):
        draws = []
        for _ in range(4):
            seed = _seed(rng)
            mine = as_tensor(k.iwae(model, y, k_samples, _gen(k, seed)), "iwae").to(F64)
            with torch.no_grad():
                expected = REF.iwae(reference, y, k_samples, torch.Generator().manual_seed(seed))
            expect_close(mine, expected, atol=1e-3, rtol=1e-5, msg=f"IWAE with k = {k_samples}")
            draws.append(mine.mean())
        means.append(float(torch.stack(draws).mean()))
    expect(means[0] < means[1] < means[2], f"IWAE must tighten with k, got {means}")


# ------------------------------------------------------------------ Part 2: ELBO surgery


@judge("test_q_agg")
def q_agg(k, rng):
    for m, n, l, scale in ((9, 5, 2, 1.0), (_int(rng, 5, 20), 1, _int(rng, 1, 3), 1.0),
                           (_int(rng, 10, 30), _int(rng, 20, 50), 3, 30.0),
                           (_int(rng, 5, 15), _int(rng, 2, 8), 4, 100.0)):
        mu = scale * torch.randn(n, l, generator=rng, dtype=F64)
        log_var = torch.randn(n, l, generator=rng, dtype=F64)
        z = torch.randn(m, l, generator=rng, dtype=F64)
        z[: m // 2] += mu[torch.randint(0, n, (m // 2,), generator=rng)]  # some points where the posteriors are
        mine = expect_shape(k.log_q_agg(z, mu, log_var), (m,), f"log_q_agg of ({m}, {l}) points, {n} posteriors")
        expected = vae.log_aggregate_posterior(z, mu, log_var)
        mixture = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(torch.ones(n, dtype=F64)),
            torch.distributions.Independent(torch.distributions.Normal(mu, torch.exp(0.5 * log_var)), 1))
        expect_close(expected, mixture.log_prob(z), msg="the reference is the mixture")
        expect(bool(torch.isfinite(mine).all()), "log q_agg must be finite far from the posteriors: use logsumexp")
        expect_close(mine, expected, msg="log (1/n) sum_i N(z; mu_i, diag exp(log_var_i)), with logsumexp")


def _surgery(k, mu, log_var, prior, prior_handle, num_samples, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's (mutual_info, marginal_kl) and the reference's, with the same draws."""
    seed = _seed(rng)
    mine = _pair(k.surgery(mu, log_var, prior_handle.attr("log_prob"), num_samples, _gen(k, seed)), "surgery")
    with torch.no_grad():
        ref = vae.elbo_surgery(mu, log_var, prior.log_prob, num_samples, torch.Generator().manual_seed(seed))
        solution = REF.surgery(mu, log_var, prior.log_prob, num_samples, torch.Generator().manual_seed(seed))
    expected = torch.tensor([ref.mutual_info, ref.marginal_kl], dtype=F64)
    expect_close(torch.tensor(solution, dtype=F64), expected, msg="the reference agrees with dgmlib")
    return mine, expected


@judge("test_surgery")
def surgery(k, rng):
    # the estimators on the same draws as the reference: N(0, I) and a random mixture prior
    for prior_kind in ("standard", "mog", "mog"):
        n, l = _int(rng, 10, 40), _int(rng, 1, 3)
        mu = torch.randn(n, l, generator=rng, dtype=F64)
        log_var = torch.randn(n, l, generator=rng, dtype=F64) - 1
        if prior_kind == "standard":
            prior, handle = vae.StandardNormalPrior(l).double(), k.StandardNormalPrior(l)
        else:
            components = _int(rng, 2, 5)
            prior = randomise(vae.MixturePrior(l, components), rng, 1.0)
            handle = k.MixturePrior(l, components)
            handle.load_state_dict(prior.state_dict())
            handle.double()
        num_samples = _int(rng, 20, 60)
        mine, expected = _surgery(k, mu, log_var, prior, handle, num_samples, rng)
        expect_close(mine, expected, atol=1e-6, rtol=1e-6,
                     msg=f"(mutual_info, marginal_kl) with the {prior_kind} prior, from one vae.reparameterize call")
        expect(-0.05 <= float(mine[0]) <= math.log(n) + 1e-9, "0 <= mutual information <= log n")
    # posteriors that never overlap: MI = log n exactly, the rest is marginal KL
    n, l = _int(rng, 15, 30), _int(rng, 2, 3)
    far = 100 * torch.randn(n, l, generator=rng, dtype=F64)
    mine, expected = _surgery(k, far, torch.full((n, l), -3.0, dtype=F64), vae.StandardNormalPrior(l).double(),
                              k.StandardNormalPrior(l), _int(rng, 3, 6), rng)
    expect_close(mine[0], torch.tensor(math.log(n)), atol=1e-3, rtol=0,
                 msg="the mutual information of separated posteriors must be log n")
    expect(float(mine[1]) >= 100.0, "far posteriors have a large marginal KL")
    expect_close(mine, expected, atol=1e-6, rtol=1e-6, msg="(mutual_info, marginal_kl) of separated posteriors")
    # posteriors equal to the prior: both terms are 0
    n, l = _int(rng, 5, 25), _int(rng, 1, 3)
    mine, _ = _surgery(k, torch.zeros(n, l, dtype=F64), torch.zeros(n, l, dtype=F64),
                       vae.StandardNormalPrior(l).double(), k.StandardNormalPrior(l), _int(rng, 2, 6), rng)
    expect_close(mine, torch.zeros(2), atol=1e-5, rtol=0, msg="posteriors equal to the prior: MI = marginal KL = 0")


# ------------------------------------------------------------------ Part 3: the VampPrior


def _encoder(latent_dim: int, rng: torch.Generator) -> vae.GaussianEncoder:
    """A random ``GaussianEncoder((1, 8, 8), L, hidden=16)``, float32 values (what the kernel's will hold), whose
    posteriors of random pseudo-inputs are narrow and far apart: a mixture far from a Gaussian."""
    encoder = randomise(vae.GaussianEncoder(SHAPE, latent_dim, hidden=16), rng, 0.2).float()
    with torch.no_grad():
        encoder.net[-1].weight[:latent_dim].mul_(6.0)  # the means spread
        encoder.net[-1].bias[latent_dim:].add_(-2.5 + 0.5 * torch.randn(latent_dim, generator=rng))  # small variances
    return encoder


@judge("test_vamp")
def vamp(k, rng):
    latent_dim, num_pseudo = _int(rng, 2, 4), _int(rng, 3, 9)
    ref_encoder = _encoder(latent_dim, rng)
    encoder = k.GaussianEncoder(SHAPE, latent_dim, hidden=16)
    encoder.load_state_dict(parameters(ref_encoder))
    u = torch.rand(num_pseudo, *SHAPE, generator=rng)
    prior = k.VampPrior(encoder, u)
    prior.double()  # the shared encoder and the pseudo-inputs, in float64
    reference = vae.VampPrior(ref_encoder, num_pseudo, init=u).double()
    ref_solution = REF.VampPrior(ref_encoder, u).double()
    names = sorted(name for name, _ in reference.named_parameters())
    expect_equal(sorted(name for name, _ in ref_solution.named_parameters()), names, "the reference's parameters")

    # log_prob: (..., L) -> (...), the mixture of the K posteriors
    for shape in ((_int(rng, 3, 9),), (_int(rng, 2, 5), _int(rng, 2, 6)), (2, 3, 4)):
        z = 2 * torch.randn(*shape, latent_dim, generator=rng, dtype=F64)
        mine = expect_shape(prior.log_prob(z), shape, f"log_prob of {(*shape, latent_dim)} latents")
        with torch.no_grad():
            expected = reference.log_prob(z)
        expect_close(ref_solution.log_prob(z).detach(), expected, msg="the reference agrees with dgmlib")
        expect_close(mine, expected, msg="log (1/K) sum_k N(z; mu_k, diag exp(log_var_k)) with (mu_k, log_var_k) = "
                                         "encoder(pseudo_inputs)")

    # trainable: the gradient reaches the pseudo-inputs and the (shared) encoder, parameters named as instructed
    z = 2 * torch.randn(5, 3, latent_dim, generator=rng, dtype=F64)
    grads = k.vamp_gradients(prior, z)
    expect(isinstance(grads, dict), "vamp_gradients returns a dict")
    expect_equal(sorted(grads), names, "the prior's parameters: pseudo_inputs (an nn.Parameter) and the encoder's, "
                                       "stored as self.encoder")
    reference.zero_grad()
    reference.log_prob(z).sum().backward()
    for name, p in reference.named_parameters():
        expect(grads[name] is not None, f"no gradient reaches {name}")
        expect_close(grads[name], p.grad, msg=f"the gradient of log p(z) with respect to {name}")

    # the encoder itself, not a copy: new weights in the encoder change the prior
    new_encoder = _encoder(latent_dim, rng).double()
    encoder.load_state_dict(parameters(new_encoder))
    reference = vae.VampPrior(new_encoder, num_pseudo, init=u).double()
    z = 2 * torch.randn(7, latent_dim, generator=rng, dtype=F64)
    with torch.no_grad():
        expected = reference.log_prob(z)
    expect_close(prior.log_prob(z), expected, msg="VampPrior must keep the encoder passed in (self.encoder = encoder, "
                                                  "not a copy): new encoder weights must change the prior")

    # sample: shape (n, L), every random number from the generator, the mixture's distribution
    small = _int(rng, 1, 9)
    expect_shape(prior.sample(small), (small, latent_dim), "sample(n) without a generator")
    n, seed = 20_000, _seed(rng)
    draws = expect_shape(prior.sample(n, generator=_gen(k, seed)), (n, latent_dim), "sample(n, generator)").to(F64)
    again = prior.sample(n, generator=_gen(k, seed))
    expect_equal(as_tensor(again, "sample").to(F64), draws, "sample must take every random number from generator: "
                                                            "the same seed gives the same draws")
    expect(bool(torch.isfinite(draws).all()), "finite draws")
    with torch.no_grad():
        mu_k, log_var_k = new_encoder(reference.pseudo_inputs)
        mix_mean = mu_k.mean(0)
        mix_var = (log_var_k.exp() + mu_k ** 2).mean(0) - mix_mean ** 2
        expect_close(draws.mean(0), mix_mean, atol=float(6 * (mix_var / n).sqrt().max()), rtol=0,
                     msg="the mean of the draws must be the mixture's mean")
        expect_close(draws.var(0), mix_var, atol=0.0, rtol=0.1, msg="the variance of the draws must be the mixture's")
        # the draws' mixture log-density against that of the reference's draws: a Gaussian with the mixture's
        # moments, or unequal weights of the components, fail here
        ref_draws = reference.sample(n, generator=torch.Generator().manual_seed(_seed(rng)))
        mine_lp, ref_lp = reference.log_prob(draws), reference.log_prob(ref_draws)
        tolerance = 6 * math.sqrt(float(mine_lp.var() + ref_lp.var()) / n)
        expect(abs(float(mine_lp.mean() - ref_lp.mean())) <= tolerance,
               f"the draws do not follow the mixture: mean log p(z) {float(mine_lp.mean()):.3f}, expected "
               f"{float(ref_lp.mean()):.3f} +- {tolerance:.3f}")


# ------------------------------------------------------------------ Part 4: the trained VAE


LATENT, NUM_PSEUDO = 16, 100


def _trained_reference(k) -> tuple[vae.VAE, dict[str, torch.Tensor]]:
    """The reference ``vae.VAE`` (GaussianEncoder, CategoricalDecoder, VampPrior on the same encoder) holding the
    student's trained parameters, loaded strictly, and the student's state dict."""
    state = k.model.state_dict()
    expect(isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
           "model must be the trained vae.VAE")
    try:
        hidden = state["encoder.net.0.weight"].shape[0]
        channels = state["decoder.net.fc.weight"].shape[0] // ((SHAPE[1] // 2) * (SHAPE[2] // 2))
        encoder = vae.GaussianEncoder(SHAPE, LATENT, hidden=hidden)
        decoder = vae.CategoricalDecoder(LATENT, SHAPE, LEVELS, channels=channels)
        reference = vae.VAE(encoder, decoder, REF.VampPrior(encoder, torch.zeros(NUM_PSEUDO, *SHAPE)), LEVELS)
        reference.load_state_dict({name: t.float() for name, t in state.items()}, strict=True)
    except (KeyError, RuntimeError, IndexError, ValueError, TypeError, AttributeError) as err:
        raise JudgeFailure("model's parameters do not fit vae.VAE(vae.GaussianEncoder(images.shape, 16, "
                           "hidden=HIDDEN), vae.CategoricalDecoder(16, images.shape, 17, channels=CHANNELS), "
                           "VampPrior(encoder, u)) "
                           f"with 100 pseudo-inputs, as instructed ({str(err)[:300]})") from None
    for name, t in state.items():
        if name.startswith("encoder."):
            shared = state.get("prior." + name)
            expect(isinstance(shared, torch.Tensor) and torch.equal(shared, t),
                   "the prior must use the VAE's own encoder (VampPrior(encoder, u) with the same encoder object)")
    return reference.eval(), state


@judge("test_model")
def model_structure(k, rng):
    reference, state = _trained_reference(k)
    expect_shape(state["prior.pseudo_inputs"], (NUM_PSEUDO, *SHAPE), "the pseudo-inputs")
    # the encoder is shared: new weights in model.encoder show in model.prior (the model is restored afterwards)
    encoder, prior = k.model.attr("encoder"), k.model.attr("prior")
    encoder_state = {name[len("encoder."):]: t for name, t in state.items() if name.startswith("encoder.")}
    moved = {name: t + 0.01 * torch.randn(t.shape, generator=rng, dtype=t.dtype) for name, t in encoder_state.items()}
    try:
        encoder.load_state_dict(moved)
        seen = prior.state_dict()
        for name, t in moved.items():
            expect(isinstance(seen, dict) and isinstance(seen.get("encoder." + name), torch.Tensor)
                   and torch.equal(seen["encoder." + name], t),
                   "model.prior.encoder must be model.encoder itself (VampPrior(encoder, u))")
    finally:
        k.model.load_state_dict(state)
    restored = k.model.state_dict()
    expect(isinstance(restored, dict) and restored.keys() == state.keys()
           and all(torch.equal(restored[n], t) for n, t in state.items()), "the model could not be restored")
    val_loss = k.history.attr("val_loss")
    expect(isinstance(val_loss, list) and len(val_loss) >= 1
           and all(isinstance(v, float) and math.isfinite(v) for v in val_loss),
           "history = train.fit(model, train_y, val_y, ...) with validation losses")


TEST_NLL_BOUND = 95.0
"""nats/image; the reference solution gets about 87 in fast mode."""
IMPORTANCE_SAMPLES = 20
"""k of the grader's importance-sampled NLL (for the reference, the estimate lies about 0.7 nats above k = 200's)."""


def _importance_nll(model: vae.VAE, y: torch.Tensor, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.cat([model.importance_nll(b, IMPORTANCE_SAMPLES, generator=generator)
                          for b in y.split(500)]).mean().item()


@judge("test_nll")
def nll(k, rng):
    """The importance-sampled test NLL of the student's trained parameters in the reference architecture, on the
    447 test digits, with dgmlib's estimator; and the same on the 350 validation digits, so that a model fitted
    to the test digits themselves is caught (its test NLL would lie far below its validation NLL)."""
    reference, _ = _trained_reference(k)
    test_nll = expect_le(_importance_nll(reference, data.load_digits("test"), _seed(rng)), TEST_NLL_BOUND,
                         f"test NLL (nats/image, k = {IMPORTANCE_SAMPLES}) of your trained parameters")
    val_nll = _importance_nll(reference, data.load_digits("val"), _seed(rng))
    expect(math.isfinite(test_nll) and math.isfinite(val_nll), "a finite NLL")
    expect(test_nll >= val_nll - 5.0, f"the test NLL ({test_nll:.1f}) lies far below the validation NLL "
                                      f"({val_nll:.1f}): train on the training digits only")
