r"""Variational autoencoders: ELBO, IWAE, ELBO surgery, learnable priors and discrete decoders.

The two bounds on :math:`\log P(y)`, in nats per example (Kingma & Welling 2014, Eq. 3; Burda et al. 2016, Eq. 8):

.. math::

    \log P(y) \;\ge\; \mathbb{E}_{q(z \mid y)}[\log p(y \mid z)] - \mathrm{KL}\big(q(z \mid y) \,\|\, p(z)\big)
    \quad \text{(the ELBO)}, \qquad
    \log P(y) \;\ge\; \mathbb{E}\Big[\log \frac{1}{k} \sum_{s=1}^{k} \frac{p(y, z_s)}{q(z_s \mid y)}\Big]
    \quad \text{(IWAE)}.

Conventions used throughout:

* data are discrete levels ``y`` in ``{0..K-1}`` of shape ``(B, C, H, W)`` (``K = 17`` for digits);
  the encoder sees ``y / (K - 1)`` in [0, 1];
* latents are ``(B, L)``, or ``(B, S, L)`` when ``S`` samples are drawn per example;
* the decoders are *discrete* distributions over the levels, so ``log p(y|z)`` is a log-probability
  and the ELBO and the IWAE bound are bounds on ``log P(y)`` itself: no dequantization term enters;
* every log-density, bound and KL is in **nats per example**; convert with
  ``dgmlib.units.nats_to_bits_per_dim``.

Sources: Kingma & Welling 2014 (VAE; reparametrization Sec. 2.4, Gaussian KL App. B); Burda et al.
2016 (IWAE, Eq. 8; active units Sec. 5.2); Hoffman & Johnson 2016 ("ELBO surgery", Eq. 3-4);
Tomczak & Welling 2018 (VampPrior, Eq. 9); Salimans et al. 2017 (PixelCNN++, discretized
logistic, Sec. 2.1); Isachenko, DGM lecture 6 (ELBO surgery, NF-based prior, CDF discretization).

``discretized_logistic_log_prob`` and ``log_bin_probability`` are re-exported for compatibility;
the home is ``dgmlib.dequantization``. ``MaskedConv2d`` (the PixelCNN convolution of the
autoregressive decoder) is re-exported too; its home is ``dgmlib.autoregressive``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgmlib import flows
from dgmlib.autoregressive import MaskedConv2d  # its home; re-exported here for compatibility
from dgmlib.device import bernoulli, module_device, multinomial, rand, randint, randn, value_checks
from dgmlib.dequantization import check_levels, discretized_logistic_log_prob, log_bin_probability

__all__ = [
    "reparameterize", "gaussian_log_prob", "standard_normal_log_prob", "kl_normal_standard", "kl_normal",
    "iwae_bound", "discretized_logistic_log_prob", "log_bin_probability", "active_units", "log_aggregate_posterior",
    "ElboSurgery", "elbo_surgery", "GaussianEncoder", "DecoderNet", "CategoricalDecoder", "DiscretizedLogisticDecoder",
    "BernoulliDecoder", "MaskedConv2d", "AutoregressiveDecoder", "StandardNormalPrior", "MixturePrior", "VampPrior",
    "FlowPrior", "LatentVariableModel", "VAE", "HierarchicalVAE", "build_vae", "vae_metrics", "PRIORS", "DECODERS",
]

LOG_2PI = math.log(2 * math.pi)
PRIORS = ("standard", "mog", "vamp", "flow")
DECODERS = ("categorical", "dlogistic", "autoregressive")


# --------------------------------------------------------------------------- checks


def _check_tensor(x: Tensor, name: str, dims: int | tuple[int, ...] | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if dims is not None and x.dim() not in ((dims,) if isinstance(dims, int) else dims):
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    if value_checks(x) and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def _check_gaussian(mu: Tensor, log_var: Tensor) -> None:
    _check_tensor(mu, "mu")
    _check_tensor(log_var, "log_var")
    if mu.shape != log_var.shape:
        raise ValueError(f"mu and log_var must have the same shape, got {tuple(mu.shape)} and {tuple(log_var.shape)}")
    if mu.dim() < 1:
        raise ValueError("mu and log_var need a latent dimension (last axis)")


def _check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- Gaussian maths


def reparameterize(mu: Tensor, log_var: Tensor, num_samples: int | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    r"""Reparametrization trick :math:`z = \mu + e^{\log\sigma^2 / 2} \odot \epsilon`,
    :math:`\epsilon \sim \mathcal{N}(0, I)` (``mu`` is :math:`\mu`, ``log_var`` is :math:`\log \sigma^2`).

    Gradients flow to ``mu`` and ``log_var`` through the deterministic map; the noise does not
    depend on them (Kingma & Welling 2014, Sec. 2.4).

    Args:
        mu, log_var: ``(B, L)`` mean and log-variance of a diagonal Gaussian.
        num_samples: ``S``; if given the result is ``(B, S, L)``, otherwise ``(B, L)``.
        generator: optional ``torch.Generator`` for reproducible noise.

    Raises:
        TypeError/ValueError: for non-float, non-finite or mismatched inputs, or ``S < 1``.
    """
    _check_gaussian(mu, log_var)
    if num_samples is not None:
        _check_positive_int(num_samples, "num_samples")
        mu, log_var = mu.unsqueeze(-2), log_var.unsqueeze(-2)  # (B, 1, L)
        shape = (*mu.shape[:-2], num_samples, mu.shape[-1])
    else:
        shape = mu.shape
    eps = randn(shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + torch.exp(0.5 * log_var) * eps


def gaussian_log_prob(z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """``log N(z; mu, diag(exp(log_var)))`` in nats, summed over the last (latent) axis.

    Shapes broadcast: ``z (..., L)`` with ``mu, log_var (..., L)``; the result is ``(...)``.
    """
    return -0.5 * (LOG_2PI + log_var + (z - mu) ** 2 * torch.exp(-log_var)).sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` in nats for ``z (..., L)``; result ``(...)``."""
    return -0.5 * (LOG_2PI + z ** 2).sum(-1)


