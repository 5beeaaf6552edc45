r"""Discrete data and continuous models: discretization through a CDF, and dequantization bounds.

Images are discrete: each of the ``D`` values of an example is a level ``y`` in ``{0, ..., K-1}``
(``K = 17`` for the 8x8 digits, 256 for MNIST). There are two ways to give them a likelihood.

**Discretization through the CDF** puts a discrete distribution on the levels: level ``y`` owns a bin
of a continuous distribution, and ``P(y)`` is the mass of that bin, a difference of two CDF values.
The two edge bins are *open*: level 0 takes the whole lower tail and level ``K-1`` the whole upper
tail, so the ``K`` probabilities sum to 1 at any location and scale (Salimans et al. 2017, PixelCNN++,
Sec. 2.1 and Eq. 2; Ho et al. 2020, Eq. 13). Here:

* ``log_bin_probability``: the stable core, ``log(F(upper) - F(lower))`` for a location-scale CDF;
* ``discretized_logistic_log_prob``: a logistic, location in level units, bins ``[y - 1/2, y + 1/2]``;
* ``discretized_logistic_mixture_log_prob``: a mixture of such logistics (PixelCNN++, Eq. 2);
* ``discretized_gaussian_log_prob``: a Gaussian on [-1, 1], the decoder ``L_0`` of DDPM.

**Dequantization** keeps a continuous density ``p(x)`` on ``[0, 1)^D`` and bounds the discrete
negative log-likelihood. With ``x = (y + u) / K`` and ``u`` in ``[0, 1)^D`` the change of variables
gives the exact identity (the factor :math:`K^{-D}` is the Jacobian of :math:`u \mapsto x`)

.. math::

    P(y) = \int_{[0,1)^D} p\Big(\frac{y + u}{K}\Big) K^{-D} \, du,

and for any density :math:`q(u \mid y)` on :math:`[0, 1)^D` Jensen's inequality gives the bounds (nats per
example): the variational bound (Flow++ Eq. 5) and the importance-weighted bound (Flow++ Eq. 12)

.. math::

    -\log P(y) &\le \mathbb{E}_{q}\Big[-\log p\Big(\frac{y + u}{K}\Big) + \log q(u \mid y)\Big] + D \log K, \\
    -\log P(y) &\le \mathbb{E}\Big[-\log \frac{1}{k} \sum_{j=1}^{k}
        \frac{p((y + u_j)/K) \, K^{-D}}{q(u_j \mid y)}\Big], \quad u_1, \dots, u_k \sim q(u \mid y).

The uniform bound is the variational one with :math:`q = U[0, 1)^D` (:math:`\log q = 0`; Theis et al. 2016,
Sec. 3.1). The gap of the variational bound is
:math:`\mathrm{KL}\big(q(u \mid y) \,\|\, p((y+u)/K) K^{-D} / P(y)\big)`, zero for that optimal
:math:`q`; the importance-weighted bound is non-increasing in ``k`` on average and equals
the variational one at ``k = 1`` (Burda et al. 2016, Theorem 1; Ho et al. 2019, Sec. 3.1).

* ``check_levels``: the shared validation of integer levels;
* ``uniform_dequantize``, ``dequantized_nll``: uniform dequantization and its one-sample bound;
* ``UniformDequantizer``, ``VariationalDequantizer``: dequantization distributions ``q(u | y)`` with
  ``sample(y, generator) -> (u, log_q)``; the second is a small conditional flow (Flow++, Sec. 3.1);
* ``variational_dequantization_nll``, ``importance_weighted_dequantization_nll``: the two bounds.

Every log-probability, log-density and bound is in **nats** (per element for the discretizations,
per example for the bounds); convert with ``dgmlib.units.nats_to_bits_per_dim``.

Sources: Salimans et al. 2017 (PixelCNN++), Sec. 2.1, Eq. 2; Ho, Jain & Abbeel 2020 (DDPM), Eq. 13;
Theis, van den Oord & Bethge 2016, Sec. 3.1; Ho, Chen, Srinivas, Duan & Abbeel 2019 (Flow++),
Sec. 3.1, Eq. 2-5 and 12; Isachenko, DGM lecture 6 (discretization through the CDF, uniform and
variational dequantization).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgmlib.device import rand, randn, value_checks

__all__ = [
    "check_levels", "log_bin_probability", "discretized_logistic_log_prob", "discretized_logistic_mixture_log_prob",
    "discretized_gaussian_log_prob", "uniform_dequantize", "dequantized_nll", "UniformDequantizer",
    "VariationalDequantizer", "variational_dequantization_nll", "importance_weighted_dequantization_nll",
]

LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------- checks


def check_levels(y: Tensor, num_levels: int) -> None:
    """Check that ``y`` holds integers in ``{0, ..., num_levels - 1}``.

    Raises:
        TypeError: if ``y`` is not a tensor.
        ValueError: if ``num_levels`` is not an integer ``>= 2``, or ``y`` holds NaN, non-integers or
            values out of range.

    The value checks read ``y`` (a host round trip on a GPU); they are skipped where
    ``dgmlib.device.value_checks(y)`` is False: on ``meta`` and inside ``fit``/``evaluate``, which
    check their whole data once.
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"expected a torch.Tensor of discrete levels, got {type(y).__name__}")
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    if not value_checks(y):  # meta tensors, or batches of data already checked as a whole (fit, evaluate)
        return
    if y.is_floating_point():
        if torch.isnan(y).any():
            raise ValueError("discrete data contains NaN")
        if (y != torch.round(y)).any():
            raise ValueError("discrete data must hold integer levels; got fractional values "
                             "(pass the raw levels, not already-dequantized data)")
    if y.numel() and (y.min() < 0 or y.max() > num_levels - 1):
        raise ValueError(f"discrete data must lie in [0, {num_levels - 1}], "
                         f"got range [{y.min().item()}, {y.max().item()}]")


