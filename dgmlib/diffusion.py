r"""Denoising diffusion probabilistic models (DDPM): schedules, the forward process, L_simple,
ancestral and DDIM sampling, and the variational bound in nats and bits/dim.

Notation and equations follow Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models":

* forward process (Eq. 2): :math:`q(x_t \mid x_{t-1}) = \mathcal{N}(x_t; \sqrt{1 - \beta_t}\, x_{t-1}, \beta_t I)`;
* closed form (Eq. 4): :math:`q(x_t \mid x_0) = \mathcal{N}(x_t; \sqrt{\bar\alpha_t}\, x_0, (1 - \bar\alpha_t) I)`,
  :math:`\alpha_t = 1 - \beta_t`, :math:`\bar\alpha_t = \prod_{s \le t} \alpha_s`;
* posterior (Eq. 6-7): :math:`q(x_{t-1} \mid x_t, x_0) = \mathcal{N}(\tilde\mu_t, \tilde\beta_t I)` with
  :math:`\tilde\beta_t = \beta_t (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)`;
* bound (Eq. 5): :math:`L = L_T + \sum_{t=2}^{T} L_{t-1} + L_0`; training objective
  :math:`L_\text{simple} = \mathbb{E}_{t, x_0, \epsilon} \|\epsilon - \epsilon_\theta(x_t, t)\|^2`
  (Eq. 14, Algorithm 1); sampling, Algorithm 2. DDIM: Song, Meng & Ermon 2021, Eq. 12. Cosine schedule: Nichol & Dhariwal
  2021, Eq. 17.

Improved DDPM (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"), as options of
``DDPM``, the defaults being Ho et al.'s model:

* ``variance="learned"`` (Sec. 3.1, Eq. 15): the network outputs 2C channels, ε (or x_0) and v, and
  :math:`\Sigma_\theta = \exp(v \log\beta_t + (1 - v) \log\tilde\beta_t)`; it trains on
  :math:`L_\text{hybrid} = L_\text{simple} + \lambda L_\text{vlb}` (Eq. 16, λ = 0.001) with a stop-gradient
  on the mean in L_vlb;
* ``t_sampling="importance"`` (Sec. 3.3, Eq. 18): the model trains on L_vlb, with t drawn with
  :math:`p_t \propto \sqrt{E[L_t^2]}` from a history of the last 10 values of each L_t.

**Indexing.** Timesteps are t = 1..T as in the paper, everywhere in this module's interface: a
``t`` argument is an integer tensor ``(B,)`` with values in {1, ..., T}, and t = 0 means clean data.
Internally the schedule's arrays are 0-based: ``schedule.betas[t - 1]`` is β_t, and
``schedule.alpha_bar_prev[t - 1]`` is ᾱ_{t-1} with ᾱ_0 = 1. Schedules are computed in float64 and
cast to the data's dtype at use (as in improved-diffusion).

Data: images are scaled from levels {0..K-1} to [-1, 1] (``levels_to_unit``); 2D toys are used as they
are. All log-likelihood quantities are in nats unless a name says bits.

``discretized_gaussian_log_prob`` (the decoder L_0, Eq. 13) is re-exported for compatibility; the
home is ``dgmlib.dequantization``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgmlib.device import module_device, module_dtype, randn, value_checks
from dgmlib.dequantization import check_levels, discretized_gaussian_log_prob

__all__ = [
    "NoiseSchedule", "q_mean_variance", "q_sample", "q_posterior_mean_variance", "predict_x0_from_eps",
    "predict_eps_from_x0", "normal_kl", "discretized_gaussian_log_prob", "levels_to_unit", "timestep_embedding",
    "TimeMLP", "UNet", "DDPM", "sliced_wasserstein", "PREDICTIONS", "VARIANCES", "VARIANCE_MODES", "T_SAMPLINGS",
    "SCHEDULES", "HYBRID_LAMBDA", "HISTORY_PER_TERM", "UNIFORM_MIX",
]

PREDICTIONS = ("eps", "x0")
"""What the network predicts: the noise ε (the slides, Algorithm 1) or the clean data x_0."""
VARIANCES = ("beta", "beta_tilde", "learned")
"""The reverse-process variance σ_t² of Algorithm 2: β_t or β̃_t, or the network's own (Nichol & Dhariwal
Eq. 15; only for a ``DDPM(..., variance="learned")``).

Ho et al. (Sec. 3.2) call them the two extremes: σ_t² = β_t is optimal for x_0 ~ N(0, I), and
σ_t² = β̃_t for x_0 deterministically set to one point; they correspond to upper and lower bounds on
the reverse-process entropy for data with coordinatewise unit variance. They are not equivalent: for
N(0, 1) data with T = 1000, β̃_t costs about 0.47 nats per dimension more in the bound (a test
checks it). On images both gave similar samples in the paper."""
VARIANCE_MODES = ("fixed", "learned")
"""``DDPM(variance=...)``: σ_t² fixed by the schedule (Ho et al.), or learned per dimension as an
interpolation between log β_t and log β̃_t (Nichol & Dhariwal 2021, Sec. 3.1, Eq. 15)."""
T_SAMPLINGS = ("uniform", "importance")
"""``DDPM(t_sampling=...)``: t ~ U{1..T}, or importance sampling of t for L_vlb (Nichol & Dhariwal 2021,
Sec. 3.3, Eq. 18)."""
SCHEDULES = ("linear", "cosine")
"""The named schedules of ``NoiseSchedule.from_name``: Ho et al.'s linear one, Nichol & Dhariwal's cosine one."""
HYBRID_LAMBDA = 0.001
"""λ of L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal 2021, Eq. 16 and Sec. 3.1)."""
HISTORY_PER_TERM = 10
"""How many recent values of each L_t importance sampling keeps (Nichol & Dhariwal 2021, Sec. 3.3)."""
UNIFORM_MIX = 1e-3
"""The share of the uniform distribution mixed into the importance-sampling probabilities, so that every
p_t stays positive (the estimate stays unbiased and every L_t keeps being measured); as improved-diffusion's
``LossSecondMomentResampler`` (``uniform_prob``). The paper's Eq. 18 does not mention it."""