def kl_normal_standard(mu: Tensor, log_var: Tensor) -> Tensor:
    r"""Analytic ``KL(N(mu, diag(exp(log_var))) || N(0, I))`` in nats, shape ``(B,)`` for ``(B, L)`` inputs.

    :math:`\mathrm{KL} = \frac{1}{2} \sum_j \big(\mu_j^2 + \sigma_j^2 - 1 - \log \sigma_j^2\big)` (Kingma & Welling
    2014, App. B).

    Raises:
        TypeError/ValueError: for non-float, non-finite or mismatched inputs.
    """
    _check_gaussian(mu, log_var)
    return 0.5 * (mu ** 2 + torch.exp(log_var) - 1.0 - log_var).sum(-1)


def kl_normal(mu_q: Tensor, log_var_q: Tensor, mu_p: Tensor, log_var_p: Tensor) -> Tensor:
    """Analytic ``KL(N(mu_q, s_q^2) || N(mu_p, s_p^2))`` for diagonal Gaussians, nats, summed over the last axis.

    ``1/2 sum_j (log s_p^2 - log s_q^2 + (s_q^2 + (mu_q - mu_p)^2) / s_p^2 - 1)``. Shapes broadcast.

    Raises:
        TypeError/ValueError: for non-float, non-finite or mismatched inputs.
    """
    _check_gaussian(mu_q, log_var_q)
    _check_gaussian(mu_p, log_var_p)
    return 0.5 * (log_var_p - log_var_q + (torch.exp(log_var_q) + (mu_q - mu_p) ** 2) * torch.exp(-log_var_p)
                  - 1.0).sum(-1)


def iwae_bound(log_weights: Tensor) -> Tensor:
    r"""Importance-weighted bound :math:`\log \frac{1}{k} \sum_{s=1}^{k} w_s` from log-weights, nats, shape ``(B,)``.

    With :math:`\log w_s = \log p(x, z_s) - \log q(z_s \mid x)` and :math:`z_s \sim q(z \mid x)`, this is Burda et al.
    2016, Eq. 8. With ``k = 1`` it is the ELBO; its expectation increases with ``k`` towards ``log p(x)``.
    Computed with ``logsumexp`` so that weights of -1000 nats do not underflow.

    Args:
        log_weights: ``(B, k)``.

    Raises:
        TypeError/ValueError: if ``log_weights`` is not a finite float ``(B, k)`` tensor.
    """
    _check_tensor(log_weights, "log_weights", 2)
    return torch.logsumexp(log_weights, dim=1) - math.log(log_weights.shape[1])


# --------------------------------------------------------------------------- discretized logistic


# --------------------------------------------------------------------------- diagnostics


@torch.no_grad()
def active_units(mu: Tensor, threshold: float = 0.01) -> tuple[int, Tensor]:
    """Active units of Burda et al. 2016 (Sec. 5.2): ``A_j = Cov_x(E_q[z_j | x]) > threshold``.

    Args:
        mu: ``(N, L)`` posterior means ``E_q[z | x_i]`` over a dataset (``N >= 2``).
        threshold: activity threshold (0.01 in the paper and the slides).

    Returns:
        ``(count, A)``: the number of active units and the ``(L,)`` variances ``A_j``.

    Raises:
        TypeError/ValueError: for a non-float, non-finite or non-``(N, L)`` input or ``N < 2``.
    """
    _check_tensor(mu, "mu", 2)
    if mu.shape[0] < 2:
        raise ValueError("active_units needs the posterior means of at least 2 examples")
    variance = mu.var(dim=0, unbiased=False)
    return int((variance > threshold).sum()), variance


def log_aggregate_posterior(z: Tensor, mu: Tensor, log_var: Tensor, chunk: int = 256) -> Tensor:
    """``log q_agg(z) = log (1/n) sum_i N(z; mu_i, diag(exp(log_var_i)))`` in nats.

    The aggregated posterior is the mixture of the ``n`` posteriors of a dataset (Hoffman & Johnson
    2016; lecture 6, "ELBO surgery"). Evaluated ``chunk`` points at a time so memory stays
    ``O(chunk * n * L)``.

    Args:
        z: ``(M, L)`` points.
        mu, log_var: ``(n, L)`` posterior parameters of the ``n`` data points.

    Returns:
        ``(M,)`` log-densities.

    Raises:
        TypeError/ValueError: for bad shapes or non-finite values.
    """
    _check_gaussian(mu, log_var)
    _check_tensor(z, "z", 2)
    if mu.dim() != 2 or z.shape[1] != mu.shape[1]:
        raise ValueError(f"z must be (M, L) and mu, log_var (n, L) with the same L, "
                         f"got {tuple(z.shape)} and {tuple(mu.shape)}")
    out = [torch.logsumexp(gaussian_log_prob(zc[:, None, :], mu[None], log_var[None]), dim=1)  # (m, n) -> (m,)
           for zc in z.split(chunk)]
    return torch.cat(out) - math.log(mu.shape[0])


@dataclass
class ElboSurgery:
    """The dataset-level decomposition ``mean_kl = marginal_kl + mutual_info`` (all nats per example).

    Attributes:
        mean_kl: ``(1/n) sum_i KL(q(z|x_i) || p(z))``, estimated with the same samples as the others,
            so the identity holds to rounding; ``mean_kl_analytic`` is the exact value when the prior
            is the standard normal, else None.
        mutual_info: ``I_q[x, z] = (1/n) sum_i KL(q(z|x_i) || q_agg)``, in ``[0, log n]``.
        marginal_kl: ``KL(q_agg(z) || p(z))``.
        mutual_info_se, marginal_kl_se: Monte-Carlo standard errors of the two estimates.
        num_points: ``n``; ``log_n`` is the upper bound of the mutual information.
    """

    mean_kl: float
    mutual_info: float
    marginal_kl: float
    mutual_info_se: float
    marginal_kl_se: float
    num_points: int
    mean_kl_analytic: float | None = None

    @property
    def log_n(self) -> float:
        """``log n``, the largest mutual information ``n`` data points can carry."""
        return math.log(self.num_points)