def _check_params(**tensors: Tensor) -> None:
    for name, x in tensors.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
        if value_checks(x) and not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


# --------------------------------------------------------------------------- discretization through the CDF


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(-x))`` for ``x > 0``, stable for both tiny and large ``x`` (Maechler 2012).

    Each branch gets only inputs in its own range, so the branch ``torch.where`` discards cannot
    send an infinite gradient (times zero: NaN) back.
    """
    small = x < math.log(2.0)
    x_small = torch.where(small, x, torch.full_like(x, 0.5))
    x_large = torch.where(small, torch.full_like(x, 1.0), x)
    return torch.where(small, torch.log(-torch.expm1(-x_small)), torch.log1p(-torch.exp(-x_large)))


def log_bin_probability(y: Tensor, lower: Tensor, upper: Tensor, mean: Tensor, log_scale: Tensor,
                        num_levels: int, log_cdf: Callable[[Tensor], Tensor]) -> Tensor:
    """``log(F(upper) - F(lower))`` for a location-scale CDF ``F(v) = cdf((v - mean) / scale)``, stably.

    The shared core of the discretized distributions of this module: level 0 takes the whole lower
    tail and level K-1 the upper one (open edge bins); a bin above the mean is reflected,
    ``F(u) - F(l) = cdf(-l') - cdf(-u')`` for a symmetric ``cdf``, so the CDF values never round to 1,
    and ``log(cdf(a) - cdf(b)) = log cdf(a) + log(1 - exp(log cdf(b) - log cdf(a)))``.

    Args:
        y: levels ``(...)`` in {0..K-1} (already checked), float.
        lower, upper: the bin edges of each level, in the units of ``mean``, broadcastable to ``y``.
        mean, log_scale: location and log-scale, broadcastable to ``y``.
        num_levels: K.
        log_cdf: the log-CDF of a standard *symmetric* distribution, e.g. ``F.logsigmoid`` (logistic)
            or ``torch.special.log_ndtr`` (Gaussian).

    Returns:
        ``log P(y)`` in nats, the broadcast shape; finite for any finite parameters.

    Raises:
        nothing itself: the callers check their inputs.

    Source: Salimans et al. 2017 (PixelCNN++), Sec. 2.1; Ho et al. 2020, Eq. 13.
    """
    inv_scale = torch.exp(-log_scale)
    big = torch.finfo(mean.dtype).max ** 0.25  # a finite stand-in for +-infinity at the edge bins
    upper = torch.where(y >= num_levels - 1, torch.full_like(upper, big), (upper - mean) * inv_scale)
    lower = torch.where(y <= 0, torch.full_like(lower, -big), (lower - mean) * inv_scale)
    above = upper + lower > 0  # the bin lies above the mean: reflect it
    a = torch.where(above, -lower, upper)
    b = torch.where(above, -upper, lower)
    log_a, log_b = log_cdf(a), log_cdf(b)
    return log_a + _log1mexp((log_a - log_b).clamp_min(torch.finfo(mean.dtype).tiny))


def discretized_logistic_log_prob(y: Tensor, mean: Tensor, log_scale: Tensor, num_levels: int) -> Tensor:
    """Elementwise ``log P(y)`` of a logistic discretized through its CDF onto ``{0..K-1}``.

    Each level owns the bin ``[y - 1/2, y + 1/2]``; the two edge bins absorb the tails
    (PixelCNN++, Salimans et al. 2017, Sec. 2.1; lecture 6, "model discretization through CDF"):

        P(y) = F(y + 1/2) - F(y - 1/2),   P(0) = F(1/2),   P(K-1) = 1 - F(K - 3/2),

    with ``F(v) = sigmoid((v - mean) / scale)``. With ``a, b`` the standardised bin edges,
    ``sigmoid(a) - sigmoid(b)`` is evaluated as ``log sigmoid(a) + log(1 - exp(log sigmoid(b) -
    log sigmoid(a)))``; for a bin above the mean it is first reflected to ``sigmoid(-b) - sigmoid(-a)``,
    whose terms do not round to 1. The result is accurate at any scale: a scale of 1e-9 gives
    ``log P = 0`` at the mean's level and large finite negatives elsewhere, never NaN or -inf, and
    finite gradients. The probabilities of the K levels sum to 1.

    Args:
        y: integer levels ``(...)``, values in ``{0..K-1}`` (float or integer dtype).
        mean, log_scale: logistic location (in level units) and log-scale, broadcastable to ``y``.
        num_levels: ``K``.

    Returns:
        ``log P(y)`` in nats, the broadcast shape of the inputs.

    Raises:
        TypeError/ValueError: for invalid levels (see ``check_levels``) or non-float, non-finite parameters.
    """
    check_levels(y, num_levels)
    _check_params(mean=mean, log_scale=log_scale)
    y = y.to(mean.dtype)
    return log_bin_probability(y, y - 0.5, y + 0.5, mean, log_scale, num_levels, F.logsigmoid)


def discretized_logistic_mixture_log_prob(y: Tensor, logit_weights: Tensor, means: Tensor, log_scales: Tensor,
                                          num_levels: int) -> Tensor:
    """Elementwise ``log P(y)`` of a mixture of ``M`` discretized logistics (PixelCNN++, Eq. 2).

    With mixture weights ``π = softmax(logit_weights)`` over the last axis,

        P(y) = Σ_m π_m [F_m(y + 1/2) - F_m(y - 1/2)],   F_m(v) = sigmoid((v - μ_m) / s_m),

    with open edge bins as in ``discretized_logistic_log_prob`` (level 0 takes ``(-inf, 1/2]``, level
    K-1 takes ``[K - 3/2, inf)``). It is evaluated as
    ``logsumexp_m(log π_m + log P_m(y))``, so it is as stable as each component at any scale, and
    the K probabilities sum to 1. Salimans et al. write it on data rescaled to [-1, 1]; here the
    locations are in level units, as in ``discretized_logistic_log_prob`` (the same distribution).

    Args:
        y: integer levels ``(...)`` in ``{0..K-1}``; no mixture axis.
        logit_weights: unnormalised log mixture weights ``(..., M)``; the **mixture axis is the last one**.
        means: component locations in level units, ``(..., M)``.
        log_scales: component log-scales, ``(..., M)``.
            The three parameter tensors must have the same shape; ``y[..., None]`` must broadcast to it.
        num_levels: ``K``.

    Returns:
        ``log P(y)`` in nats, shape ``broadcast(y.shape, means.shape[:-1])``.

    Raises:
        TypeError/ValueError: invalid levels (``check_levels``), non-float or non-finite parameters,
        parameters of different shapes or without a mixture axis, or ``y`` that does not broadcast.

    Source: Salimans, Karpathy, Chen & Kingma 2017, "PixelCNN++", Sec. 2.1, Eq. 2.
    """
    check_levels(y, num_levels)
    _check_params(logit_weights=logit_weights, means=means, log_scales=log_scales)
    if not (logit_weights.shape == means.shape == log_scales.shape) or means.dim() == 0:
        raise ValueError("logit_weights, means and log_scales must have the same shape (..., M), got "
                         f"{tuple(logit_weights.shape)}, {tuple(means.shape)} and {tuple(log_scales.shape)}")
    try:
        torch.broadcast_shapes(y.shape + (1,), means.shape)
    except RuntimeError as err:
        raise ValueError(f"levels of shape {tuple(y.shape)} do not broadcast against mixture parameters "
                         f"of shape {tuple(means.shape)} (the mixture axis is the last one)") from err
    yy = y.to(means.dtype)[..., None]
    component = log_bin_probability(yy, yy - 0.5, yy + 0.5, means, log_scales, num_levels, F.logsigmoid)
    return torch.logsumexp(F.log_softmax(logit_weights, dim=-1) + component, dim=-1)


def discretized_gaussian_log_prob(y: Tensor, mean: Tensor, log_scale: Tensor, num_levels: int) -> Tensor:
    """Elementwise ``log P(y)`` of a Gaussian on [-1, 1] discretized onto K levels: the DDPM decoder L_0.

    Level y sits at ``c = 2y/(K-1) - 1`` (the level grid mapped to [-1, 1], as
    ``dgmlib.diffusion.levels_to_unit``) and owns the bin ``[c - δ, c + δ]`` with ``δ = 1/(K-1)``; the
    edge bins are open (Ho et al. 2020, Eq. 13):

        P(y) = Φ((c + δ - μ)/σ) - Φ((c - δ - μ)/σ),   with c - δ = -inf at y = 0 and c + δ = +inf at y = K-1.

    Computed from ``log Φ`` differences, reflected for bins above the mean (``log_bin_probability``),
    so it stays finite at any scale; the K probabilities sum to 1. Unlike the logistic functions of
    this module, ``mean`` is in the [-1, 1] units of the diffusion model, not in level units.

    Args:
        y: integer levels ``(...)`` in {0..K-1}.
        mean: μ in [-1, 1] units; log_scale: log σ; both floating point, broadcastable to ``y``.
        num_levels: K.

    Returns:
        ``log P(y)`` in nats, the broadcast shape.

    Raises:
        TypeError/ValueError: for invalid levels or non-float, non-finite parameters.

    Source: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", Sec. 3.3, Eq. 13.
    """
    check_levels(y, num_levels)
    _check_params(mean=mean, log_scale=log_scale)
    half = 1.0 / (num_levels - 1)
    yf = y.to(mean.dtype)
    centre = yf * (2.0 / (num_levels - 1)) - 1.0
    return log_bin_probability(yf, centre - half, centre + half, mean, log_scale, num_levels, torch.special.log_ndtr)


# --------------------------------------------------------------------------- uniform dequantization


def uniform_dequantize(y: Tensor, num_levels: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Map discrete levels to continuous data in [0, 1): :math:`x = (y + u) / K`, :math:`u \sim U[0, 1)^D`.

    Args:
        y: integer levels of any shape, e.g. ``(B, C, H, W)``, values in ``{0..K-1}``.
        num_levels: ``K``, the number of levels (17 for digits, 256 for MNIST).
        generator: optional ``torch.Generator`` for reproducible noise.

    Returns:
        float32 tensor of ``y``'s shape with values in ``[0, 1)``.

    Raises:
        TypeError / ValueError: as ``check_levels``.

    Source: Theis et al. 2016, "A note on the evaluation of generative models", Sec. 3.1;
    Ho et al. 2019 (Flow++), Eq. 2.
    """
    check_levels(y, num_levels)
    y = y.float()
    u = rand(y.shape, device=y.device, dtype=y.dtype, generator=generator)
    return (y + u) / num_levels