class NoiseSchedule:
    """A variance schedule β_1..β_T and every quantity derived from it, in float64.

    Attributes (each a float64 tensor ``(T,)``, 0-based: entry ``t - 1`` belongs to step t):
        betas (β_t), log_betas (log β_t), alphas (α_t = 1 - β_t), alpha_bar (ᾱ_t), alpha_bar_prev (ᾱ_{t-1}, with ᾱ_0 = 1),
        posterior_variance (β̃_t; β̃_1 = 0), posterior_log_variance_clipped (log β̃_t with β̃_1
        replaced by β̃_2, finite), posterior_mean_coef1 and posterior_mean_coef2 (μ̃_t = coef1 x_0 + coef2 x_t,
        Ho et al. Eq. 7).

    Raises:
        ValueError: if β is not a 1-D sequence of finite values in (0, 1).
    """

    def __init__(self, betas: Tensor | Sequence[float]) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().clone()
        if betas.dim() != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a 1-D sequence of T >= 1 values, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or not ((betas > 0) & (betas < 1)).all():
            bad = betas[~(torch.isfinite(betas) & (betas > 0) & (betas < 1))][:3].tolist()
            raise ValueError(f"every beta_t must lie strictly between 0 and 1, got {bad}")
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([betas.new_ones(1), self.alpha_bar[:-1]])
        self.posterior_variance = betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if len(betas) > 1 else betas
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_mean_coef1 = betas * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_mean_coef2 = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)
        self._cast: dict[tuple, tuple[Tensor, Tensor]] = {}  # (array, device, dtype) -> (array, cast copy), for at()

    @property
    def T(self) -> int:  # noqa: N802 - the paper's name
        """The number of diffusion steps."""
        return len(self.betas)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """β_t linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4), scaled by 1000 / T.

        The scaling keeps ᾱ_T near 0 for T < 1000 (as improved-diffusion does); for T = 1000 it is the
        paper's schedule. With the default endpoints T must exceed 20 (β_T = 20 / T < 1).
        Raises ``ValueError`` for ``T < 1`` or betas outside (0, 1).
        """
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive integer, got {T!r}")
        scale = 1000 / T
        return cls(torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """ᾱ_t = f(t)/f(0), f(t) = cos²(π/2 (t/T + s)/(1 + s)); β_t = min(1 - ᾱ_t/ᾱ_{t-1}, max_beta).

        Nichol & Dhariwal 2021, Eq. 17. Raises ``ValueError`` for ``T < 1``.
        """
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive integer, got {T!r}")
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return cls((1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta))

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> NoiseSchedule:
        """The schedule called ``name`` (one of ``SCHEDULES``) with the defaults of ``linear`` or ``cosine``.

        Raises:
            ValueError: for an unknown name, or as ``linear``/``cosine`` do for a bad ``T``.
        """
        if name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
        return cls.linear(T) if name == "linear" else cls.cosine(T)

    def check_t(self, t: Tensor, batch: int | None = None) -> None:
        """Check timesteps: an integer tensor ``(B,)`` with values in {1..T}.

        Raises:
            TypeError: for a non-integer tensor. ValueError: for a wrong shape or values outside 1..T.
        """
        if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"t must be an integer tensor of timesteps in 1..T, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.dim() != 1 or (batch is not None and len(t) != batch):
            raise ValueError(f"t must have shape ({'B' if batch is None else batch},), got {tuple(t.shape)}")
        if value_checks(t) and len(t) and (t.min() < 1 or t.max() > self.T):
            raise ValueError(f"timesteps run from 1 to T = {self.T} (t = 0 is the data), "
                             f"got values in [{int(t.min())}, {int(t.max())}]")

    def at(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``values[t - 1]`` cast to ``like``'s dtype, shaped ``(B, 1, ..., 1)`` to broadcast against ``like``."""
        key = (id(values), like.device, like.dtype)
        if key not in self._cast or self._cast[key][0] is not values:
            # Cast at use (float64 -> like's dtype, on the CPU), then moved once per device and dtype.
            self._cast[key] = (values, values.to(like.dtype).to(like.device))
        return self._cast[key][1][t - 1].reshape(-1, *([1] * (like.dim() - 1)))


def _check_x(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__} (scale levels with levels_to_unit)")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch (B, ...), got shape {tuple(x.shape)}")
    if value_checks(x) and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def q_mean_variance(schedule: NoiseSchedule, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``sqrt(ᾱ_t) x0`` and variance ``1 - ᾱ_t`` of q(x_t | x_0) (Ho et al. Eq. 4).

    Shapes: ``x0`` ``(B, ...)``, ``t`` ``(B,)`` in 1..T; the mean is ``(B, ...)``, the variance ``(B, 1, ...)``.
    Raises ``TypeError``/``ValueError`` for bad ``x0`` or ``t``.
    """
    _check_x(x0, "x0")
    schedule.check_t(t, len(x0))
    alpha_bar = schedule.at(schedule.alpha_bar, t, x0)
    return alpha_bar.sqrt() * x0, 1.0 - alpha_bar


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    r"""Draw :math:`x_t \sim q(x_t \mid x_0)` in one step (Ho et al. Eq. 4):
    :math:`x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon`.

    Args:
        x0: clean data ``(B, ...)``.
        t: timesteps ``(B,)`` in 1..T.
        noise: ε, shaped like ``x0``; drawn from N(0, I) (with ``generator``) when None.

    Returns:
        x_t, shaped like ``x0``.

    Raises:
        TypeError/ValueError: for bad ``x0``, ``t`` or a ``noise`` of another shape.
    """
    mean, var = q_mean_variance(schedule, x0, t)
    if noise is None:
        noise = randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must be shaped like x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    return mean + var.sqrt() * noise


def q_posterior_mean_variance(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor,
                              t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""The forward-process posterior :math:`q(x_{t-1} \mid x_t, x_0) = \mathcal{N}(\tilde\mu_t, \tilde\beta_t I)`
    (Ho et al. Eq. 6-7):

    .. math::

        \tilde\mu_t = \frac{\beta_t \sqrt{\bar\alpha_{t-1}}}{1 - \bar\alpha_t}\, x_0
            + \frac{(1 - \bar\alpha_{t-1}) \sqrt{\alpha_t}}{1 - \bar\alpha_t}\, x_t, \qquad
        \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\, \beta_t.

    Returns:
        ``(mean, variance, log_variance)``: the mean shaped like ``x0``; the variance and the clipped
        log-variance (β̃_1 = 0 is replaced by β̃_2 in the log) shaped ``(B, 1, ...)``.

    Raises:
        TypeError/ValueError: for bad inputs or ``x0`` and ``x_t`` of different shapes.
    """
    _check_x(x0, "x0")
    _check_x(x_t, "x_t")
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 and x_t must have the same shape, got {tuple(x0.shape)} and {tuple(x_t.shape)}")
    schedule.check_t(t, len(x0))
    mean = schedule.at(schedule.posterior_mean_coef1, t, x0) * x0 + schedule.at(schedule.posterior_mean_coef2, t, x0) * x_t
    return (mean, schedule.at(schedule.posterior_variance, t, x0),
            schedule.at(schedule.posterior_log_variance_clipped, t, x0))


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Invert Eq. 4 for x_0: ``(x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)``, shaped like ``x_t``."""
    alpha_bar = schedule.at(schedule.alpha_bar, t, x_t)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """Invert Eq. 4 for ε: ``(x_t - sqrt(ᾱ_t) x0) / sqrt(1 - ᾱ_t)``, shaped like ``x_t``."""
    alpha_bar = schedule.at(schedule.alpha_bar, t, x_t)
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) in nats (broadcast shape)."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def levels_to_unit(y: Tensor, num_levels: int) -> Tensor:
    """Map integer levels {0..K-1} to [-1, 1]: ``2 y / (K - 1) - 1`` (float32). Raises for invalid levels."""
    check_levels(y, num_levels)
    return y.float() * (2.0 / (num_levels - 1)) - 1.0


# --------------------------------------------------------------------------- networks


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of timesteps ``(B,)`` to ``(B, dim)`` (Vaswani et al. 2017; DDPM Sec. 4)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class TimeMLP(nn.Module):
    """ε_θ(x_t, t) for 2D data: an MLP on ``[x_t, embedding(t)]``, ``(B, D) -> (B, D_out)``.

    ``out_dim`` (default ``dim``) is ``2 * dim`` for a ``DDPM`` with learned variances (ε and v).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, num_layers: int = 3, emb_dim: int = 32,
                 out_dim: int | None = None) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        layers: list[nn.Module] = []
        width = dim + emb_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim if out_dim is None else out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x`` ``(B, D)``, ``t`` ``(B,)`` in 1..T; returns ``(B, D_out)`` (``D_out = out_dim``, default D)."""
        return self.net(torch.cat([x, timestep_embedding(t, self.emb_dim)], dim=1))


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]  # (B, C, 1, 1): the time conditions every pixel
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small U-Net ε_θ(x_t, t) for images ``(B, C, H, W) -> (B, C, H, W)``, H and W even.

    One down-sampling level (8×8 -> 4×4 for the digits, 28×28 -> 14×14 for MNIST), residual blocks
    with GroupNorm and SiLU, the sinusoidal time embedding added in every block, and a skip
    connection across the bottleneck (Ronneberger et al. 2015; the DDPM architecture, Ho et al. App. B,
    much reduced).

    ``in_channels`` (default ``channels``) lets the input carry extra feature maps, e.g. VDM's Fourier
    features (``dgmlib.score.fourier_features``); the output always has ``channels``. A ``DDPM`` with
    learned variances needs ``UNet(2 * C, base, in_channels=C)``: ε and v for each of the C input channels.

    ``num_classes`` makes it class-conditional: a learned embedding of the label (``num_classes + 1`` rows,
    the last one the "no label" token ∅ of classifier-free guidance, Ho & Salimans 2022) is added to the
    time embedding; ``forward(x, t, labels)`` with ``labels`` ``(B,)`` in 0..num_classes (num_classes = ∅),
    or None for ∅.

    Raises:
        ValueError: for odd image sizes, or labels given to an unconditional U-Net (in ``forward``).
    """

    def __init__(self, channels: int = 1, base: int = 32, emb_dim: int = 64, in_channels: int | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.emb_dim, self.num_classes = emb_dim, num_classes
        self.time = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(channels if in_channels is None else in_channels, base, 3, padding=1)
        self.down1 = _ResBlock(base, base, emb_dim)
        self.downsample = nn.Conv2d(base, base, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(base, 2 * base, emb_dim)
        self.mid2 = _ResBlock(2 * base, 2 * base, emb_dim)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = _ResBlock(3 * base, base, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, base), nn.SiLU(), nn.Conv2d(base, channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """``x`` ``(B, C_in, H, W)``, ``t`` ``(B,)`` in 1..T (any real value embeds), ``labels`` ``(B,)`` int64
        (class-conditional U-Net only; None: ∅); returns ``(B, C, H, W)``."""
        if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"UNet needs (B, C, H, W) with even H and W, got {tuple(x.shape)}")
        emb = self.time(timestep_embedding(t, self.emb_dim))
        if self.label is not None:
            if labels is None:
                labels = torch.full((len(x),), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label(labels)  # (B, emb_dim): the label conditions every block, as the time does
        elif labels is not None:
            raise ValueError("labels given to an unconditional UNet: build it with num_classes")
        h1 = self.down1(self.conv_in(x), emb)  # (B, base, H, W)
        h = self.mid2(self.mid1(self.downsample(h1), emb), emb)  # (B, 2 base, H/2, W/2)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), emb)  # (B, base, H, W)
        return self.out(h)


# --------------------------------------------------------------------------- the model


class DDPM(nn.Module):
    """A DDPM: a network ``net(x_t, t)`` predicting ε or x_0 (and v, with learned variances), a
    ``NoiseSchedule`` and the event shape.

    * ``training_loss(batch)``: the training objective per example ``(B,)`` at random timesteps, set by
      the options (see its docstring): L_simple (Ho et al. Eq. 14, Algorithm 1) by default, L_hybrid
      (Nichol & Dhariwal Eq. 16) with ``variance="learned"``, the importance-sampled L_vlb (Sec. 3.3)
      with ``t_sampling="importance"``.
    * ``p_sample`` / ``sample``: Algorithm 2 with σ_t² = β_t, β̃_t or the learned Σ_θ; ``ddim_sample``: DDIM
      (it uses ε only, whatever the variances).
    * ``vlb_term``: one term L_{t-1} of the bound per example, in nats, under the model's variances.
    * ``bound_terms`` / ``nll``: the variational bound on -log P(y) in nats for images of integer
      levels (``num_levels`` set), with a discretized Gaussian decoder L_0.
    * ``t_probabilities`` / ``update_loss_history``: the sampler of t for ``t_sampling="importance"``;
      its state is two buffers (they move with ``.to`` and are saved in the ``state_dict``):
      ``loss_history`` ``(T, HISTORY_PER_TERM)``, the last values of each L_{t-1} in nats, and
      ``loss_count`` ``(T,)`` (int64), how many values of each were recorded so far. A uniform-t model
      has neither, so its ``state_dict`` is as before.

    Image batches for ``training_loss`` are integer levels ``(B, C, H, W)`` when ``num_levels`` is set
    (scaled to [-1, 1] inside); 2D batches are the points themselves.

    Args:
        net: ``net(x_t, t)``, ``(B, *event_shape)`` and ``(B,)`` to ``(B, *event_shape)``, or, with
            ``variance="learned"``, to twice the channels (dim 1): the prediction, then v
            (``UNet(2 * C, base, in_channels=C)``, ``TimeMLP(D, out_dim=2 * D)``).
        schedule: the β_t; event_shape: the shape of one example; prediction: one of ``PREDICTIONS``;
        num_levels: K for images of integer levels, None for continuous (2D) data.
        variance: one of ``VARIANCE_MODES``: ``"fixed"`` (Ho et al.) or ``"learned"`` (Nichol & Dhariwal Eq. 15).
        t_sampling: one of ``T_SAMPLINGS``: ``"uniform"`` or ``"importance"`` (Nichol & Dhariwal Eq. 18).

    Raises:
        ValueError: for an unknown prediction target, variance mode or t_sampling, naming it.
        TypeError: if ``schedule`` is not a ``NoiseSchedule``.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, event_shape: Sequence[int],
                 prediction: str = "eps", num_levels: int | None = None, variance: str = "fixed",
                 t_sampling: str = "uniform") -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if variance not in VARIANCE_MODES:
            raise ValueError(f"variance must be one of {', '.join(VARIANCE_MODES)}, got {variance!r}")
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {', '.join(T_SAMPLINGS)}, got {t_sampling!r}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.event_shape, self.num_levels = tuple(event_shape), num_levels
        self.variance, self.t_sampling = variance, t_sampling
        if t_sampling == "importance":
            device = module_device(net)
            self.register_buffer("loss_history", torch.zeros(schedule.T, HISTORY_PER_TERM, device=device))
            self.register_buffer("loss_count", torch.zeros(schedule.T, dtype=torch.long, device=device))

    # ------------------------------------------------------------------ data and the network
    def to_unit(self, batch: Tensor) -> Tensor:
        """Levels to [-1, 1] for image models; 2D points unchanged. Shape ``(B, *event_shape)``."""
        x0 = levels_to_unit(batch, self.num_levels) if self.num_levels is not None else batch
        if tuple(x0.shape[1:]) != self.event_shape:
            raise ValueError(f"batch must have shape (B, {', '.join(map(str, self.event_shape))}), got {tuple(batch.shape)}")
        return x0

    def _forward(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """The network's prediction (ε or x_0) and v (None for fixed variances), each shaped like ``x_t``."""
        out = self.net(x_t, t)
        if self.variance == "fixed":
            return out, None
        if out.dim() != x_t.dim() or out.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(f"with variance='learned' the network must output twice the channels of x_t "
                             f"{tuple(x_t.shape)} along dim 1 (the prediction, then v), got {tuple(out.shape)}")
        prediction, v = torch.chunk(out, 2, dim=1)
        return prediction, v

    def _eps_x0(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        if self.prediction == "eps":
            return prediction, predict_x0_from_eps(self.schedule, x_t, t, prediction)
        return predict_eps_from_x0(self.schedule, x_t, t, prediction), prediction

    def predict_eps_x0(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The network's ε̂ and x̂_0 at ``(x_t, t)``, both shaped like ``x_t`` (with learned variances,
        from the first half of its output; v is dropped).

        Raises:
            ValueError: if a learned-variance network does not output twice the channels.
        """
        return self._eps_x0(x_t, t, self._forward(x_t, t)[0])

    def learned_log_variance(self, t: Tensor, v: Tensor) -> Tensor:
        r"""The learned log-variance :math:`\log\Sigma_\theta = v \log\beta_t + (1 - v) \log\tilde\beta_t`
        (Nichol & Dhariwal 2021, Sec. 3.1, Eq. 15), elementwise, shaped like ``v``.

        log β̃_t is the clipped one (β̃_1 = 0 replaced by β̃_2, ``posterior_log_variance_clipped``), so
        it is finite at t = 1. v = 1 gives β_t, v = 0 gives β̃_t; v is not constrained (the paper applies
        no constraint). The reference code (improved-diffusion) feeds (v + 1)/2 instead of v, with the
        network's output v in about [-1, 1]; here v is the paper's, so an untrained network (v ≈ 0)
        starts near β̃_t.

        Args:
            t: timesteps ``(B,)`` in 1..T; v: the network's second half ``(B, ...)``.
        """
        log_beta = self.schedule.at(self.schedule.log_betas, t, v)
        log_beta_tilde = self.schedule.at(self.schedule.posterior_log_variance_clipped, t, v)
        return v * log_beta + (1 - v) * log_beta_tilde

    def _resolve_variance(self, variance: str | None) -> str:
        if variance is None:
            return "learned" if self.variance == "learned" else "beta"
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
        if variance == "learned" and self.variance != "learned":
            raise ValueError("variance 'learned' needs a DDPM built with variance='learned'")
        return variance

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: Tensor, t: Tensor | None = None) -> Tensor:
        r"""The training objective per example, ``(B,)``, at x_t ~ q(x_t | x_0), ε ~ N(0, I), and t drawn
        as ``t_sampling`` says (or the given ``t``). Which objective depends on the model's options:

        * fixed variances, uniform t (the default): L_simple (Ho et al. Eq. 14, Algorithm 1), the mean over
          dimensions of :math:`(\epsilon - \epsilon_\theta(x_t, t))^2` (or of :math:`(x_0 - \hat x_0)^2`),
          :math:`t \sim U\{1, \dots, T\}`. Not a likelihood: a reweighted bound with the weights dropped
          (the lecture derives it).
        * learned variances, uniform t: L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal Eq. 16,
          λ = ``HYBRID_LAMBDA`` = 0.001). L_vlb = T · L_{t-1} (``vlb_term``) is the one-sample estimate of
          :math:`\sum_{t=1}^{T} L_{t-1}`, computed with a stop-gradient on the prediction (ε or x_0), so that
          it trains only v (Sec. 3.1) and L_simple alone trains the mean. As in the paper's code
          (improved-diffusion, ``LossType.RESCALED_MSE``), L_vlb enters in bits per dimension,
          T L_{t-1} / (D ln 2), a mean over the D dimensions like L_simple.
        * importance sampling of t (either variance): the importance-weighted L_vlb alone,
          :math:`L_{t-1} / p_t` in nats per example with :math:`t \sim p` (``t_probabilities``, Eq. 18):
          :math:`E_{t \sim p}[L_{t-1} / p_t] = \sum_{t=1}^{T} L_{t-1}`, an unbiased estimate of the bound
          without its constant L_T (no parameters; ``bound_terms`` has it). The paper found importance
          sampling helps only the L_vlb objective, so it is not combined with L_hybrid here. The gradient
          reaches the mean, and v when learned: with fixed variances (β̃_t in the KL terms, β_1 in L_0, as
          ``bound_terms``) this trains the mean on the bound's own weights instead of L_simple's. In
          training mode (``self.training``) each drawn L_{t-1} goes into the history
          (``update_loss_history``); evaluation leaves the sampler as it is.

        L_{t-1} at t = 1 is the decoder L_0: discretized Gaussian for images, the Gaussian
        :math:`-\log \mathcal{N}(x_0; \mu_\theta(x_1, 1), \sigma_1^2)` (a density, in nats) for 2D data.

        Args:
            batch: integer levels ``(B, C, H, W)`` for image models, else points ``(B, *event_shape)``.
            t: timesteps ``(B,)`` in 1..T to use instead of drawing them (ε is still drawn); with importance
                sampling they are weighted by 1/p_t of the current probabilities.

        Returns:
            ``(B,)``: L_simple, L_hybrid (both dimensionless means over dimensions) or L_vlb / p_t (nats).

        Raises:
            TypeError/ValueError: for a bad batch or ``t``; ValueError if a learned-variance network does
            not output twice the channels.
        """
        x0 = self.to_unit(batch)
        importance = self.t_sampling == "importance"
        probs = self.t_probabilities().to(x0.device) if importance else None
        if t is None:
            if probs is not None:  # torch.multinomial on the data's device, from the global (seeded) stream
                t = torch.multinomial(probs, len(x0), replacement=True) + 1
            else:
                t = torch.randint(1, self.schedule.T + 1, (len(x0),), device=x0.device)
        else:
            self.schedule.check_t(t, len(x0))
        noise = torch.randn_like(x0)
        x_t = q_sample(self.schedule, x0, t, noise)
        prediction, v = self._forward(x_t, t)
        if probs is not None:
            terms = self._vlb_terms(batch, x0, x_t, t, prediction, v)
            if self.training:
                self.update_loss_history(t, terms.detach())
            return terms / probs[t - 1].to(terms.dtype)
        target = noise if self.prediction == "eps" else x0
        simple = (prediction - target).pow(2).flatten(1).mean(1)
        if self.variance == "fixed":
            return simple
        vlb = self.schedule.T * self._vlb_terms(batch, x0, x_t, t, prediction.detach(), v)  # stop-gradient on the mean
        return simple + HYBRID_LAMBDA * vlb / (math.prod(self.event_shape) * math.log(2))

    def vlb_term(self, batch: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        r"""One term of the variational bound per example, in nats, ``(B,)``, under the model's variances,
        at one :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1 - \bar\alpha_t} \epsilon` (Ho et al. Eq. 5;
        Nichol & Dhariwal Eq. 4-6):

        * t ≥ 2: :math:`L_{t-1} = \mathrm{KL}(q(x_{t-1} \mid x_t, x_0) \,\|\, p_\theta(x_{t-1} \mid x_t))`,
          summed over dimensions; σ_t² is the learned Σ_θ (Eq. 15), or β̃_t for fixed variances (as
          ``bound_terms``);
        * t = 1: :math:`L_0 = -\log p_\theta(x_0 \mid x_1)`, with the mean μ_θ(x_1, 1) (x̂_0 unclipped) and
          the variance Σ_θ or β_1: the discretized Gaussian over the K levels for images (Ho et al. Eq. 13),
          the Gaussian density for continuous (2D) data (a differential term: it may be negative).

        It keeps the gradient (no stop-gradient). Summed over t = 1..T, with L_T, it is ``bound_terms``' total.

        Args:
            batch: integer levels or points, as ``training_loss``; t: timesteps ``(B,)`` in 1..T;
            noise: ε shaped like the data, drawn from the global stream when None.

        Raises:
            TypeError/ValueError: for a bad batch, ``t`` or ``noise``.
        """
        x0 = self.to_unit(batch)
        self.schedule.check_t(t, len(x0))
        x_t = q_sample(self.schedule, x0, t, noise)
        return self._vlb_terms(batch, x0, x_t, t, *self._forward(x_t, t))

    def _vlb_terms(self, batch: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, prediction: Tensor,
                   v: Tensor | None) -> Tensor:
        """L_{t-1} per example ``(B,)`` in nats from the network's output (``vlb_term``); both branches are
        computed for every example and the one of its t kept, so every intermediate must stay finite."""
        _, x0_hat = self._eps_x0(x_t, t, prediction)
        mean, _, _ = q_posterior_mean_variance(self.schedule, x0_hat, x_t, t)
        true_mean, _, true_log_var = q_posterior_mean_variance(self.schedule, x0, x_t, t)
        if v is not None:
            kl_log_var = decoder_log_var = self.learned_log_variance(t, v)
        else:  # clipped: finite at t = 1, whose KL is computed and dropped (an infinite one would give NaN gradients)
            kl_log_var = self.schedule.at(self.schedule.posterior_log_variance_clipped, t, x0).expand_as(x0)
            decoder_log_var = self.schedule.at(self.schedule.log_betas, t, x0).expand_as(x0)
        dims = tuple(range(1, x0.dim()))
        kl = normal_kl(true_mean, true_log_var.expand_as(x0), mean, kl_log_var).sum(dims)
        if self.num_levels is not None:
            decoder = -discretized_gaussian_log_prob(batch, mean, 0.5 * decoder_log_var, self.num_levels).sum(dims)
        else:
            decoder = 0.5 * (math.log(2 * math.pi) + decoder_log_var
                             + (x0 - mean) ** 2 * torch.exp(-decoder_log_var)).sum(dims)
        return torch.where(t == 1, decoder, kl)

    # ------------------------------------------------------------------ importance sampling of t
    def _check_importance(self) -> None:
        if self.t_sampling != "importance":
            raise RuntimeError("this DDPM samples t uniformly and keeps no loss history: build it with "
                               "t_sampling='importance'")

    def t_probabilities(self) -> Tensor:
        r"""The distribution of t used by ``training_loss``, ``(T,)`` summing to 1 (entry t - 1 is p_t).

        Uniform (1/T) for ``t_sampling="uniform"``, and for ``"importance"`` until every t has
        ``HISTORY_PER_TERM`` recorded values; then (Nichol & Dhariwal 2021, Sec. 3.3, Eq. 18)
        :math:`p_t \propto \sqrt{E[L_{t-1}^2]}`, the root mean square of the history, mixed with
        ``UNIFORM_MIX`` of the uniform distribution so that no p_t is zero:
        :math:`p_t = (1 - u)\, w_t / \sum_s w_s + u / T`, :math:`w_t = \sqrt{\mathrm{mean}(L_{t-1}^2)}`.
        Computed on the buffers' device without reading a value (no host round trip).
        """
        T = self.schedule.T
        if self.t_sampling == "uniform":
            return torch.full((T,), 1.0 / T, device=module_device(self))
        history = self.loss_history
        w = history.pow(2).mean(1).sqrt()
        total = w.sum()
        importance = (1 - UNIFORM_MIX) * w / total.clamp_min(torch.finfo(w.dtype).tiny) + UNIFORM_MIX / T
        ready = (self.loss_count >= history.shape[1]).all() & (total > 0)
        return torch.where(ready, importance, torch.full_like(w, 1.0 / T))

    @torch.no_grad()
    def update_loss_history(self, t: Tensor, losses: Tensor) -> None:
        """Record the values ``losses`` ``(B,)`` of L_{t-1} (nats, without the 1/p_t weight), drawn at
        timesteps ``t`` ``(B,)``, in the importance sampler's history (Nichol & Dhariwal 2021, Sec. 3.3).

        Each t keeps its last ``HISTORY_PER_TERM`` values in a ring: the n-th value of t goes to
        ``loss_history[t - 1, n % HISTORY_PER_TERM]``, and ``loss_count[t - 1]`` counts every value recorded.
        Examples of one t in a batch are recorded in batch order (of more than ``HISTORY_PER_TERM``, the
        last ones stay); non-finite values are skipped. No value is read (no host round trip).
        ``training_loss`` calls it in training mode.

        Raises:
            RuntimeError: for a model with uniform t (it has no history).
            TypeError/ValueError: for a bad ``t``, or ``losses`` not shaped ``(B,)``.
        """
        self._check_importance()
        if not isinstance(losses, Tensor) or losses.shape != (len(t),):
            raise ValueError(f"losses must have shape ({len(t)},), one per timestep, got "
                             f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}")
        self.schedule.check_t(t, len(t))
        history, count = self.loss_history, self.loss_count
        T, H = history.shape
        idx = t.to(count.device).long() - 1
        values = losses.to(history)
        ok = torch.isfinite(values)
        one_hot = (idx[:, None] == torch.arange(T, device=idx.device)) & ok[:, None]  # (B, T)
        rank = one_hot.long().cumsum(0).gather(1, idx[:, None]).squeeze(1) - 1  # order among the batch's values of t
        per_t = one_hot.long().sum(0)  # (T,)
        keep = ok & (rank >= per_t[idx] - H)
        target = torch.where(keep, idx * H + (count[idx] + rank) % H, T * H)  # the rest to a scratch slot
        flat = torch.cat([history.flatten(), history.new_zeros(1)]).scatter_(0, target, values)
        history.copy_(flat[:-1].view(T, H))
        count += per_t

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, x_t: Tensor, t: Tensor, variance: str | None = None,
                        clip: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and x̂_0 of p_θ(x_{t-1} | x_t) = N(μ̃_t(x_t, x̂_0), σ_t² I).

        μ_θ is the posterior mean at the predicted x̂_0, which for ε-prediction equals Algorithm 2's
        ``(x_t - β_t/sqrt(1 - ᾱ_t) ε_θ) / sqrt(α_t)`` (Ho et al. Eq. 11). ``clip`` clamps x̂_0 to
        [-1, 1] for image models. σ_t² is one of ``VARIANCES``: β_t, β̃_t (variance ``(B, 1, ...)``) or
        the learned Σ_θ (Nichol & Dhariwal Eq. 15; shaped like ``x_t``). None (the default) is the
        model's own: the learned one if it has one, else β_t.

        Raises:
            ValueError: for an unknown ``variance``, or ``"learned"`` on a fixed-variance model.
        """
        variance = self._resolve_variance(variance)
        prediction, v = self._forward(x_t, t)
        _, x0_hat = self._eps_x0(x_t, t, prediction)
        if clip and self.num_levels is not None:
            x0_hat = x0_hat.clamp(-1, 1)
        mean, post_var, _ = q_posterior_mean_variance(self.schedule, x0_hat, x_t, t)
        if variance == "learned":
            var = self.learned_log_variance(t, v).exp()
        else:
            var = self.schedule.at(self.schedule.betas, t, x_t) if variance == "beta" else post_var
        return mean, var, x0_hat

    @torch.no_grad()
    def p_sample(self, x_t: Tensor, t: int, variance: str | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        r"""One step of Algorithm 2: :math:`x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z`, :math:`z \sim \mathcal{N}(0, I)`
        for :math:`t > 1`, :math:`z = 0` at :math:`t = 1`. σ_t² as ``p_mean_variance`` (default: the model's own).

        ``x_t`` ``(B, *event_shape)``; ``t`` one integer in 1..T. Raises ``ValueError`` for t outside 1..T
        or a bad ``variance``.
        """
        if not 1 <= int(t) <= self.schedule.T:
            raise ValueError(f"t must lie in 1..{self.schedule.T}, got {t}")
        tt = torch.full((len(x_t),), int(t), dtype=torch.long, device=x_t.device)
        mean, var, _ = self.p_mean_variance(x_t, tt, variance)
        if t == 1:
            return mean
        return mean + var.sqrt() * randn(x_t.shape, device=x_t.device, dtype=x_t.dtype, generator=generator)

    def _prior_draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        return randn((n, *self.event_shape), device=module_device(self.net), dtype=module_dtype(self.net),
                     generator=generator)

    @torch.no_grad()
    def sample(self, n: int, variance: str | None = None, generator: torch.Generator | None = None,
               keep: Sequence[int] = ()) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Algorithm 2: x_T ~ N(0, I), then T ancestral steps, σ_t² as ``p_mean_variance`` (default: the
        model's own, learned or β_t). Returns x_0 ``(n, *event_shape)`` (clamped to [-1, 1] for images);
        with ``keep``, also ``{t: x_t}`` for those timesteps (t = 0 allowed)."""
        x = self._prior_draw(n, generator)
        kept = {}
        for t in range(self.schedule.T, 0, -1):
            if t in keep:
                kept[t] = x.clone()
            x = self.p_sample(x, t, variance, generator)
        if self.num_levels is not None:
            x = x.clamp(-1, 1)
        if 0 in keep:
            kept[0] = x.clone()
        return (x, kept) if keep else x

    @torch.no_grad()
    def ddim_sample(self, n: int, steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None) -> Tensor:
        """DDIM (Song et al. 2021, Eq. 12) on ``steps`` evenly spaced timesteps τ_S > ... > τ_1:

        ``x_{τ_{i-1}} = sqrt(ᾱ_{τ_{i-1}}) x̂_0 + sqrt(1 - ᾱ_{τ_{i-1}} - σ²) ε̂ + σ z``, with
        ``σ = eta · sqrt((1 - ᾱ_{τ_{i-1}})/(1 - ᾱ_{τ_i})) sqrt(1 - ᾱ_{τ_i}/ᾱ_{τ_{i-1}})``; eta = 0 is
        deterministic, and ᾱ_{τ_0} = 1 returns x̂_0. Returns ``(n, *event_shape)``.

        Raises:
            ValueError: for ``steps`` outside 1..T or ``eta < 0``.
        """
        if not isinstance(steps, int) or not 1 <= steps <= self.schedule.T:
            raise ValueError(f"steps must be an integer in 1..T = {self.schedule.T}, got {steps!r}")
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        # From T down to 1, so that one step starts at T as it must (linspace(1, T, 1) would be [1]).
        taus = torch.linspace(self.schedule.T, 1, steps, dtype=torch.float64).round().long().unique()
        x = self._prior_draw(n, generator)
        for i in range(len(taus) - 1, -1, -1):
            t = torch.full((n,), int(taus[i]), dtype=torch.long, device=x.device)
            eps, x0_hat = self.predict_eps_x0(x, t)
            if self.num_levels is not None:
                x0_hat = x0_hat.clamp(-1, 1)
                eps = predict_eps_from_x0(self.schedule, x, t, x0_hat)
            ab = self.schedule.at(self.schedule.alpha_bar, t, x)
            ab_prev = self.schedule.at(self.schedule.alpha_bar, torch.full_like(t, int(taus[i - 1])), x) \
                if i > 0 else torch.ones_like(ab)
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            if eta > 0 and i > 0:
                x = x + sigma * randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x

    # ------------------------------------------------------------------ the bound
    @torch.no_grad()
    def bound_terms(self, y: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The variational bound on -log P(y) (Ho et al. Eq. 5) for integer levels ``y``, in nats.

        ``prior`` = L_T = KL(q(x_T | x_0) || N(0, I)); ``diffusion`` ``(B, T - 1)`` holds
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)) for t = 2..T at one x_t ~ q(x_t | x_0)
        each; ``decoder`` = L_0 = -log p_θ(y | x_1), the discretized Gaussian over the K levels with mean
        μ_θ(x_1, 1); ``total`` = their sum, ``(B,)``. The variances are the model's: σ_t² = β̃_t in the
        KL terms and β_1 in the decoder for fixed variances, the learned Σ_θ (Nichol & Dhariwal Eq. 15) in
        both for learned ones. The sum over t is exact (all T terms, no sampling of t), so the only noise
        is that of the x_t. x̂_0 is not clipped.

        Raises:
            ValueError: if the model has no ``num_levels`` (2D data have no discrete likelihood here).
        """
        if self.num_levels is None:
            raise ValueError("the bound needs discrete data: build the DDPM with num_levels")
        learned = self.variance == "learned"
        x0 = self.to_unit(y)
        B, T, dims = len(x0), self.schedule.T, tuple(range(1, x0.dim()))
        m, v = q_mean_variance(self.schedule, x0, torch.full((B,), T, dtype=torch.long, device=x0.device))
        prior = normal_kl(m, v.log().expand_as(m), torch.zeros_like(m), torch.zeros_like(m)).sum(dims)
        diffusion = x0.new_zeros(B, T - 1)
        for t in range(2, T + 1):
            tt = torch.full((B,), t, dtype=torch.long, device=x0.device)
            noise = randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
            x_t = q_sample(self.schedule, x0, tt, noise)
            true_mean, _, true_log_var = q_posterior_mean_variance(self.schedule, x0, x_t, tt)
            mean, var, _ = self.p_mean_variance(x_t, tt, "learned" if learned else "beta_tilde", clip=False)
            diffusion[:, t - 2] = normal_kl(true_mean, true_log_var.expand_as(x0), mean, var.log().expand_as(x0)).sum(dims)
        t1 = torch.ones(B, dtype=torch.long, device=x0.device)
        x_1 = q_sample(self.schedule, x0, t1, randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator))
        mean, var, _ = self.p_mean_variance(x_1, t1, "learned" if learned else "beta", clip=False)
        log_scale = 0.5 * var.log().expand_as(x0)
        decoder = -discretized_gaussian_log_prob(y, mean, log_scale, self.num_levels).sum(dims)
        return {"prior": prior, "diffusion": diffusion, "decoder": decoder,
                "total": prior + diffusion.sum(1) + decoder}

    def nll(self, y: Tensor) -> Tensor:
        """The variational bound on -log P(y) in nats per image, ``(B,)`` (``bound_terms()['total']``)."""
        return self.bound_terms(y)["total"]


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size samples ``(N, D)`` (Rabin et al. 2011).

    ``sqrt(mean_θ W_2²(θᵀx, θᵀy))`` over ``num_projections`` random unit directions θ (fixed ``seed``);
    each 1D W_2 compares sorted projections. In the data's units; 0 for identical samples.

    Raises:
        ValueError: for samples of different shapes or fewer than 2 points.
    """
    if x.shape != y.shape or x.dim() != 2 or len(x) < 2:
        raise ValueError(f"x and y must both be (N, D) with N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    theta = torch.randn(x.shape[1], num_projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = (x.detach().cpu().double() @ theta).sort(dim=0)  # a metric on samples: float64 on the CPU
    py, _ = (y.detach().cpu().double() @ theta).sort(dim=0)
    return (px - py).pow(2).mean().sqrt().item()