@torch.no_grad()
def elbo_surgery(mu: Tensor, log_var: Tensor, prior_log_prob, num_samples: int = 1,
                 generator: torch.Generator | None = None, analytic_kl: bool = False) -> ElboSurgery:
    """Estimate the ELBO-surgery terms of Hoffman & Johnson 2016 (Eq. 3-4) for a dataset.

    For each data point ``i`` draw ``num_samples`` ``z ~ q(z|x_i)``; with ``q_agg`` evaluated exactly
    as the mixture of all ``n`` posteriors,

        mutual_info = mean[ log q(z|x_i) - log q_agg(z) ],   marginal_kl = mean[ log q_agg(z) - log p(z) ].

    Bias: the draws ``(i, z)`` are exact samples of ``q_agg``, so both are **unbiased** Monte-Carlo
    estimates of the terms *for these n points* (the slides' definition, with the empirical data
    distribution). As estimates of the population mutual information they are biased: each term
    is at most ``log n`` (because ``q_agg >= q(z|x_i) / n``), so the estimate saturates at
    ``log n`` once posteriors stop overlapping. Using a minibatch as the dataset lowers ``n`` and
    biases the mutual information down further. The lower bound 0 holds for the exact value;
    an estimate may dip below it by its standard error when the posteriors coincide.

    Args:
        mu, log_var: ``(n, L)`` posterior parameters of the dataset (``n >= 2``).
        prior_log_prob: maps ``(M, L)`` latents to ``(M,)`` prior log-densities.
        num_samples: draws per data point.
        generator: optional generator for the draws.
        analytic_kl: also fill ``mean_kl_analytic`` (only valid for the standard-normal prior).

    Raises:
        TypeError/ValueError: for bad shapes or non-finite values, ``n < 2`` or ``num_samples < 1``.
    """
    _check_gaussian(mu, log_var)
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"elbo_surgery needs (n, L) posterior parameters with n >= 2, got {tuple(mu.shape)}")
    _check_positive_int(num_samples, "num_samples")
    z = reparameterize(mu, log_var, num_samples, generator)  # (n, S, L)
    log_q = gaussian_log_prob(z, mu[:, None], log_var[:, None]).flatten()  # (n S,)
    z = z.flatten(0, 1)  # (n S, L)
    log_agg = log_aggregate_posterior(z, mu, log_var)
    log_p = prior_log_prob(z)
    if log_p.shape != log_agg.shape:
        raise ValueError(f"prior_log_prob must map (M, L) to (M,), got shape {tuple(log_p.shape)}")
    mi_terms, mkl_terms = log_q - log_agg, log_agg - log_p
    count = mi_terms.numel()

    def se(t: Tensor) -> float:
        return (t.std() / math.sqrt(count)).item()

    return ElboSurgery(
        mean_kl=(log_q - log_p).mean().item(), mutual_info=mi_terms.mean().item(),
        marginal_kl=mkl_terms.mean().item(), mutual_info_se=se(mi_terms), marginal_kl_se=se(mkl_terms),
        num_points=mu.shape[0],
        mean_kl_analytic=kl_normal_standard(mu, log_var).mean().item() if analytic_kl else None)


# --------------------------------------------------------------------------- networks


def _mlp(in_features: int, hidden: int, num_layers: int, out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden), nn.ELU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out_features))


