"""Vector quantization and the VQ-VAE: discrete latents, the straight-through gradient, and a prior over codes.

A VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017, "Neural discrete representation learning") encodes an
image to a grid of vectors ``z_e (B, D, h, w)`` and replaces each vector by its nearest neighbour in a
codebook ``{e_1, ..., e_K}`` (Eq. 1-2):

    k*_ij = argmin_k || z_e,ij - e_k ||,        z_q,ij = e_{k*_ij}.

**The posterior is a point mass.** ``q(c | y)`` puts probability 1 on the code map ``c = k*``, so its
entropy is 0 and, for a uniform prior over the ``K`` codes at each of the ``M = h w`` positions,

    KL(q(c | y) || p(c)) = -H(q) + M log K = M log K,

a constant (slides "Discrete VAE latent representations"). The ELBO is then exact to write down:

    -log P(y) <= -log p(y | z_q) - log p(c),    ``-log p(c) = M log K`` (uniform) or a prior's exact NLL,

which ``VQVAE.nll`` reports in nats per image: after training the autoencoder, a PixelCNN fitted to the
code maps of the training images (stage 2, ``fit_prior``; the paper's Sec. 3.1 and 4) replaces the
uniform ``p(c)``, tightens the bound and gives the sampler.

**Gradients.** ``argmin`` has no useful gradient, so the decoder's gradient with respect to ``z_q`` is
copied to ``z_e`` (the straight-through estimator, Bengio et al. 2013; ``straight_through``). The codebook
and the encoder are pulled towards each other by two squared distances with stop-gradients (Eq. 3):

    L = -log p(y | z_q) + || sg[z_e] - e ||^2 + β || z_e - sg[e] ||^2,

the **codebook loss** (moves the codes only) and the **commitment loss** (moves the encoder only; β = 0.25
in the paper). Alternatively the codes follow an exponential moving average of the encoder outputs
assigned to them (App. A.1, ``ema=True``), with Laplace smoothing of the counts so that no code divides by
zero (as in Sonnet's ``VectorQuantizerEMA``); the codebook loss is then not used. Codes that no encoder output picks any more ("dead" codes) can be
restarted at encoder outputs of the current batch (``restart_threshold``); ``restarts`` counts them.

Shapes: ``z_e (B, D, *spatial)`` with the code dimension ``D`` second, as a convolution gives it; indices
``(B, *spatial)`` int64. Losses are per example, ``(B,)``, summed over positions and dimensions. Everything
is created on the device of the inputs or the parameters.

Sources: van den Oord et al. 2017, Eq. 1-3, Sec. 3.1-3.2 and App. A.1 (EMA); Razavi, van den Oord &
Vinyals 2019 (VQ-VAE-2), Algorithms 1-2; slides "ELBO surgery, learnable priors, discrete latents"
(the KL is log K) and "VQ-VAE, VQ-VAE-2, FQ-GAN".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgmlib.autoregressive import AutoregressiveModel, GatedPixelCNN, GatedPixelCNNLayer, _output_head
from dgmlib.dequantization import check_levels
from dgmlib.device import inputs_checked, module_device, module_dtype, multinomial, randint, randn, value_checks
from dgmlib.train import History, fit

__all__ = ["GAN", "ConditionalPixelCNN", "DigitClassifier", "Discriminator", "Generator", "MinibatchStd", "Quantized",
           "VectorQuantizer", "VQVAE", "VQVAE2", "classifier_accuracy", "codebook_perplexity", "digit_classifier",
           "encode_codes", "fit_prior", "frechet_digit_distance", "frechet_distance", "nearest_code",
           "straight_through", "uniform_prior_nll"]


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_codes_input(z_e: Tensor, dim: int) -> None:
    if not isinstance(z_e, Tensor):
        raise TypeError(f"z_e must be a torch.Tensor, got {type(z_e).__name__}")
    if not z_e.is_floating_point():
        raise TypeError(f"z_e must be floating point, got dtype {z_e.dtype}")
    if z_e.dim() < 2 or z_e.shape[1] != dim:
        raise ValueError(f"z_e must have shape (B, {dim}, ...) with the code dimension second, got {tuple(z_e.shape)}")


def straight_through(z_e: Tensor, z_q: Tensor) -> Tensor:
    """The straight-through estimator: the value of ``z_q``, the gradient of ``z_e``.

    ``z_e + sg[z_q - z_e]``: in the forward pass it equals ``z_q``; in the backward pass the gradient with
    respect to the output goes to ``z_e`` unchanged (the Jacobian is the identity) and nothing goes to
    ``z_q`` (van den Oord et al. 2017, Sec. 3.2; Bengio, Léonard & Courville 2013).

    Shapes: any, the same for both.

    Raises:
        ValueError: if the shapes differ.
    """
    if z_e.shape != z_q.shape:
        raise ValueError(f"z_e and z_q must have the same shape, got {tuple(z_e.shape)} and {tuple(z_q.shape)}")
    return z_e + (z_q - z_e).detach()


def nearest_code(z_e: Tensor, codebook: Tensor) -> Tensor:
    """The index of the nearest code (Euclidean) for every vector of ``z_e`` (van den Oord et al. 2017, Eq. 1).

    ``||z - e_k||^2 = ||z||^2 - 2 z·e_k + ||e_k||^2``, minimised over ``k``; ties go to the smaller index.

    Args:
        z_e: ``(B, D, *spatial)``, the code dimension second. codebook: ``(K, D)``.

    Returns:
        indices ``(B, *spatial)``, int64, on ``z_e``'s device.

    Raises:
        TypeError/ValueError: for a non-float input or mismatched dimensions.
    """
    if not isinstance(codebook, Tensor) or codebook.dim() != 2:
        raise ValueError("codebook must be a (K, D) tensor")
    _check_codes_input(z_e, codebook.shape[1])
    flat = z_e.movedim(1, -1).reshape(-1, codebook.shape[1])  # (N, D), N = B * prod(spatial)
    distances = (flat.square().sum(1, keepdim=True) - 2 * flat @ codebook.to(flat.dtype).T
                 + codebook.to(flat.dtype).square().sum(1))  # (N, K)
    return distances.argmin(1).view(z_e.shape[0], *z_e.shape[2:])


def codebook_perplexity(indices: Tensor, num_codes: int) -> Tensor:
    """``exp(H(p))`` of the codes' empirical frequencies ``p_k = n_k / N``: 1 if one code is used, ``K`` if all
    are used equally often. A measure of codebook usage (the "perplexity" of VQ-VAE implementations).

    Args:
        indices: integer codes of any shape. num_codes: ``K``.

    Returns:
        a scalar tensor (float32) on the indices' device.

    Raises:
        ValueError: for an empty tensor or codes outside ``[0, K)``.
    """
    _check_positive_int(num_codes, "num_codes")
    if indices.numel() == 0:
        raise ValueError("indices is empty")
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got dtype {indices.dtype}")
    if value_checks(indices) and (indices.min() < 0 or indices.max() >= num_codes):
        raise ValueError(f"indices must lie in [0, {num_codes - 1}]")
    return _perplexity(_counts(indices, num_codes))


def _counts(indices: Tensor, num_codes: int) -> Tensor:
    """How often each code occurs, ``(K,)`` float32, without a host round trip (unlike ``bincount``)."""
    flat = indices.flatten().long()
    return torch.zeros(num_codes, device=flat.device).index_add_(0, flat, torch.ones(flat.shape, device=flat.device))


def _perplexity(counts: Tensor) -> Tensor:
    p = counts / counts.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def uniform_prior_nll(num_positions: int, num_codes: int) -> float:
    """``-log p(c) = M log K`` nats: the uniform prior's NLL of any code map with ``M`` positions and ``K`` codes,
    which is also ``KL(q(c|y) || p(c))`` for the point-mass posterior of a VQ-VAE (its entropy is 0).

    Raises:
        ValueError: for non-positive sizes.
    """
    _check_positive_int(num_positions, "num_positions")
    _check_positive_int(num_codes, "num_codes")
    return num_positions * math.log(num_codes)


class Quantized(NamedTuple):
    """What ``VectorQuantizer`` returns for ``z_e (B, D, *spatial)``.

    Attributes:
        z_q: the quantized vectors with the straight-through gradient, ``(B, D, *spatial)``.
        indices: the codes, ``(B, *spatial)`` int64.
        codebook_loss: ``||sg[z_e] - z_q||^2`` per example ``(B,)`` (gradient to the codebook only).
        commitment_loss: ``||z_e - sg[z_q]||^2`` per example ``(B,)`` (gradient to the encoder only).
        loss: what to add to the reconstruction NLL, ``(B,)``: ``codebook_loss + β commitment_loss``, or
            ``β commitment_loss`` alone for an EMA codebook.
        perplexity: of the batch's codes (scalar).
    """

    z_q: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    loss: Tensor
    perplexity: Tensor


class VectorQuantizer(nn.Module):
    """A codebook of ``K`` vectors of dimension ``D`` and the nearest-neighbour quantization of ``z_e``.

    Training mode updates the codebook's usage statistics on every call; with ``ema=True`` it also moves
    the codes (van den Oord et al. 2017, App. A.1; the Laplace smoothing of the counts as in Sonnet's
    ``VectorQuantizerEMA``): with ``n_k`` the number of vectors assigned to code ``k`` in the batch and ``s_k``
    their sum,

        N_k <- γ N_k + (1 - γ) n_k,    m_k <- γ m_k + (1 - γ) s_k,    e_k = m_k / Ñ_k,
        Ñ_k = (N_k + ε) / (Σ_j N_j + K ε) · Σ_j N_j       (Laplace smoothing: no division by zero).

    The counts ``N`` (``cluster_size``) start at 1 and the sums ``m`` (``embed_sum``) at the initial codes, one
    pseudo-observation at each code, so that ``e_k = m_k / N_k`` holds from the start. Without EMA the codebook
    is a parameter trained by the codebook loss, and ``cluster_size`` still tracks the usage.

    **Dead codes.** With ``restart_threshold`` set, after each training update every code whose EMA count
    ``N_k`` fell below it is moved to a randomly chosen encoder output of the current batch (its count reset
    to 1, its EMA sum to the new code); ``restarts`` (a buffer) counts how many codes were restarted so far.
    A code unused since its last (re)start has ``N_k = γ^t`` after ``t`` steps, so a threshold of 1 restarts
    it at the first step that does not pick it: on the first steps this acts as a data-dependent
    initialisation of the codebook. Without EMA a restart writes the code directly, and the optimizer's moment
    estimates for that row stay as they were. The restarts need no host round trip (every code draws a candidate and
    ``torch.where`` keeps the dead ones' only).

    Every state (codebook, counts, sums, restarts) is a parameter or a registered buffer, so checkpoints round-trip.

    Args:
        num_codes: ``K``. dim: ``D``. beta: the commitment weight β (0.25 in the paper).
        ema: move the codes by EMA instead of the codebook loss. decay: γ. eps: ε of the smoothing.
        restart_threshold: the EMA count under which a code is restarted (None: never).

    Raises:
        ValueError: for non-positive sizes, β < 0, γ outside (0, 1), ε <= 0 or a negative threshold.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 eps: float = 1e-5, restart_threshold: float | None = None) -> None:
        super().__init__()
        _check_positive_int(num_codes, "num_codes")
        _check_positive_int(dim, "dim")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if restart_threshold is not None and not restart_threshold >= 0:
            raise ValueError(f"restart_threshold must be None or >= 0, got {restart_threshold!r}")
        self.num_codes, self.dim, self.beta, self.ema = num_codes, dim, float(beta), bool(ema)
        self.decay, self.eps, self.restart_threshold = float(decay), float(eps), restart_threshold
        init = torch.empty(num_codes, dim, device="cpu").uniform_(-1.0 / num_codes, 1.0 / num_codes)  # a common choice
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(num_codes, device="cpu"))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long, device="cpu"))

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, ema={self.ema}, decay={self.decay}, "
                f"restart_threshold={self.restart_threshold}")

    def quantize(self, indices: Tensor) -> Tensor:
        """The code vectors of ``indices (B, *spatial)``: ``(B, D, *spatial)``, on the codebook's device.

        Raises:
            TypeError/ValueError: for non-integer indices or indices outside ``[0, K)``.
        """
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be integers, got dtype {indices.dtype}")
        if indices.numel() and value_checks(indices) and (indices.min() < 0 or indices.max() >= self.num_codes):
            raise ValueError(f"indices must lie in [0, {self.num_codes - 1}]")
        return self._lookup(indices)

    def _lookup(self, indices: Tensor) -> Tensor:
        return F.embedding(indices.long().to(self.codebook.device), self.codebook).movedim(-1, 1)

    def forward(self, z_e: Tensor) -> Quantized:
        """Quantize ``z_e (B, D, *spatial)``; in training mode also update the statistics (and the EMA codes).

        Raises:
            TypeError/ValueError: for a non-float input or the wrong code dimension.
        """
        _check_codes_input(z_e, self.dim)
        indices = nearest_code(z_e, self.codebook.detach())
        z_q = self._lookup(indices).to(z_e.dtype)  # (B, D, *spatial); gradient to the codebook if it is a parameter
        codebook_loss = (z_q - z_e.detach()).square().flatten(1).sum(1)
        commitment_loss = (z_e - z_q.detach()).square().flatten(1).sum(1)
        loss = self.beta * commitment_loss + (0.0 if self.ema else codebook_loss)
        counts = _counts(indices, self.num_codes)
        perplexity = _perplexity(counts)
        if self.training:
            self._update(z_e.detach(), indices, counts)
        return Quantized(straight_through(z_e, z_q), indices, codebook_loss, commitment_loss, loss, perplexity)

    @torch.no_grad()
    def _update(self, z_e: Tensor, indices: Tensor, counts: Tensor) -> None:
        """One training step's update of the counts ``n_k`` (given), the EMA codes and the restarts (see the class)."""
        flat = z_e.movedim(1, -1).reshape(-1, self.dim).to(self.cluster_size.dtype)  # (N, D)
        if flat.shape[0] == 0:  # an empty batch carries no statistics
            return
        self.cluster_size.mul_(self.decay).add_(counts.to(self.cluster_size.dtype), alpha=1 - self.decay)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices.flatten(), flat)  # s_k, (K, D)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_threshold is not None:  # without a host round trip: every code gets a candidate
            dead = self.cluster_size < self.restart_threshold  # (K,)
            chosen = flat[randint(0, flat.shape[0], (self.num_codes,), device=flat.device)]  # (K, D)
            self.codebook.data.copy_(torch.where(dead[:, None], chosen.to(self.codebook.dtype), self.codebook.data))
            self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))
            if self.ema:
                self.embed_sum.copy_(torch.where(dead[:, None], chosen, self.embed_sum))
            self.restarts += dead.sum()

    def dead_codes(self, threshold: float = 1e-3) -> int:
        """How many codes have an EMA count ``N_k`` below ``threshold``: codes that hardly any recent encoder
        output picked."""
        return int((self.cluster_size < threshold).sum())