def dequantized_nll(
    log_prob: Callable[[Tensor], Tensor],
    y: Tensor,
    num_levels: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Upper bound on :math:`-\log P(y)` in nats per example from a continuous density on [0, 1)^D.

    With :math:`x = (y + u) / K` the continuous density on :math:`[0, K)^D` is :math:`p(x) K^{-D}` (the
    scaling Jacobian), so Jensen's inequality gives the uniform-dequantization bound

    .. math::

        \log P(y) = \log \int p\Big(\frac{y+u}{K}\Big) K^{-D} \, du
        \;\ge\; \mathbb{E}_u\Big[\log p\Big(\frac{y+u}{K}\Big)\Big] - D \log K.

    This returns a one-sample Monte-Carlo estimate of the right-hand side, negated:
    :math:`-\log p(x) + D \log K`. Averaged over data and noise it is an upper bound on the discrete
    NLL. Convert it with ``nats_to_bits_per_dim`` for bits/dim.

    Args:
        log_prob: maps ``x`` of ``y``'s shape ``(B, ...)`` to ``(B,)`` log-densities in nats on [0,1)^D.
        y: ``(B, ...)`` integer levels in ``{0..K-1}``.
        num_levels: ``K``.
        generator: optional generator for the dequantization noise.

    Returns:
        ``(B,)`` tensor, nats per example.

    Raises:
        TypeError / ValueError: as ``check_levels``; ValueError if ``log_prob`` returns a wrong shape.

    Source: Isachenko, DGM lecture 6, "Uniform dequantization bound"; Ho et al. 2019, Eq. 2-3.
    """
    check_levels(y, num_levels)
    # the variational bound with q = U[0, 1)^D (log q = 0), on float32 noise as ``uniform_dequantize`` draws it
    return variational_dequantization_nll(log_prob, y.float(), num_levels, UniformDequantizer(), generator)


# --------------------------------------------------------------------------- dequantization distributions q(u | y)


class UniformDequantizer(nn.Module):
    """``q(u | y) = U[0, 1)^D``: the dequantization distribution of the uniform bound (``log q = 0``).

    With it, ``variational_dequantization_nll`` is the uniform bound of ``dequantized_nll`` and
    ``importance_weighted_dequantization_nll`` its importance-weighted version.
    """

    def sample(self, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``u ~ U[0, 1)`` of ``y``'s shape ``(B, ...)``; return ``(u, log_q)`` with ``log_q = 0`` of shape ``(B,)``.

        ``u`` has ``y``'s dtype if that is floating point, else float32. Raises TypeError if ``y`` is not a tensor.
        """
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        dtype = y.dtype if y.is_floating_point() else torch.float32
        u = rand(y.shape, device=y.device, dtype=dtype, generator=generator)
        return u, torch.zeros(y.shape[0], device=y.device, dtype=dtype)

    def log_prob(self, u: Tensor, y: Tensor) -> Tensor:
        """``log q(u | y) = 0`` per example, ``(B,)``, for ``u`` in [0, 1)^D."""
        return torch.zeros(u.shape[0], device=u.device, dtype=u.dtype)


class VariationalDequantizer(nn.Module):
    """A conditional flow ``q(u | y)`` on ``(0, 1)^D``: Gaussian noise, conditional affine, sigmoid.

    The sampling path (Flow++, Ho et al. 2019, Sec. 3.1, with the simplest conditional flow):

        ε ~ N(0, I_D),   s = μ(y) + σ(y) ⊙ ε,   u = sigmoid(s),

    where ``μ(y)`` and ``log σ(y)`` come from a small network of the levels (a two-layer conv net for
    images ``(C, H, W)``, an MLP for vectors ``(D,)``; its input is ``y`` scaled to [-1, 1]). Each
    step is invertible and elementwise, so the change of variables gives, per example,

        log q(u | y) = log N(ε; 0, I) - Σ_i log σ_i(y) - Σ_i log sigmoid'(s_i),
        log sigmoid'(s) = log sigmoid(s) + log sigmoid(-s).

    The last layer starts at zero, so before training ``q`` is the logit-normal ``sigmoid(N(0, I))``
    for every ``y``. ``u`` is clamped below 1 (by one float ulp) so that ``(y + u) / K`` never rounds into
    the next level's bin; the clamp changes nothing but the values ``sigmoid`` rounds to 1.

    Args:
        data_shape: the shape of one example, ``(C, H, W)`` or ``(D,)``.
        num_levels: ``K``.
        hidden: channels (conv) or units (MLP) of the hidden layer.

    Raises:
        ValueError: for a ``data_shape`` that is neither 1D nor 3D, non-positive sizes, or ``num_levels < 2``.

    Source: Ho, Chen, Srinivas, Duan & Abbeel 2019, "Flow++", Sec. 3.1 (variational dequantization
    with a conditional flow); Isachenko, DGM lecture 6 ("variational dequantization").
    """

    def __init__(self, data_shape: Sequence[int], num_levels: int, hidden: int = 32) -> None:
        super().__init__()
        data_shape = tuple(int(s) for s in data_shape)
        if len(data_shape) not in (1, 3) or min(data_shape) < 1:
            raise ValueError(f"data_shape must be (C, H, W) or (D,) with positive sizes, got {data_shape}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        if hidden < 1:
            raise ValueError(f"hidden must be positive, got {hidden}")
        self.data_shape, self.num_levels = data_shape, num_levels
        if len(data_shape) == 3:
            c = data_shape[0]
            self.net = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 2 * c, 3, padding=1))
        else:
            d = data_shape[0]
            self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * d))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _params(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if tuple(y.shape[1:]) != self.data_shape:
            raise ValueError(f"y must have shape (B, {', '.join(map(str, self.data_shape))}), got {tuple(y.shape)}")
        check_levels(y, self.num_levels)
        dtype = self.net[-1].weight.dtype
        h = self.net(y.to(dtype) * (2.0 / (self.num_levels - 1)) - 1.0)
        mu, log_sigma = h.chunk(2, dim=1)
        return mu, log_sigma

    def sample(self, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``u ~ q(u | y)`` by the reparametrization above.

        Args:
            y: ``(B, *data_shape)`` integer levels.
            generator: optional generator for ``ε``.

        Returns:
            ``(u, log_q)``: ``u`` of ``y``'s shape in ``[0, 1)`` (dtype of the module's parameters),
            differentiable in the parameters, and ``log q(u | y)`` in nats, ``(B,)``.

        Raises:
            TypeError/ValueError: for a non-tensor, wrong shape or invalid levels.
        """
        mu, log_sigma = self._params(y)
        eps = randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        s = mu + log_sigma.exp() * eps
        u = torch.sigmoid(s).clamp_max(1.0 - torch.finfo(s.dtype).eps / 2)
        log_q = (-0.5 * eps ** 2 - 0.5 * LOG_2PI - log_sigma - F.logsigmoid(s) - F.logsigmoid(-s)).flatten(1).sum(1)
        return u, log_q

    def log_prob(self, u: Tensor, y: Tensor) -> Tensor:
        """``log q(u | y)`` in nats per example, ``(B,)``, for ``u`` in ``(0, 1)^D`` of ``y``'s shape (the inverse path).

        Raises:
            TypeError/ValueError: for a non-tensor, wrong shape or invalid levels, or ``u`` of another shape.
        """
        mu, log_sigma = self._params(y)
        if u.shape != y.shape:
            raise ValueError(f"u must have y's shape {tuple(y.shape)}, got {tuple(u.shape)}")
        u = u.to(mu.dtype)
        s = torch.log(u) - torch.log1p(-u)  # logit
        eps = (s - mu) * torch.exp(-log_sigma)
        return (-0.5 * eps ** 2 - 0.5 * LOG_2PI - log_sigma - F.logsigmoid(s) - F.logsigmoid(-s)).flatten(1).sum(1)


# --------------------------------------------------------------------------- the bounds


def _log_weights(log_prob: Callable[[Tensor], Tensor], y: Tensor, num_levels: int, dequantizer,
                 generator: torch.Generator | None) -> Tensor:
    """One draw ``u ~ q(u | y)``: ``log p((y+u)/K) - D log K - log q(u | y)``, ``(B,)`` nats."""
    if dequantizer is None:
        dequantizer = UniformDequantizer()
    u, log_q = dequantizer.sample(y, generator)
    if not (isinstance(u, Tensor) and isinstance(log_q, Tensor)):
        raise TypeError("dequantizer.sample must return two tensors (u, log_q)")
    if u.shape != y.shape or log_q.shape != (y.shape[0],):
        raise ValueError(f"dequantizer.sample must return u of y's shape {tuple(y.shape)} and log_q of shape "
                         f"({y.shape[0]},), got {tuple(u.shape)} and {tuple(log_q.shape)}")
    x = (y.to(u.dtype) + u) / num_levels
    log_px = log_prob(x)
    if not isinstance(log_px, Tensor) or log_px.shape != (y.shape[0],):
        shape = tuple(log_px.shape) if isinstance(log_px, Tensor) else type(log_px).__name__
        raise ValueError(f"log_prob must return shape (B,) = ({y.shape[0]},), got {shape}")
    return log_px - y[0].numel() * math.log(num_levels) - log_q


def _check_batch(y: Tensor, num_levels: int) -> None:
    check_levels(y, num_levels)
    if y.dim() < 2:
        raise ValueError(f"y must be a batch (B, ...) with at least 2 dimensions, got shape {tuple(y.shape)}")


def variational_dequantization_nll(
    log_prob: Callable[[Tensor], Tensor],
    y: Tensor,
    num_levels: int,
    dequantizer=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The variational-dequantization bound on :math:`-\log P(y)`, one-sample estimate, nats per example.

    For a dequantization distribution :math:`q(u \mid y)` on :math:`[0, 1)^D`, Jensen's inequality applied to
    :math:`P(y) = \mathbb{E}_q[p((y+u)/K) K^{-D} / q(u \mid y)]` gives (Flow++, Ho et al. 2019, Eq. 5)

    .. math::

        -\log P(y) \le \mathbb{E}_q\Big[-\log p\Big(\frac{y + u}{K}\Big) + \log q(u \mid y)\Big] + D \log K.

    The gap is :math:`\mathrm{KL}\big(q(u \mid y) \,\|\, p((y+u)/K) K^{-D} / P(y)\big)`: zero for that optimal
    :math:`q`. This returns
    the bracket at one draw ``u ~ q(u | y)``, which is differentiable in ``q``'s parameters through
    the reparametrization, so training ``p`` and ``q`` jointly on its mean tightens the bound.

    Args:
        log_prob: maps ``x`` of ``y``'s shape ``(B, ...)`` in ``[0, 1)^D`` to ``(B,)`` log-densities, nats.
        y: ``(B, ...)`` integer levels in ``{0..K-1}``.
        num_levels: ``K``.
        dequantizer: an object with ``sample(y, generator) -> (u, log_q)`` (``u`` of ``y``'s shape in
            [0, 1), ``log_q`` of shape ``(B,)``), e.g. ``VariationalDequantizer``; None means uniform
            (the bound of ``dequantized_nll``).
        generator: optional generator for the dequantization noise.

    Returns:
        ``(B,)`` nats per example.

    Raises:
        TypeError/ValueError: invalid levels (``check_levels``), ``y`` without a batch axis, or
        ``log_prob``/``dequantizer.sample`` returning wrong shapes.

    Source: Ho, Chen, Srinivas, Duan & Abbeel 2019, "Flow++", Sec. 3.1, Eq. 5.
    """
    _check_batch(y, num_levels)
    return -_log_weights(log_prob, y, num_levels, dequantizer, generator)


def importance_weighted_dequantization_nll(
    log_prob: Callable[[Tensor], Tensor],
    y: Tensor,
    num_levels: int,
    dequantizer=None,
    k: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The importance-weighted dequantization bound with ``k`` samples, nats per example.

    With :math:`u_1, \dots, u_k \sim q(u \mid y)` independently (Flow++, Ho et al. 2019, Eq. 12),

    .. math::

        -\log P(y) \le \mathbb{E}\Big[-\log \frac{1}{k} \sum_{j=1}^{k}
        \frac{p((y + u_j)/K) \, K^{-D}}{q(u_j \mid y)}\Big],

    computed with ``logsumexp`` over the ``k`` log-weights. The expectation is non-increasing in
    ``k`` and tends to ``-log P(y)`` as ``k -> inf`` (Burda et al. 2016, Theorem 1); at ``k = 1`` the
    estimate is exactly ``variational_dequantization_nll`` at the same draw (same generator state).
    The samples are drawn one after another from ``generator``, so memory stays that of one batch.

    Args:
        log_prob, y, num_levels, dequantizer, generator: as in ``variational_dequantization_nll``.
        k: number of importance samples, an integer ``>= 1``.

    Returns:
        ``(B,)`` nats per example (a one-draw estimate of the bound).

    Raises:
        TypeError: if ``k`` is not an integer; ValueError: if ``k < 1``; and as
        ``variational_dequantization_nll``.

    Source: Ho et al. 2019, "Flow++", Sec. 3.1, Eq. 12; Burda, Grosse & Salakhutdinov 2016 (IWAE), Eq. 8.
    """
    _check_k(k)
    _check_batch(y, num_levels)
    log_w = torch.stack([_log_weights(log_prob, y, num_levels, dequantizer, generator) for _ in range(k)])  # (k, B)
    return -(torch.logsumexp(log_w, dim=0) - math.log(k))