class GaussianEncoder(nn.Module):
    """Diagonal-Gaussian map ``x -> (mu, log_var)``: the encoder ``q(z|x)`` or a conditional prior ``p(z1|z2)``.

    An MLP on the flattened input. The log-variance is bounded smoothly to ``(-b, b)`` by
    ``b * tanh(raw / b)`` so that ``exp(log_var)`` can neither overflow nor vanish.

    Args:
        input_shape: event shape of the input, e.g. ``(1, 8, 8)`` or ``(L2,)``.
        latent_dim: ``L``.
        hidden, num_layers: MLP width and depth.
        log_var_bound: ``b``.

    Shapes: ``(..., *input_shape) -> ((..., L), (..., L))``.
    """

    def __init__(self, input_shape: Sequence[int], latent_dim: int, hidden: int = 256, num_layers: int = 2,
                 log_var_bound: float = 10.0) -> None:
        super().__init__()
        _check_positive_int(latent_dim, "latent_dim")
        self.input_shape, self.latent_dim = tuple(input_shape), latent_dim
        self.net = _mlp(math.prod(self.input_shape), hidden, num_layers, 2 * latent_dim)
        self.log_var_bound = log_var_bound

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(mu, log_var)``, each ``(..., L)``.

        Raises:
            TypeError/ValueError: for a non-float input whose trailing shape is not ``input_shape``.
        """
        _check_tensor(x, "encoder input")
        k = len(self.input_shape)
        if tuple(x.shape[x.dim() - k:]) != self.input_shape:
            raise ValueError(f"encoder input must end with shape {self.input_shape}, got {tuple(x.shape)}")
        mu, raw = self.net(x.flatten(x.dim() - k)).chunk(2, dim=-1)  # (..., L) each
        b = self.log_var_bound
        return mu, b * torch.tanh(raw / b)


class DecoderNet(nn.Module):
    """The decoders' shared convolutional network: ``z (..., L) -> (..., D, P)``, ``P`` parameters per pixel.

    A linear layer to a ``(channels, H/2, W/2)`` map, a stride-2 transposed convolution to
    ``(H, W)``, a 3x3 and a 1x1 convolution. Sharing weights across positions generalises far
    better on 1000 training digits than an MLP does (86 against 93 nats/image in our runs), just
    as for the flows' ``ConvConditioner``. ``H`` and ``W`` must be even (8x8 digits, 28x28 MNIST).
    """

    def __init__(self, latent_dim: int, event_shape: Sequence[int], params_per_dim: int, channels: int = 64) -> None:
        super().__init__()
        c, h, w = event_shape
        if h % 2 or w % 2:
            raise ValueError(f"DecoderNet needs an even height and width, got {tuple(event_shape)}")
        self.latent_dim, self.event_shape, self.params_per_dim, self.channels = latent_dim, (c, h, w), params_per_dim, channels
        self.fc = nn.Linear(latent_dim, channels * (h // 2) * (w // 2))
        self.net = nn.Sequential(
            nn.ELU(), nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ELU(),
            nn.Conv2d(channels, c * params_per_dim, 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        """``(..., L) -> (..., D, P)`` with ``D = C H W`` in raster order."""
        lead, (c, h, w), p = z.shape[:-1], self.event_shape, self.params_per_dim
        x = self.fc(z.reshape(-1, self.latent_dim)).view(-1, self.channels, h // 2, w // 2)  # (N, ch, H/2, W/2)
        x = self.net(x).view(-1, c, p, h, w).permute(0, 1, 3, 4, 2)  # (N, C, H, W, P)
        return x.reshape(*lead, c * h * w, p)


class _Decoder(nn.Module):
    """Shared part of the decoders ``p(y | z)``: sizes, and flattening ``y`` to match ``z``."""

    def __init__(self, latent_dim: int, event_shape: Sequence[int], num_levels: int) -> None:
        super().__init__()
        _check_positive_int(latent_dim, "latent_dim")
        self.latent_dim, self.event_shape, self.num_levels = latent_dim, tuple(event_shape), num_levels
        self.num_dims = math.prod(self.event_shape)

    def _flat_y(self, y: Tensor, z: Tensor) -> Tensor:
        check_levels(y, self.num_levels)
        if tuple(y.shape[1:]) != self.event_shape:
            raise ValueError(f"y must have shape (B, {', '.join(map(str, self.event_shape))}), got {tuple(y.shape)}")
        _check_tensor(z, "z", (2, 3))
        if z.shape[0] != y.shape[0] or z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must be (B, L) or (B, S, L) with B = {y.shape[0]} and L = {self.latent_dim}, "
                             f"got {tuple(z.shape)}")
        y = y.flatten(1)  # (B, D)
        return y.unsqueeze(1) if z.dim() == 3 else y  # (B, 1, D) broadcasts against S samples

    def _unflatten(self, v: Tensor) -> Tensor:
        return v.reshape(*v.shape[:-1], *self.event_shape)


class CategoricalDecoder(_Decoder):
    """``p(y|z) = prod_d Cat(y_d | softmax(logits_d(z)))`` over ``K`` levels per pixel.

    Shapes: ``z (B, L)`` or ``(B, S, L)``; ``log_prob(y, z)`` gives ``(B,)`` or ``(B, S)`` nats.
    The network is ``DecoderNet`` with ``channels`` feature maps.
    """

    def __init__(self, latent_dim: int, event_shape: Sequence[int], num_levels: int, channels: int = 64) -> None:
        super().__init__(latent_dim, event_shape, num_levels)
        self.net = DecoderNet(latent_dim, event_shape, num_levels, channels)

    def logits(self, z: Tensor) -> Tensor:
        """Unnormalised log-probabilities ``(..., D, K)`` for ``z (..., L)``."""
        return self.net(z)

    def log_prob(self, y: Tensor, z: Tensor) -> Tensor:
        """``log p(y | z)`` in nats, summed over pixels.

        Raises:
            TypeError/ValueError: for invalid levels or mismatched shapes.
        """
        y = self._flat_y(y, z).long()
        logp = F.log_softmax(self.logits(z), dim=-1)  # (..., D, K)
        return logp.gather(-1, y.expand(*logp.shape[:-1]).unsqueeze(-1)).squeeze(-1).sum(-1)

    def mean(self, z: Tensor) -> Tensor:
        """Expected level ``E[y | z]`` of shape ``(B, *event_shape)``, in level units."""
        probs = F.softmax(self.logits(z), dim=-1)
        return self._unflatten(probs @ torch.arange(self.num_levels, dtype=probs.dtype, device=probs.device))

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Levels ``y ~ p(y | z)`` of shape ``(B, *event_shape)`` (float)."""
        probs = F.softmax(self.logits(z), dim=-1)
        y = multinomial(probs.reshape(-1, self.num_levels), 1, generator=generator)
        return self._unflatten(y.reshape(probs.shape[:-1]).float())


class DiscretizedLogisticDecoder(_Decoder):
    """``p(y|z) = prod_d DLogistic(y_d | mean_d(z), scale_d(z))`` over ``K`` levels, via CDF differences.

    See ``discretized_logistic_log_prob``. The network outputs a mean in level units and a
    log-scale, floored softly at ``min_log_scale`` for stable training (the likelihood itself is
    stable at any scale). Two numbers per pixel instead of ``K`` logits.
    """

    def __init__(self, latent_dim: int, event_shape: Sequence[int], num_levels: int, channels: int = 64,
                 min_log_scale: float = -5.0) -> None:
        super().__init__(latent_dim, event_shape, num_levels)
        self.net = DecoderNet(latent_dim, event_shape, 2, channels)
        self.min_log_scale = min_log_scale

    def params(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_scale)``, each ``(..., D)``, mean in level units."""
        raw_mean, raw_scale = self.net(z).unbind(-1)
        half = (self.num_levels - 1) / 2
        return half + half * raw_mean, self.min_log_scale + F.softplus(raw_scale - self.min_log_scale)

    def log_prob(self, y: Tensor, z: Tensor) -> Tensor:
        """``log p(y | z)`` in nats, summed over pixels, ``(B,)`` or ``(B, S)``."""
        y = self._flat_y(y, z)
        mean, log_scale = self.params(z)
        return discretized_logistic_log_prob(y.expand_as(mean), mean, log_scale, self.num_levels).sum(-1)

    def mean(self, z: Tensor) -> Tensor:
        """The logistic location clamped to ``[0, K-1]``, shape ``(B, *event_shape)``."""
        return self._unflatten(self.params(z)[0].clamp(0, self.num_levels - 1))

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Levels drawn by inverting the logistic CDF and rounding into ``{0..K-1}``."""
        mean, log_scale = self.params(z)
        u = rand(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator).clamp(1e-6, 1 - 1e-6)
        v = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
        return self._unflatten(v.round().clamp(0, self.num_levels - 1))