# --------------------------------------------------------------------------- the VQ-VAE


def _down(channels: int, steps: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(steps):
        layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.ReLU()]
    return layers


def _up(channels: int, steps: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(steps):
        layers += [nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.ReLU()]
    return layers


class _Residual(nn.Module):
    """``x + conv1x1(ReLU(conv3x3(ReLU(x))))``, the residual block of the paper's encoder and decoder (Sec. 4.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _mean_levels(logits: Tensor, num_levels: int) -> Tensor:
    """The expected level ``(B, 1, H, W)`` of the categorical decoder's logits ``(B, K_y, H, W)``."""
    levels = torch.arange(num_levels, device=logits.device, dtype=logits.dtype)
    return torch.einsum("bkhw,k->bhw", F.softmax(logits, dim=1), levels).unsqueeze(1)


def _categorical_nll(logits: Tensor, y: Tensor) -> Tensor:
    """``-log p(y | ·)`` in nats per image ``(B,)`` of levels ``y (B, 1, H, W)`` under per-pixel logits ``(B, K_y, H, W)``."""
    return F.cross_entropy(logits, y[:, 0].long(), reduction="none").flatten(1).sum(1)


def _draw_levels(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """Levels ``(B, 1, H, W)`` drawn from the categorical decoder's logits ``(B, K_y, H, W)``."""
    b, k, h, w = logits.shape
    flat = F.softmax(logits, dim=1).movedim(1, -1).reshape(-1, k)
    return multinomial(flat, 1, generator=generator).view(b, 1, h, w).to(logits.dtype)


class _PriorFlag:
    """``prior_fitted`` (whether stage 2 has fitted the prior over codes) kept in the state dict as extra state, so
    that a checkpoint knows which prior ``nll`` uses, and read without a device round trip."""

    prior_fitted: bool = False

    def get_extra_state(self) -> dict:
        """``{"prior_fitted": bool}``, saved with the state dict."""
        return {"prior_fitted": self.prior_fitted}

    def set_extra_state(self, state: dict) -> None:
        """Restore ``prior_fitted`` from a state dict."""
        self.prior_fitted = bool(state["prior_fitted"])


def _check_images(y: Tensor, event_shape: tuple[int, ...], num_levels: int) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 4 or tuple(y.shape[1:]) != event_shape:
        raise ValueError(f"y must have shape (B, {', '.join(map(str, event_shape))}), got {tuple(y.shape)}")
    check_levels(y, num_levels)


class VQVAE(_PriorFlag, nn.Module):
    """A VQ-VAE for grey images of integer levels, with a categorical decoder and an optional prior over codes.

    Encoder: a 3x3 convolution, ``downsample`` stride-2 convolutions (each halves the size), a residual
    block, and a 1x1 convolution to ``D = code_dim`` channels: ``z_e (B, D, h, w)``. The quantizer maps it to
    ``z_q`` and the codes ``c (B, h, w)``; the decoder mirrors the encoder (transposed convolutions) and ends
    in ``K`` logits per pixel: ``p(y | z_q) = prod_i Cat(y_i | softmax(logits_i))``. On the 8x8 digits with
    ``downsample=1`` the codes form a 4x4 grid.

    * ``training_loss(y)``: ``-log p(y | z_q) + ||sg[z_e] - e||^2 + β ||z_e - sg[e]||^2`` per image (Eq. 3), or
      the EMA variant's ``-log p(y | z_q) + β ||z_e - sg[e]||^2``; nats plus squared distances.
    * ``nll(y)``: the bound ``-log p(y | z_q) - log p(c) >= -log P(y)`` in nats per image, with ``p(c)`` the
      prior over codes once ``fit_prior`` has fitted it (``prior``, a gated PixelCNN over the ``(1, h, w)`` code
      maps with ``K`` levels; ``prior_fitted`` says so) and the uniform prior (``M log K``) before.
    * ``sample(n)``: codes from the prior (uniform without one), decoded to images in [0, 1] (the decoder's
      mean, or a draw).

    Args:
        event_shape: ``(1, H, W)``. num_levels: ``K_y`` grey levels. num_codes: ``K``. code_dim: ``D``.
        channels: feature maps of the encoder and the decoder. downsample: stride-2 steps (``H, W`` divisible
            by ``2^downsample``). beta, ema, decay, restart_threshold: as ``VectorQuantizer``.
        prior_channels, prior_layers: the gated PixelCNN prior's size (layers default to ``max(h, w) + 1``,
            enough for every position to see all the earlier ones).

    Raises:
        ValueError: for a shape that is not ``(1, H, W)`` divisible by ``2^downsample`` or bad sizes.
    """

    def __init__(self, event_shape: Sequence[int] = (1, 8, 8), num_levels: int = 17, num_codes: int = 64,
                 code_dim: int = 16, channels: int = 64, downsample: int = 1, beta: float = 0.25, ema: bool = True,
                 decay: float = 0.99, restart_threshold: float | None = 1.0, prior_channels: int = 64,
                 prior_layers: int | None = None) -> None:
        super().__init__()
        event_shape = tuple(int(s) for s in event_shape)
        if len(event_shape) != 3 or event_shape[0] != 1 or min(event_shape) < 1:
            raise ValueError(f"event_shape must be (1, H, W), got {event_shape}")
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 0:
            raise ValueError(f"downsample must be an integer >= 0, got {downsample!r}")
        if event_shape[1] % 2 ** downsample or event_shape[2] % 2 ** downsample:
            raise ValueError(f"H and W must be divisible by 2^downsample = {2 ** downsample}, got {event_shape}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        _check_positive_int(channels, "channels")
        self.event_shape, self.num_levels, self.num_codes = event_shape, num_levels, num_codes
        self.num_dims = math.prod(event_shape)
        self.code_shape = (event_shape[1] // 2 ** downsample, event_shape[2] // 2 ** downsample)  # (h, w)
        self.encoder = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), *_down(channels, downsample),
                                     _Residual(channels), nn.ReLU(), nn.Conv2d(channels, code_dim, 1))
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta, ema, decay, restart_threshold=restart_threshold)
        self.decoder = nn.Sequential(nn.Conv2d(code_dim, channels, 3, padding=1), _Residual(channels), nn.ReLU(),
                                     *_up(channels, downsample), nn.Conv2d(channels, num_levels, 1))
        h, w = self.code_shape
        self.prior = GatedPixelCNN((1, h, w), num_levels=num_codes, channels=prior_channels,
                                   num_layers=prior_layers or max(h, w) + 1, first_kernel=3 if max(h, w) < 5 else 5)
        self.prior_fitted = False  # saved in the state dict (get_extra_state), read without a device round trip

    @property
    def num_positions(self) -> int:
        """``M = h w``, the positions of the code map."""
        return self.code_shape[0] * self.code_shape[1]

    def encode(self, y: Tensor) -> Tensor:
        """``z_e (B, D, h, w)`` of integer levels ``y (B, 1, H, W)`` (scaled to [-1, 1] inside).

        Raises:
            TypeError/ValueError: for a wrong shape or invalid levels.
        """
        _check_images(y, self.event_shape, self.num_levels)
        x = y.to(self.encoder[0].weight.dtype) * (2.0 / (self.num_levels - 1)) - 1.0
        return self.encoder(x)

    def decode_logits(self, z_q: Tensor) -> Tensor:
        """The decoder's logits ``(B, K_y, H, W)`` for quantized vectors ``z_q (B, D, h, w)``."""
        return self.decoder(z_q)

    def recon_nll(self, y: Tensor, z_q: Tensor) -> Tensor:
        """``-log p(y | z_q)`` in nats per image, ``(B,)``."""
        return _categorical_nll(self.decode_logits(z_q), y)

    def codes(self, y: Tensor) -> Tensor:
        """The code maps ``c (B, h, w)`` int64 of images ``y``: the point mass of ``q(c | y)``."""
        return nearest_code(self.encode(y), self.quantizer.codebook.detach())

    def reconstruct(self, y: Tensor) -> Tensor:
        """The decoder's mean level ``E[y' | z_q(y)]`` ``(B, 1, H, W)`` for images ``y``: their reconstructions."""
        return _mean_levels(self.decode_logits(self.quantizer._lookup(self.codes(y))), self.num_levels)

    def training_loss(self, y: Tensor) -> Tensor:
        """The VQ-VAE objective per image ``(B,)`` (Eq. 3): ``-log p(y|z_q)`` (nats) plus the quantizer's loss."""
        out = self.quantizer(self.encode(y))
        return self.recon_nll(y, out.z_q) + out.loss

    def prior_nll(self, codes: Tensor) -> Tensor:
        """``-log p(c)`` in nats per image ``(B,)`` for code maps ``(B, h, w)``: the fitted prior's exact NLL, or
        ``M log K`` for the uniform prior."""
        if not self.prior_fitted:
            return torch.full((codes.shape[0],), uniform_prior_nll(self.num_positions, self.num_codes),
                              device=codes.device, dtype=module_dtype(self))
        return self.prior.nll(codes.unsqueeze(1).to(module_device(self.prior)).float())

    def nll_terms(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(-log p(y | z_q), -log p(c))``, each ``(B,)`` nats, for the codes ``c`` of ``y`` (no update)."""
        z_e = self.encode(y)
        indices = nearest_code(z_e, self.quantizer.codebook.detach())
        return self.recon_nll(y, self.quantizer._lookup(indices).to(z_e.dtype)), self.prior_nll(indices)

    def nll(self, y: Tensor) -> Tensor:
        """The upper bound ``-log p(y | z_q) - log p(c) >= -log P(y)`` in nats per image ``(B,)``.

        ``q(c | y)`` is a point mass, so ``log q = 0`` and the ELBO is ``log p(y | z_q) + log p(c)``. With the
        uniform prior the second term is ``M log K``, the constant KL of the slides.

        Raises:
            TypeError/ValueError: for a wrong shape or invalid levels.
        """
        recon, prior = self.nll_terms(y)
        return recon + prior

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True,
               temperature: float = 1.0) -> Tensor:
        """``n`` images in [0, 1], ``(n, 1, H, W)``: codes ``c ~ p(c)`` (the prior, or uniform), then the decoder's
        mean level (or a draw from ``p(y | z_q)``), divided by ``K_y - 1``.

        Raises:
            ValueError: for ``n < 1``.
        """
        _check_positive_int(n, "n")
        device = module_device(self)
        if not self.prior_fitted:
            codes = randint(0, self.num_codes, (n, *self.code_shape), device=device, generator=generator)
        else:
            codes = self.prior.sample(n, temperature=temperature, generator=generator)[:, 0].long().to(device)
        logits = self.decode_logits(self.quantizer._lookup(codes))  # (n, K_y, H, W)
        y = _mean_levels(logits, self.num_levels) if mean else _draw_levels(logits, generator)
        return y / (self.num_levels - 1)


class ConditionalPixelCNN(AutoregressiveModel):
    """A gated PixelCNN over code maps ``(1, h, w)`` conditioned on a coarser code map ``(h_c, w_c)``: VQ-VAE-2's
    bottom prior ``p(c_bottom | c_top)`` (Razavi et al. 2019, Algorithm 2, line 9).

    The conditioning codes are embedded (``K_c -> channels``), repeated to ``(h, w)`` (nearest neighbour, each top
    code covering its block of bottom positions) and enter every gate of every layer through a 1x1 convolution:
    the spatial conditioning of van den Oord et al. 2016b, Eq. 5. The conditioning map does not depend on the
    codes being modelled, so causality and the exact chain-rule likelihood are untouched.

    Args:
        event_shape: ``(1, h, w)``. num_levels: ``K`` codes. cond_levels: ``K_c``. cond_shape: ``(h_c, w_c)``,
            dividing ``(h, w)``. channels, num_layers, first_kernel: as ``GatedPixelCNN`` (layers default to
            ``max(h, w) + 1``).

    Raises:
        ValueError: for shapes that do not divide, or bad sizes; in ``log_prob`` and ``sample``, for a
            conditioning map of the wrong shape or codes outside ``[0, K_c)``.
    """

    def __init__(self, event_shape: Sequence[int], num_levels: int, cond_levels: int, cond_shape: Sequence[int],
                 channels: int = 64, num_layers: int | None = None, first_kernel: int = 3) -> None:
        super().__init__(event_shape, num_levels)
        _check_positive_int(cond_levels, "cond_levels")
        h, w = self.event_shape[1:]
        cond_shape = tuple(int(c) for c in cond_shape)
        if self.event_shape[0] != 1 or len(cond_shape) != 2 or min(cond_shape) < 1 or h % cond_shape[0] \
                or w % cond_shape[1]:
            raise ValueError(f"cond_shape must divide the code map (h, w) = {(h, w)}, got {cond_shape}")
        self.cond_levels, self.cond_shape = cond_levels, cond_shape
        num_layers = num_layers or max(h, w) + 1
        self.embed = nn.Embedding(cond_levels, channels)
        self.layers = nn.ModuleList(
            [GatedPixelCNNLayer(1, channels, first_kernel, first=True, cond_channels=channels)]
            + [GatedPixelCNNLayer(channels, channels, 3, cond_channels=channels) for _ in range(num_layers - 1)])
        self.head = _output_head(channels, self.params_per_pixel)  # the same head as the other PixelCNNs

    def _check_cond(self, cond: Tensor, batch: int) -> Tensor:
        if not isinstance(cond, Tensor) or cond.is_floating_point() or cond.dtype == torch.bool:
            raise TypeError("cond must be a tensor of integer codes")
        if tuple(cond.shape) != (batch, *self.cond_shape):
            raise ValueError(f"cond must have shape ({batch}, {self.cond_shape[0]}, {self.cond_shape[1]}), "
                             f"got {tuple(cond.shape)}")
        if value_checks(cond) and cond.numel() and (cond.min() < 0 or cond.max() >= self.cond_levels):
            raise ValueError(f"cond must hold codes in [0, {self.cond_levels - 1}]")
        return cond.long().to(module_device(self))

    def _net(self, x: Tensor, labels: Tensor | None, cond: Tensor | None = None) -> Tensor:
        s = F.interpolate(self.embed(cond).movedim(-1, 1), size=self.event_shape[1:], mode="nearest")  # (B, C, h, w)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, None, s)
        return self.head(h).unsqueeze(2)  # (B, K, 1, h, w)

    def forward(self, y: Tensor, cond: Tensor) -> Tensor:  # type: ignore[override]
        """The ``K`` logits of every position, ``(B, K, 1, h, w)``, given ``cond (B, h_c, w_c)``."""
        self._check_forward(y, None)
        return self._net_levels(y, None, cond=self._check_cond(cond, y.shape[0]))

    def log_prob(self, y: Tensor, cond: Tensor) -> Tensor:  # type: ignore[override]
        """Exact ``log p(y | cond)`` in nats per code map, ``(B,)``, for codes ``y (B, 1, h, w)``."""
        self._check_input(y)
        check_levels(y, self.num_levels)
        cond = self._check_cond(cond, y.shape[0])
        y = y.to(module_dtype(self))
        with inputs_checked():
            return self._pixel_log_prob(self._net_levels(y, None, cond=cond), y).flatten(1).sum(1)

    def nll(self, y: Tensor, cond: Tensor) -> Tensor:  # type: ignore[override]
        """``-log p(y | cond)`` in nats per code map, ``(B,)``."""
        return -self.log_prob(y, cond)

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0,  # type: ignore[override]
               generator: torch.Generator | None = None) -> Tensor:
        """One code map ``(B, 1, h, w)`` (float levels) per conditioning map ``cond (B, h_c, w_c)``, in raster order."""
        self._check_temperature(temperature)
        cond = self._check_cond(cond, cond.shape[0] if isinstance(cond, Tensor) else 0)
        return self._sample_with(cond.shape[0], float(temperature), None, generator, cond=cond)


class _JointCodePrior(nn.Module):
    """``p(c_top) p(c_bottom | c_top)`` of a ``VQVAE2`` as one module that ``fit`` can train: its data are the two
    code maps of each image flattened side by side, ``(N, 1, M_top + M_bottom)``."""

    def __init__(self, model: VQVAE2) -> None:
        super().__init__()
        self.top, self.bottom = model.prior_top, model.prior_bottom
        self.num_levels, self.split = model.num_codes, model.num_positions[0]
        self.top_shape, self.bottom_shape = model.top_shape, model.bottom_shape

    def nll(self, packed: Tensor) -> Tensor:
        flat = packed.flatten(1)
        top = flat[:, :self.split].reshape(-1, 1, *self.top_shape)
        bottom = flat[:, self.split:].reshape(-1, 1, *self.bottom_shape)
        return self.top.nll(top) + self.bottom.nll(bottom, top[:, 0].long())


class VQVAE2(_PriorFlag, nn.Module):
    """VQ-VAE-2 for grey images: two levels of codes, a coarse top map and a finer bottom map (Razavi et al. 2019).

    Algorithm 1 (stage 1), with ``x`` the image scaled to [-1, 1]: bottom features ``f = E_b(x)`` at ``H/2``;
    ``h_top = E_t(f)`` at ``H/4``, quantized to ``e_top`` (codes ``c_top``); ``h_bottom`` from ``f`` and the
    top's decoding ``D_t(e_top)``, quantized to ``e_bottom`` (codes ``c_bottom``); the decoder sees ``e_bottom``
    and the upsampled ``e_top`` and outputs ``K_y`` logits per pixel. The loss is ``-log p(y | e_top, e_bottom)``
    plus both quantizers' losses. Algorithm 2 (stage 2, ``fit_prior``): a gated PixelCNN ``p(c_top)`` and a
    ``ConditionalPixelCNN`` ``p(c_bottom | c_top)``. Sampling draws ``c_top``, then ``c_bottom`` given it, then
    decodes. The bound, with the posterior a point mass on both code maps:

        -log P(y) <= -log p(y | e_top, e_bottom) - log p(c_top) - log p(c_bottom | c_top),

    in nats per image (uniform priors before stage 2: ``M_top log K + M_bottom log K``).

    Args:
        event_shape: ``(1, H, W)``, ``H`` and ``W`` divisible by 4. num_levels: ``K_y``. num_codes: ``K`` of both
            codebooks. code_dim, channels, beta, ema, decay, restart_threshold, prior_channels: as ``VQVAE``.

    Raises:
        ValueError: for a shape that is not ``(1, H, W)`` divisible by 4, or bad sizes.
    """

    def __init__(self, event_shape: Sequence[int] = (1, 8, 8), num_levels: int = 17, num_codes: int = 64,
                 code_dim: int = 16, channels: int = 64, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 restart_threshold: float | None = 1.0, prior_channels: int = 64) -> None:
        super().__init__()
        event_shape = tuple(int(s) for s in event_shape)
        if len(event_shape) != 3 or event_shape[0] != 1 or min(event_shape) < 1 or event_shape[1] % 4 \
                or event_shape[2] % 4:
            raise ValueError(f"event_shape must be (1, H, W) with H and W divisible by 4, got {event_shape}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        _check_positive_int(channels, "channels")
        h, w = event_shape[1:]
        self.event_shape, self.num_levels, self.num_codes = event_shape, num_levels, num_codes
        self.num_dims = math.prod(event_shape)
        self.bottom_shape, self.top_shape = (h // 2, w // 2), (h // 4, w // 4)
        c, d = channels, code_dim
        self.enc_bottom = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), *_down(c, 1), _Residual(c))
        self.enc_top = nn.Sequential(*_down(c, 1), _Residual(c), nn.ReLU(), nn.Conv2d(c, d, 1))
        self.dec_top = nn.Sequential(nn.Conv2d(d, c, 3, padding=1), _Residual(c), nn.ReLU(), *_up(c, 1))
        self.pre_bottom = nn.Conv2d(2 * c, d, 1)
        self.quant_top = VectorQuantizer(num_codes, d, beta, ema, decay, restart_threshold=restart_threshold)
        self.quant_bottom = VectorQuantizer(num_codes, d, beta, ema, decay, restart_threshold=restart_threshold)
        self.up_top = nn.ConvTranspose2d(d, d, 4, stride=2, padding=1)
        self.decoder = nn.Sequential(nn.Conv2d(2 * d, c, 3, padding=1), _Residual(c), nn.ReLU(), *_up(c, 1),
                                     nn.Conv2d(c, num_levels, 1))
        self.prior_top = GatedPixelCNN((1, *self.top_shape), num_levels=num_codes, channels=prior_channels,
                                       num_layers=max(self.top_shape) + 1, first_kernel=3)
        self.prior_bottom = ConditionalPixelCNN((1, *self.bottom_shape), num_codes, num_codes, self.top_shape,
                                                channels=prior_channels)
        self.prior_fitted = False

    @property
    def num_positions(self) -> tuple[int, int]:
        """``(M_top, M_bottom)``, the positions of the two code maps."""
        return self.top_shape[0] * self.top_shape[1], self.bottom_shape[0] * self.bottom_shape[1]

    def _features(self, y: Tensor) -> Tensor:
        _check_images(y, self.event_shape, self.num_levels)
        x = y.to(self.enc_bottom[0].weight.dtype) * (2.0 / (self.num_levels - 1)) - 1.0
        return self.enc_bottom(x)  # (B, C, H/2, W/2)

    def _bottom_input(self, f: Tensor, z_top: Tensor) -> Tensor:
        return self.pre_bottom(torch.cat([f, self.dec_top(z_top)], dim=1))  # (B, D, H/2, W/2)

    def decode_logits(self, z_top: Tensor, z_bottom: Tensor) -> Tensor:
        """``K_y`` logits per pixel ``(B, K_y, H, W)`` from the quantized maps of both levels."""
        return self.decoder(torch.cat([z_bottom, self.up_top(z_top)], dim=1))

    def training_loss(self, y: Tensor) -> Tensor:
        """Algorithm 1's loss per image ``(B,)``: ``-log p(y | e_top, e_bottom)`` (nats) plus both quantizers' losses."""
        f = self._features(y)
        top = self.quant_top(self.enc_top(f))
        bottom = self.quant_bottom(self._bottom_input(f, top.z_q))
        return _categorical_nll(self.decode_logits(top.z_q, bottom.z_q), y) + top.loss + bottom.loss

    def codes(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_top (B, H/4, W/4), c_bottom (B, H/2, W/2))``, int64: the point mass of ``q(c | y)`` (no update)."""
        f = self._features(y)
        z = self.enc_top(f)
        c_top = nearest_code(z, self.quant_top.codebook.detach())
        z_bottom = self._bottom_input(f, self.quant_top._lookup(c_top).to(z.dtype))
        return c_top, nearest_code(z_bottom, self.quant_bottom.codebook.detach())

    def _decode_codes(self, c_top: Tensor, c_bottom: Tensor, dtype: torch.dtype) -> Tensor:
        return self.decode_logits(self.quant_top._lookup(c_top).to(dtype), self.quant_bottom._lookup(c_bottom).to(dtype))

    def prior_nll(self, c_top: Tensor, c_bottom: Tensor) -> tuple[Tensor, Tensor]:
        """``(-log p(c_top), -log p(c_bottom | c_top))`` in nats per image, each ``(B,)``: the fitted priors' exact
        NLLs, or the uniform priors' ``M log K``."""
        if not self.prior_fitted:
            dtype = module_dtype(self)
            m_top, m_bottom = self.num_positions
            return (torch.full((c_top.shape[0],), uniform_prior_nll(m_top, self.num_codes), device=c_top.device,
                               dtype=dtype),
                    torch.full((c_top.shape[0],), uniform_prior_nll(m_bottom, self.num_codes), device=c_top.device,
                               dtype=dtype))
        device = module_device(self)
        top = self.prior_top.nll(c_top.unsqueeze(1).to(device).float())
        return top, self.prior_bottom.nll(c_bottom.unsqueeze(1).to(device).float(), c_top.to(device))

    def nll_terms(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(-log p(y | e_top, e_bottom), -log p(c_top), -log p(c_bottom | c_top))``, each ``(B,)`` nats."""
        c_top, c_bottom = self.codes(y)
        recon = _categorical_nll(self._decode_codes(c_top, c_bottom, module_dtype(self)), y)
        return (recon, *self.prior_nll(c_top, c_bottom))

    def nll(self, y: Tensor) -> Tensor:
        """The bound ``-log p(y | e_top, e_bottom) - log p(c_top) - log p(c_bottom | c_top) >= -log P(y)``, nats
        per image ``(B,)``.

        Raises:
            TypeError/ValueError: for a wrong shape or invalid levels.
        """
        return sum(self.nll_terms(y))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True,
               temperature: float = 1.0) -> Tensor:
        """``n`` images in [0, 1], ``(n, 1, H, W)``: ``c_top ~ p(c_top)``, ``c_bottom ~ p(c_bottom | c_top)`` (uniform
        before stage 2), decoded to the mean level (or a draw), divided by ``K_y - 1``.

        Raises:
            ValueError: for ``n < 1``.
        """
        _check_positive_int(n, "n")
        device = module_device(self)
        if self.prior_fitted:
            c_top = self.prior_top.sample(n, temperature=temperature, generator=generator)[:, 0].long().to(device)
            c_bottom = self.prior_bottom.sample(c_top, temperature=temperature, generator=generator)[:, 0].long()
        else:
            c_top = randint(0, self.num_codes, (n, *self.top_shape), device=device, generator=generator)
            c_bottom = randint(0, self.num_codes, (n, *self.bottom_shape), device=device, generator=generator)
        return self.decode(c_top, c_bottom.to(device), generator, mean)

    @torch.no_grad()
    def decode(self, c_top: Tensor, c_bottom: Tensor, generator: torch.Generator | None = None,
               mean: bool = True) -> Tensor:
        """Images in [0, 1], ``(n, 1, H, W)``, for code maps ``c_top (n, *top_shape)`` and ``c_bottom (n, *bottom_shape)``:
        the decoder's mean level (or a draw from ``p(y | e_top, e_bottom)``), divided by ``K_y - 1``.

        Raises:
            TypeError/ValueError: for non-integer codes or codes outside ``[0, K)``.
        """
        dtype = module_dtype(self)
        logits = self.decode_logits(self.quant_top.quantize(c_top).to(dtype),  # quantize checks the codes
                                    self.quant_bottom.quantize(c_bottom).to(dtype))
        y = _mean_levels(logits, self.num_levels) if mean else _draw_levels(logits, generator)
        return y / (self.num_levels - 1)


@torch.no_grad()
def encode_codes(model: VQVAE | VQVAE2, y: Tensor, batch_size: int = 1000) -> Tensor:
    """The code maps of images ``y (N, 1, H, W)`` as the prior's training data, float levels on the CPU (computed in
    batches on the model's device, in evaluation mode): ``(N, 1, h, w)`` for a ``VQVAE``; for a ``VQVAE2``, the top
    and the bottom map of each image flattened side by side, ``(N, 1, M_top + M_bottom)``."""
    was_training = model.training
    model.eval()
    device = module_device(model)
    chunks = []
    try:
        for i in range(0, len(y), batch_size):
            codes = model.codes(y[i:i + batch_size].to(device))
            if isinstance(codes, tuple):
                codes = torch.cat([c.flatten(1) for c in codes], dim=1)  # (B, M_top + M_bottom)
            chunks.append(codes.cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks).unsqueeze(1).float()


def fit_prior(model: VQVAE | VQVAE2, train: Tensor, val: Tensor | None = None, **fit_kwargs) -> History:
    """Stage 2 (van den Oord et al. 2017, Sec. 3.1; Razavi et al. 2019, Algorithm 2): encode the images to their code
    maps with the trained encoder (frozen) and fit the model's prior to them by maximum likelihood
    (``dgmlib.train.fit`` on the exact NLL): ``model.prior`` for a ``VQVAE``; for a ``VQVAE2`` the top prior and the
    bottom prior conditioned on the top codes, trained together on ``-log p(c_top) - log p(c_bottom | c_top)``
    (their parameters are disjoint, so this is training each on its own term). Marks the prior fitted: from then
    on ``model.nll`` and ``model.sample`` use it.

    Args:
        model: a trained ``VQVAE`` or ``VQVAE2``. train, val: images ``(N, 1, H, W)`` (levels).
        fit_kwargs: passed to ``fit`` (epochs, lr, batch_size, patience, seed, progress, device).

    Returns:
        the prior's training ``History`` (its losses are ``-log p(c)`` in nats per image).

    Raises:
        ValueError/TypeError: for invalid images (``fit``'s errors for bad settings).
    """
    prior = _JointCodePrior(model) if isinstance(model, VQVAE2) else model.prior
    codes_train = encode_codes(model, train)
    codes_val = encode_codes(model, val) if val is not None else None
    history = fit(prior, codes_train, codes_val, **fit_kwargs)
    model.prior_fitted = True
    return history


# --------------------------------------------------------------------------- FQ-GAN


class Generator(nn.Module):
    """The GAN's generator ``G``: ``z (B, Z) -> x (B, 1, H, W)`` in ``[-1, 1]`` (tanh), a DCGAN-style stack: a linear
    layer to ``(2C, H/4, W/4)``, two transposed convolutions that double the size, and a 3x3 convolution."""

    def __init__(self, event_shape: tuple[int, int, int], latent_dim: int, channels: int) -> None:
        super().__init__()
        self.latent_dim, self.start = latent_dim, (2 * channels, event_shape[1] // 4, event_shape[2] // 4)
        self.linear = nn.Linear(latent_dim, math.prod(self.start))
        self.net = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
                                 nn.BatchNorm2d(channels), nn.ReLU(),
                                 nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1),
                                 nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, 1, 3, padding=1), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.linear(z).view(-1, *self.start))


class MinibatchStd(nn.Module):
    """Appends one channel holding the average over features and positions of the batch's standard deviation
    (Karras et al. 2018, "Progressive growing of GANs", Sec. 3): ``(B, C, H, W) -> (B, C + 1, H, W)``. A
    discriminator that sees how varied a batch is can tell a collapsed generator from the data; without it the
    small GAN of the course collapses to one image within seconds."""

    def forward(self, x: Tensor) -> Tensor:
        spread = x.std(0, unbiased=False).mean().expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([x, spread], dim=1)


class Discriminator(nn.Module):
    """The discriminator ``D = f_T ∘ f_B`` (a logit per image), or with feature quantization
    ``D = f_T ∘ f_Q ∘ f_B`` (Zhao et al. 2020, Eq. 3): ``f_B`` two stride-2 convolutions to features ``(2C, H/4,
    W/4)``, ``f_Q`` a ``VectorQuantizer`` of those feature vectors (EMA codebook, straight-through), ``f_T`` the
    minibatch standard deviation, a 3x3 convolution and a linear layer. ``forward`` returns the logits ``(B,)``
    and the quantizer's loss ``(B,)`` (zeros without quantization)."""

    def __init__(self, event_shape: tuple[int, int, int], channels: int, quantizer: VectorQuantizer | None) -> None:
        super().__init__()
        c = channels
        self.bottom = nn.Sequential(nn.Conv2d(1, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                    nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.LeakyReLU(0.2))
        self.quantizer = quantizer
        self.top = nn.Sequential(MinibatchStd(), nn.Conv2d(2 * c + 1, 2 * c, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Flatten(),
                                 nn.Linear(2 * c * (event_shape[1] // 4) * (event_shape[2] // 4), 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.bottom(x)  # (B, 2C, H/4, W/4)
        if self.quantizer is None:
            return self.top(features).squeeze(1), x.new_zeros(x.shape[0])
        out = self.quantizer(features)
        return self.top(out.z_q).squeeze(1), out.loss


class GAN(nn.Module):
    """A small GAN for grey images, trained with the non-saturating losses, optionally with the feature-quantized
    discriminator of FQ-GAN (Zhao, Li, Yu, Gao & Chen 2020, "Feature quantization improves GAN training", ICML).

    The generator maps ``z ~ N(0, I)`` to an image; the discriminator ``D`` outputs a logit, ``σ(D(x))`` the
    probability that ``x`` is real (Goodfellow et al. 2014). Per real image ``x`` and fake ``G(z)``:

        L_D = -log σ(D(x)) - log(1 - σ(D(G(z))))  = softplus(-D(x)) + softplus(D(G(z)))   (G's output detached)
        L_G = -log σ(D(G(z)))                     = softplus(-D(G(z)))                    (D's parameters detached)

    ``training_loss`` returns ``L_D + L_G`` per image, with each term's gradient routed to one network only, so that
    one optimizer step of ``dgmlib.train.fit`` is one simultaneous gradient step of both players. With
    ``quantize=True`` the discriminator's middle features are replaced by their nearest codes of a dictionary kept
    by EMA (the same ``VectorQuantizer``), the commitment losses of the real and the fake features are added to
    ``L_D``, and the dictionary sees the features of both: real and fake features are matched against the same
    codes, the paper's implicit feature matching. A GAN has no likelihood: compare its samples with
    ``frechet_digit_distance``.

    Args:
        event_shape: ``(1, H, W)``, ``H`` and ``W`` divisible by 4. num_levels: ``K_y`` (images enter as
            ``2 y / (K_y - 1) - 1``). latent_dim: ``Z``. channels: feature maps. quantize: FQ-GAN or not.
            num_codes, beta, decay, restart_threshold: the feature quantizer's (dimension ``2 channels``). The
            discriminator's features move fast, so codes die often (thousands of restarts in a minute at a
            threshold of 1); without restarts the dictionary collapsed onto a few codes in one of two seeds on the
            digits (perplexity 11 of 64), and the generator with it.

    Raises:
        ValueError: for a bad shape or sizes.
    """

    def __init__(self, event_shape: Sequence[int] = (1, 8, 8), num_levels: int = 17, latent_dim: int = 32,
                 channels: int = 32, quantize: bool = True, num_codes: int = 64, beta: float = 0.25,
                 decay: float = 0.99, restart_threshold: float | None = 1.0) -> None:
        super().__init__()
        event_shape = tuple(int(s) for s in event_shape)
        if len(event_shape) != 3 or event_shape[0] != 1 or min(event_shape) < 1 or event_shape[1] % 4 \
                or event_shape[2] % 4:
            raise ValueError(f"event_shape must be (1, H, W) with H and W divisible by 4, got {event_shape}")
        _check_positive_int(latent_dim, "latent_dim")
        _check_positive_int(channels, "channels")
        self.event_shape, self.num_levels, self.latent_dim, self.quantize = event_shape, num_levels, latent_dim, quantize
        self.generator = Generator(event_shape, latent_dim, channels)
        quantizer = VectorQuantizer(num_codes, 2 * channels, beta, ema=True, decay=decay,
                                    restart_threshold=restart_threshold) if quantize else None
        self.discriminator = Discriminator(event_shape, channels, quantizer)

    def to_unit(self, x: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` to ``[0, 1]``."""
        return (x + 1) / 2

    def training_loss(self, y: Tensor) -> Tensor:
        """``L_D + L_G`` per image ``(B,)`` in nats for real levels ``y (B, 1, H, W)`` and as many fresh ``z``; each
        term's gradient reaches only its own network (see the class).

        Raises:
            TypeError/ValueError: for a wrong shape or invalid levels.
        """
        _check_images(y, self.event_shape, self.num_levels)
        x = y.to(self.generator.linear.weight.dtype) * (2.0 / (self.num_levels - 1)) - 1.0
        z = torch.randn(x.shape[0], self.latent_dim, device=x.device, dtype=x.dtype)
        fake = self.generator(z)
        d_real, q_real = self.discriminator(x)
        d_fake, q_fake = self.discriminator(fake.detach())
        loss_d = F.softplus(-d_real) + F.softplus(d_fake) + q_real + q_fake
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        with _no_codebook_update(self.discriminator):
            d_gen, _ = torch.func.functional_call(self.discriminator, frozen, (fake,))
        return loss_d + F.softplus(-d_gen)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images ``G(z)`` in ``[0, 1]``, ``(n, 1, H, W)``, ``z ~ N(0, I)`` (seeded by ``generator``).

        Raises:
            ValueError: for ``n < 1``.
        """
        _check_positive_int(n, "n")
        was_training = self.generator.training
        self.generator.eval()
        try:
            weight = self.generator.linear.weight
            z = randn((n, self.latent_dim), device=weight.device, dtype=weight.dtype, generator=generator)
            return self.to_unit(self.generator(z))
        finally:
            self.generator.train(was_training)


class _no_codebook_update:  # noqa: N801 - used as a context manager
    """Within the block the discriminator's quantizer (if any) quantizes without updating its codebook: the
    generator's pass must not move the dictionary a second time."""

    def __init__(self, discriminator: Discriminator) -> None:
        self.quantizer = discriminator.quantizer
        self.was_training = False

    def __enter__(self) -> None:
        if self.quantizer is not None:
            self.was_training = self.quantizer.training
            self.quantizer.eval()

    def __exit__(self, *exc: object) -> None:
        if self.quantizer is not None:
            self.quantizer.train(self.was_training)


# --------------------------------------------------------------------------- the Fréchet distance on digits


class DigitClassifier(nn.Module):
    """A small convolutional classifier of the 8x8 digits (two 3x3 convolutions, a 64-unit feature layer, 10 logits),
    trained once per process by ``digit_classifier`` from code, not shipped weights. ``features(y)`` gives the
    64-d penultimate activations that ``frechet_digit_distance`` compares."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        """``(B, 64)`` features of images ``x (B, 1, 8, 8)`` in ``[0, 1]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


_CLASSIFIER: list[DigitClassifier] = []


def digit_classifier() -> DigitClassifier:
    """The feature network of the Fréchet distance: a ``DigitClassifier`` trained on the 1000 training digits and
    their labels (seed 0, 40 epochs of Adam, about 3 s on a CPU), on the CPU, in evaluation mode; trained on first
    use and kept for the process. Its test accuracy is ``classifier_accuracy()``."""
    if not _CLASSIFIER:
        from dgmlib.data import load_digit_labels, load_digits

        with torch.random.fork_rng(devices=[]):  # the same weights whatever the caller's random state
            torch.manual_seed(0)
            net = DigitClassifier()
        packed = {split: torch.cat([load_digits(split).flatten(1) / 16.0, load_digit_labels(split)[:, None].float()], 1)
                  for split in ("train", "val")}  # (N, 65): the image in [0, 1], then its label

        def loss(batch: Tensor) -> Tensor:
            return F.cross_entropy(net(batch[:, :64].view(-1, 1, 8, 8)), batch[:, 64].long(), reduction="none")

        with torch.enable_grad():  # also when first called under no_grad
            fit(net, packed["train"], packed["val"], loss_fn=loss, epochs=40, lr=2e-3, seed=0, progress=False,
                device="cpu")
        _CLASSIFIER.append(net.eval())
    return _CLASSIFIER[0]


def classifier_accuracy() -> float:
    """The accuracy of ``digit_classifier()`` on the 447 test digits (a check that its features mean something)."""
    from dgmlib.data import load_digit_labels, load_digits

    net = digit_classifier()
    with torch.no_grad():
        predicted = net(load_digits("test") / 16.0).argmax(1)
    return (predicted == load_digit_labels("test")).float().mean().item()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of feature vectors (Heusel et al. 2017, Eq. 6):

        ||μ_a - μ_b||^2 + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^{1/2}),

    with ``Tr((Σ_a Σ_b)^{1/2})`` the sum of the square roots of the eigenvalues of ``Σ_a Σ_b`` (real and
    non-negative for two covariance matrices), in float64.

    Args:
        a: ``(N, F)``. b: ``(M, F)``, ``N, M >= 2``.

    Raises:
        ValueError: for mismatched feature sizes or fewer than two vectors.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"a and b must be (N, F) and (M, F) with N, M >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double().cpu(), b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # (F, F), also for F = 1
    eig = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eig.sqrt().sum()).item()


def frechet_digit_distance(images: Tensor, reference: Tensor | None = None) -> float:
    """The Fréchet distance between the ``digit_classifier`` features of ``images`` and of ``reference`` (default:
    the 1000 training digits): lower is closer. Both are images in ``[0, 1]``, ``(N, 1, 8, 8)``; the held-out test
    digits against the training digits give the floor that samples of a perfect model would reach.

    Raises:
        ValueError: for images that are not ``(N, 1, 8, 8)``.
    """
    from dgmlib.data import load_digits

    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"the Fréchet digit distance needs (N, 1, 8, 8) images in [0, 1], got {tuple(images.shape)}")
    reference = load_digits("train") / 16.0 if reference is None else reference
    net = digit_classifier()
    with torch.no_grad():
        return frechet_distance(net.features(images.float().cpu()), net.features(reference.float().cpu()))