class BernoulliDecoder(_Decoder):
    """``p(y|z) = prod_d Bernoulli(y_d | sigmoid(logits_d(z)))`` for binarized images (``K = 2``)."""

    def __init__(self, latent_dim: int, event_shape: Sequence[int], channels: int = 64) -> None:
        super().__init__(latent_dim, event_shape, 2)
        self.net = DecoderNet(latent_dim, event_shape, 1, channels)

    def log_prob(self, y: Tensor, z: Tensor) -> Tensor:
        """``log p(y | z)`` in nats, ``(B,)`` or ``(B, S)``; ``y`` must hold 0/1."""
        y = self._flat_y(y, z).to(z.dtype)
        logits = self.net(z).squeeze(-1)  # (..., D)
        return -F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").sum(-1)

    def mean(self, z: Tensor) -> Tensor:
        """``P(y_d = 1 | z)``, shape ``(B, *event_shape)``."""
        return self._unflatten(torch.sigmoid(self.net(z).squeeze(-1)))

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Binary ``y ~ p(y | z)``, shape ``(B, *event_shape)``."""
        return bernoulli(self.mean(z), generator=generator)


class AutoregressiveDecoder(_Decoder):
    """A decoder powerful enough to do without ``z``: ``p(y|z) = prod_d Cat(y_d | y_<d, z)``, a conditional PixelCNN.

    A type-A masked 5x5 convolution, then residual type-B masked 3x3 convolutions; ``z`` enters
    every layer as a per-channel bias (the conditional PixelCNN of van den Oord et al. 2016,
    "Conditional image generation with PixelCNN decoders", Eq. 4). Because the pixels explain each
    other, the KL term pushes most of the information out of ``z``: the posterior collapses
    towards the prior (Chen et al. 2017, "Variational lossy autoencoder", Sec. 2), the demonstration
    of lecture 05. Sampling is sequential (``D`` passes).
    """

    def __init__(self, latent_dim: int, event_shape: Sequence[int], num_levels: int, channels: int = 64,
                 num_layers: int = 4) -> None:
        super().__init__(latent_dim, event_shape, num_levels)
        c = self.event_shape[0]
        self.channels, self.num_layers = channels, num_layers
        self.first = MaskedConv2d(c, channels, 5, "A")
        self.layers = nn.ModuleList([MaskedConv2d(channels, channels, 3, "B") for _ in range(num_layers)])
        self.cond = nn.Linear(latent_dim, channels * (num_layers + 1))
        self.out = nn.Conv2d(channels, c * num_levels, 1)

    def logits(self, y_flat: Tensor, z: Tensor) -> Tensor:
        """``(..., D, K)`` logits of each pixel given the earlier pixels of ``y_flat (..., D)`` and ``z (..., L)``."""
        lead, (c, h, w) = z.shape[:-1], self.event_shape
        x = y_flat.reshape(-1, c, h, w) / (self.num_levels - 1)  # (N, C, H, W)
        bias = self.cond(z.reshape(-1, self.latent_dim)).view(-1, self.num_layers + 1, self.channels, 1, 1)
        hid = F.elu(self.first(x) + bias[:, 0])
        for i, layer in enumerate(self.layers):
            hid = hid + F.elu(layer(hid) + bias[:, i + 1])
        out = self.out(hid).view(-1, c, self.num_levels, h, w).permute(0, 1, 3, 4, 2)  # (N, C, H, W, K)
        return out.reshape(*lead, self.num_dims, self.num_levels)

    def log_prob(self, y: Tensor, z: Tensor) -> Tensor:
        """``log p(y | z)`` in nats, ``(B,)`` or ``(B, S)``."""
        y = self._flat_y(y, z).to(z.dtype)
        y = y.expand(*z.shape[:-1], self.num_dims)
        logp = F.log_softmax(self.logits(y, z), dim=-1)
        return logp.gather(-1, y.long().unsqueeze(-1)).squeeze(-1).sum(-1)

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Levels drawn pixel by pixel in raster order, shape ``(B, *event_shape)``."""
        y = z.new_zeros(z.shape[0], self.num_dims)
        for d in range(self.num_dims):
            probs = F.softmax(self.logits(y, z)[:, d], dim=-1)
            y[:, d] = multinomial(probs, 1, generator=generator).squeeze(1).to(y.dtype)
        return self._unflatten(y)

    def mean(self, z: Tensor) -> Tensor:
        """A sample (an autoregressive decoder has no cheap mean), shape ``(B, *event_shape)``."""
        return self.sample(z)


# --------------------------------------------------------------------------- priors


class StandardNormalPrior(nn.Module):
    """``p(z) = N(0, I)`` on ``R^L``: ``log_prob (B, L) -> (B,)`` nats, ``sample(n) -> (n, L)``."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        _check_positive_int(latent_dim, "latent_dim")
        self.latent_dim = latent_dim
        # The mean 0 as a (non-saved) buffer: it moves with .to(device), so samples land where the model is.
        self.register_buffer("loc", torch.zeros(latent_dim), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; 0, I)``, shape ``z.shape[:-1]``."""
        return standard_normal_log_prob(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, L)`` draws, on the device of the module."""
        _check_positive_int(n, "n")
        return self.loc + randn((n, self.latent_dim), device=self.loc.device, dtype=self.loc.dtype, generator=generator)


class MixturePrior(nn.Module):
    """Learnable mixture of ``K`` diagonal Gaussians: ``p(z) = sum_k pi_k N(z; m_k, diag(s_k^2))``.

    ``log_prob`` uses ``logsumexp`` over components; means start as ``N(0, I)`` draws.
    """

    def __init__(self, latent_dim: int, num_components: int = 16, seed: int = 0) -> None:
        super().__init__()
        _check_positive_int(latent_dim, "latent_dim")
        _check_positive_int(num_components, "num_components")
        self.latent_dim = latent_dim
        g = torch.Generator().manual_seed(seed)
        self.means = nn.Parameter(torch.randn(num_components, latent_dim, generator=g))
        self.log_vars = nn.Parameter(torch.zeros(num_components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(num_components))

    def log_prob(self, z: Tensor) -> Tensor:
        """``log p(z)`` in nats, shape ``z.shape[:-1]``."""
        comp = gaussian_log_prob(z.unsqueeze(-2), self.means, self.log_vars)  # (..., K)
        return torch.logsumexp(comp + F.log_softmax(self.logits, -1), dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, L)`` draws: a component, then its Gaussian."""
        _check_positive_int(n, "n")
        k = multinomial(F.softmax(self.logits, -1), n, replacement=True, generator=generator)
        eps = randn((n, self.latent_dim), device=self.means.device, dtype=self.means.dtype, generator=generator)
        return self.means[k] + torch.exp(0.5 * self.log_vars[k]) * eps


class VampPrior(nn.Module):
    """VampPrior: ``p(z) = (1/K) sum_k q(z | u_k)`` with learnable pseudo-inputs ``u_k`` (Tomczak & Welling 2018, Eq. 9).

    It is the aggregated posterior of ``K`` learnt inputs, i.e. a cheap approximation of the
    optimal prior ``q_agg`` (lecture 6). The encoder is shared with the VAE.

    Args:
        encoder: the VAE's ``GaussianEncoder`` (inputs in [0, 1]).
        num_pseudo: ``K``.
        init: optional ``(K, *input_shape)`` initial pseudo-inputs (e.g. training images);
            default uniform noise in [0, 1].
    """

    def __init__(self, encoder: GaussianEncoder, num_pseudo: int = 100, init: Tensor | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        _check_positive_int(num_pseudo, "num_pseudo")
        self.encoder, self.latent_dim = encoder, encoder.latent_dim
        shape = (num_pseudo, *encoder.input_shape)
        if init is None:
            init = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        elif tuple(init.shape) != shape:
            raise ValueError(f"init must have shape {shape}, got {tuple(init.shape)}")
        self.pseudo_inputs = nn.Parameter(init.clone().float())

    def log_prob(self, z: Tensor) -> Tensor:
        """``log p(z)`` in nats, shape ``z.shape[:-1]``."""
        mu, log_var = self.encoder(self.pseudo_inputs)  # (K, L)
        comp = gaussian_log_prob(z.unsqueeze(-2), mu, log_var)  # (..., K)
        return torch.logsumexp(comp, dim=-1) - math.log(mu.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, L)`` draws: a pseudo-input uniformly, then its posterior."""
        _check_positive_int(n, "n")
        mu, log_var = self.encoder(self.pseudo_inputs)
        k = randint(0, mu.shape[0], (n,), device=mu.device, generator=generator)
        return mu[k] + torch.exp(0.5 * log_var[k]) * randn((n, self.latent_dim), device=mu.device, dtype=mu.dtype,
                                                           generator=generator)


class FlowPrior(nn.Module):
    """NF-based prior: a RealNVP in latent space, ``log p(z) = log N(f(z)) + log|det df/dz|`` (lecture 6).

    Built from ``dgmlib.flows``: affine couplings with alternating even/odd masks and MLP
    conditioners, each followed by a fixed random permutation. Its ``log_prob`` is exact, so the
    VAE's KL term becomes a Monte-Carlo estimate.
    """

    def __init__(self, latent_dim: int, num_couplings: int = 4, hidden: int = 128, seed: int = 0) -> None:
        super().__init__()
        _check_positive_int(latent_dim, "latent_dim")
        if latent_dim < 2:
            raise ValueError("a coupling flow prior needs latent_dim >= 2")
        self.latent_dim = latent_dim
        layers: list[flows.Bijection] = []
        for k in range(num_couplings):
            mask = (torch.arange(latent_dim) % 2 == k % 2).float()
            layers.append(flows.AffineCoupling(mask, flows.MLPConditioner((latent_dim,), hidden, 2)))
            if latent_dim > 2:
                layers.append(flows.Permutation.random((latent_dim,), seed=seed + k))
        self.flow = flows.Flow(flows.Compose(*layers))

    def log_prob(self, z: Tensor) -> Tensor:
        """``log p(z)`` in nats for ``z (..., L)``, shape ``z.shape[:-1]``."""
        lead = z.shape[:-1]
        return self.flow.log_prob(z.reshape(-1, self.latent_dim)).reshape(lead)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, L)`` draws ``f^{-1}(eps)``."""
        _check_positive_int(n, "n")
        return self.flow.sample(n, generator=generator)


# --------------------------------------------------------------------------- models


class LatentVariableModel(nn.Module):
    """What ``VAE`` and ``HierarchicalVAE`` share: the bounds built from ``elbo_terms`` and ``log_weights``.

    A subclass sets ``num_levels`` and ``event_shape`` and implements ``encode(y) -> (mu, log_var)``
    (of the latent that ELBO surgery and active units look at), ``elbo_terms``, ``log_weights``,
    ``log_prior`` (the prior density of that latent) and ``sample``.
    """

    num_levels: int
    event_shape: tuple[int, ...]

    def _inputs(self, y: Tensor) -> Tensor:
        check_levels(y, self.num_levels)
        if tuple(y.shape[1:]) != self.event_shape or y.dim() != len(self.event_shape) + 1:
            raise ValueError(f"y must have shape (B, {', '.join(map(str, self.event_shape))}), got {tuple(y.shape)}")
        return y.float() / (self.num_levels - 1)

    def elbo_terms(self, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One-sample ELBO split ``(recon, kl)``, each ``(B,)`` nats: ``ELBO = recon - kl``."""
        raise NotImplementedError

    def log_weights(self, y: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Importance log-weights ``log p(y, z_s) - log q(z_s | y)``, ``z_s ~ q``, shape ``(B, k)``."""
        raise NotImplementedError

    def elbo(self, y: Tensor) -> Tensor:
        """One-sample ELBO, a lower bound on ``log P(y)``, ``(B,)`` nats."""
        recon, kl = self.elbo_terms(y)
        return recon - kl

    def nll(self, y: Tensor) -> Tensor:
        """Negative ELBO, ``(B,)`` nats: the training loss and an upper bound on ``-log P(y)``."""
        return -self.elbo(y)

    def iwae(self, y: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """IWAE bound with ``k`` samples (Burda et al. 2016, Eq. 8), ``(B,)`` nats; ``k = 1`` is the ELBO."""
        return iwae_bound(self.log_weights(y, k, generator))

    @torch.no_grad()
    def importance_nll(self, y: Tensor, k: int = 1000, chunk: int = 100,
                       generator: torch.Generator | None = None) -> Tensor:
        """``-log P(y)`` estimated by importance sampling with ``k`` draws from ``q``, ``(B,)`` nats.

        The same estimator as ``-iwae(y, k)`` (Burda et al. 2016, Sec. 5.1, k = 5000 there), but the
        decoder runs on ``chunk`` samples at a time, so memory is ``O(B * chunk * D * K)`` rather
        than ``O(B * k * D * K)``; only the ``(B, k)`` log-weights are kept.

        Raises:
            ValueError: if ``k`` or ``chunk`` is not a positive integer; as ``encode`` for bad ``y``.
        """
        _check_positive_int(k, "k")
        _check_positive_int(chunk, "chunk")
        parts = [self.log_weights(y, min(chunk, k - start), generator) for start in range(0, k, chunk)]
        return -iwae_bound(torch.cat(parts, dim=1))


class VAE(LatentVariableModel):
    """A VAE for discrete images: Gaussian encoder, any prior with ``log_prob``/``sample``, a discrete decoder.

    ``nll(y)`` is the negative ELBO (the training loss of ``dgmlib.train.fit``); ``iwae`` and
    ``importance_nll`` give tighter bounds and the large-k NLL estimate.

    Args:
        encoder: ``GaussianEncoder`` on ``(C, H, W)`` inputs ``y / (K - 1)``.
        decoder: a decoder with ``log_prob(y, z)``, ``mean(z)``, ``sample(z)``.
        prior: ``StandardNormalPrior``, ``MixturePrior``, ``VampPrior`` or ``FlowPrior``.
        num_levels: ``K``.

    Shapes: ``y (B, C, H, W)`` levels; every per-example quantity ``(B,)`` in nats.
    """

    def __init__(self, encoder: GaussianEncoder, decoder: nn.Module, prior: nn.Module, num_levels: int) -> None:
        super().__init__()
        if encoder.latent_dim != decoder.latent_dim or encoder.latent_dim != prior.latent_dim:
            raise ValueError("encoder, decoder and prior must share latent_dim, got "
                             f"{encoder.latent_dim}, {decoder.latent_dim}, {prior.latent_dim}")
        self.encoder, self.decoder, self.prior = encoder, decoder, prior
        self.num_levels, self.latent_dim = num_levels, encoder.latent_dim
        self.event_shape = encoder.input_shape
        self.num_dims = math.prod(self.event_shape)

    @property
    def analytic_kl(self) -> bool:
        """Whether the KL term is computed in closed form (only for the standard-normal prior)."""
        return isinstance(self.prior, StandardNormalPrior)

    def encode(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(mu, log_var)`` of ``q(z | y)``, each ``(B, L)``.

        Raises:
            TypeError/ValueError: for invalid levels or a wrong shape.
        """
        return self.encoder(self._inputs(y))

    def elbo_terms(self, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One-sample ELBO split ``(recon, kl)``, each ``(B,)`` nats: ``ELBO = recon - kl``.

        ``recon = log p(y | z)`` with ``z ~ q(z | y)`` reparametrized; ``kl`` is analytic for the
        standard prior and the one-sample estimate ``log q(z|y) - log p(z)`` otherwise.
        """
        mu, log_var = self.encode(y)
        z = reparameterize(mu, log_var, generator=generator)  # (B, L)
        recon = self.decoder.log_prob(y, z)
        if self.analytic_kl:
            kl = kl_normal_standard(mu, log_var)
        else:
            kl = gaussian_log_prob(z, mu, log_var) - self.prior.log_prob(z)
        return recon, kl

    def log_weights(self, y: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Importance log-weights ``log p(y|z_s) + log p(z_s) - log q(z_s|y)``, ``z_s ~ q``, shape ``(B, k)``."""
        mu, log_var = self.encode(y)
        z = reparameterize(mu, log_var, k, generator)  # (B, k, L)
        return (self.decoder.log_prob(y, z) + self.log_prior(z)
                - gaussian_log_prob(z, mu.unsqueeze(1), log_var.unsqueeze(1)))

    def log_prior(self, z: Tensor) -> Tensor:
        """``log p(z)`` of the prior, shape ``z.shape[:-1]``, nats."""
        return self.prior.log_prob(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True) -> Tensor:
        """``n`` images in [0, 1] of shape ``(n, C, H, W)``: ``z ~ p(z)``, then the decoder's mean (or a draw)."""
        z = self.prior.sample(n, generator=generator)
        y = self.decoder.mean(z) if mean else self.decoder.sample(z, generator=generator)
        return y / (self.num_levels - 1)


class HierarchicalVAE(LatentVariableModel):
    """Two stochastic layers as in the lecture: ``p(z2) p(z1|z2) p(y|z1)`` and ``q(z1|y) q(z2|y)``.

    ELBO (lecture "Hierarchical VAE"; Burda et al. 2016 use the same two-layer model):

        E_{q(z1|y)} log p(y|z1) - E_{q(z2|y)} KL(q(z1|y) || p(z1|z2)) - KL(q(z2|y) || N(0, I)),

    with both KLs analytic given a one-sample ``z2``. The same interface as ``VAE``;
    ``encode`` returns the first layer, ``encode_top`` the second.
    """

    def __init__(self, event_shape: Sequence[int], num_levels: int, latent_dims: tuple[int, int] = (16, 8),
                 hidden: int = 256, channels: int = 64) -> None:
        super().__init__()
        l1, l2 = latent_dims
        self.num_levels, self.event_shape = num_levels, tuple(event_shape)
        self.num_dims, self.latent_dim = math.prod(self.event_shape), l1
        self.encoder = GaussianEncoder(event_shape, l1, hidden)  # q(z1 | y)
        self.encoder_top = GaussianEncoder(event_shape, l2, hidden)  # q(z2 | y)
        self.conditional_prior = GaussianEncoder((l2,), l1, hidden // 2)  # p(z1 | z2)
        self.decoder = CategoricalDecoder(l1, event_shape, num_levels, channels)
        self.prior = StandardNormalPrior(l2)

    def encode(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log_var)`` of ``q(z1 | y)``, each ``(B, L1)``."""
        return self.encoder(self._inputs(y))

    def encode_top(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log_var)`` of ``q(z2 | y)``, each ``(B, L2)``."""
        return self.encoder_top(self._inputs(y))

    def elbo_terms(self, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(recon, kl)``, each ``(B,)`` nats, with ``kl = KL_1 + KL_2`` as in the class docstring."""
        mu1, lv1 = self.encode(y)
        mu2, lv2 = self.encode_top(y)
        z1 = reparameterize(mu1, lv1, generator=generator)
        z2 = reparameterize(mu2, lv2, generator=generator)
        pm, plv = self.conditional_prior(z2)
        kl = kl_normal(mu1, lv1, pm, plv) + kl_normal_standard(mu2, lv2)
        return self.decoder.log_prob(y, z1), kl

    def log_weights(self, y: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``log p(y|z1) + log p(z1|z2) + log p(z2) - log q(z1|y) - log q(z2|y)``, shape ``(B, k)``."""
        mu1, lv1 = self.encode(y)
        mu2, lv2 = self.encode_top(y)
        z1 = reparameterize(mu1, lv1, k, generator)  # (B, k, L1)
        z2 = reparameterize(mu2, lv2, k, generator)  # (B, k, L2)
        pm, plv = self.conditional_prior(z2)
        return (self.decoder.log_prob(y, z1) + gaussian_log_prob(z1, pm, plv) + standard_normal_log_prob(z2)
                - gaussian_log_prob(z1, mu1[:, None], lv1[:, None]) - gaussian_log_prob(z2, mu2[:, None], lv2[:, None]))

    def log_prior(self, z1: Tensor, num_samples: int = 256) -> Tensor:
        """``log p(z1) ~= log mean_s p(z1 | z2_s)`` with ``num_samples`` fixed draws ``z2_s ~ N(0, I)``.

        The marginal prior of the first layer, a Monte-Carlo mixture (an estimate, used for ELBO
        surgery on ``z1``); shape ``z1.shape[:-1]``, nats.
        """
        z2 = self.prior.sample(num_samples, generator=torch.Generator().manual_seed(1)).to(z1.dtype)
        pm, plv = self.conditional_prior(z2)  # (S, L1)
        return torch.logsumexp(gaussian_log_prob(z1.unsqueeze(-2), pm, plv), -1) - math.log(num_samples)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True) -> Tensor:
        """``n`` images in [0, 1], ``(n, C, H, W)``: ``z2 ~ N(0, I)``, ``z1 ~ p(z1|z2)``, then the decoder."""
        z2 = self.prior.sample(n, generator=generator)
        pm, plv = self.conditional_prior(z2)
        z1 = pm + torch.exp(0.5 * plv) * randn(pm.shape, device=pm.device, dtype=pm.dtype, generator=generator)
        y = self.decoder.mean(z1) if mean else self.decoder.sample(z1, generator=generator)
        return y / (self.num_levels - 1)


def build_vae(event_shape: Sequence[int] = (1, 8, 8), num_levels: int = 17, latent_dim: int = 16,
              prior: str = "standard", decoder: str = "categorical", hidden: int = 256, channels: int = 64,
              pseudo_init: Tensor | None = None, num_components: int = 16, num_pseudo: int = 100) -> VAE:
    """The course's MLP VAE with a named prior and decoder (what ``dgm train vae`` builds).

    Args:
        hidden: width of the MLP encoder.
        channels: feature maps of the convolutional decoders (``DecoderNet``, the PixelCNN).
        prior: one of ``PRIORS``: ``standard`` N(0, I), ``mog`` (``num_components`` Gaussians),
            ``vamp`` (``num_pseudo`` pseudo-inputs, optionally initialised from ``pseudo_init``
            levels), ``flow`` (RealNVP in latent space).
        decoder: one of ``DECODERS``: ``categorical``, ``dlogistic`` or ``autoregressive`` (PixelCNN).

    Raises:
        ValueError: for an unknown prior or decoder name.
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    encoder = GaussianEncoder(event_shape, latent_dim, hidden)
    dec: nn.Module
    if decoder == "categorical":
        dec = CategoricalDecoder(latent_dim, event_shape, num_levels, channels)
    elif decoder == "dlogistic":
        dec = DiscretizedLogisticDecoder(latent_dim, event_shape, num_levels, channels)
    else:
        dec = AutoregressiveDecoder(latent_dim, event_shape, num_levels, channels)
    if prior == "standard":
        p: nn.Module = StandardNormalPrior(latent_dim)
    elif prior == "mog":
        p = MixturePrior(latent_dim, num_components)
    elif prior == "vamp":
        init = None
        if pseudo_init is not None:
            init = pseudo_init[:num_pseudo].float() / (num_levels - 1)
            num_pseudo = init.shape[0]
        p = VampPrior(encoder, num_pseudo, init)
    else:
        p = FlowPrior(latent_dim)
    return VAE(encoder, dec, p, num_levels)


@torch.no_grad()
def vae_metrics(model: LatentVariableModel, test: Tensor, train: Tensor | None = None, k: int = 1000,
                elbo_samples: int = 10, seed: int = 0) -> dict[str, float | int]:
    """Everything ``dgm train vae`` reports, in nats per image unless named otherwise.

    * ``test_nll_nats``: importance-sampled ``-log P(y)`` with ``k`` samples (IWAE, k = 1000);
    * ``neg_elbo_nats``, ``recon_nats``, ``kl_nats``: the ELBO split, averaged over ``elbo_samples``
      draws per test image (the KL is exact for the standard prior, Monte Carlo otherwise);
    * ``mutual_info_nats``, ``marginal_kl_nats`` (+ standard errors, ``surgery_points``): ELBO
      surgery on ``train`` (or ``test`` if no ``train``), 10 draws per point;
    * ``active_units`` (threshold 0.01) out of ``latent_dim``.

    The random state is forked, so the numbers are reproducible for a given ``seed``.
    """
    was_training = model.training
    model.eval()
    device = module_device(model)  # the data follow the model (a GPU in `dgm train`)
    test, train = test.to(device), None if train is None else train.to(device)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, float | int] = {}
    out["test_nll_nats"] = torch.cat([model.importance_nll(b, k, generator=g) for b in test.split(50)]).mean().item()
    recon = kl = 0.0
    for _ in range(elbo_samples):
        r, q = model.elbo_terms(test, generator=g)
        recon, kl = recon + r.mean().item() / elbo_samples, kl + q.mean().item() / elbo_samples
    out.update(neg_elbo_nats=kl - recon, recon_nats=-recon, kl_nats=kl)
    data = test if train is None else train
    mu, log_var = model.encode(data)
    surgery = elbo_surgery(mu, log_var, model.log_prior, num_samples=10, generator=g)
    out.update(mutual_info_nats=surgery.mutual_info, mutual_info_se=surgery.mutual_info_se,
               marginal_kl_nats=surgery.marginal_kl, marginal_kl_se=surgery.marginal_kl_se,
               surgery_points=surgery.num_points, log_n=surgery.log_n)
    out["active_units"] = active_units(model.encode(test)[0])[0]
    out["latent_dim"] = model.latent_dim
    model.train(was_training)
    return out

