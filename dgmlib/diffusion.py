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
    "TimeMLP", "UNet", "DDPM", "sliced_wasserstein", "PREDICTIONS", "VARIANCES",
]

PREDICTIONS = ("eps", "x0")
"""What the network predicts: the noise ε (the slides, Algorithm 1) or the clean data x_0."""
VARIANCES = ("beta", "beta_tilde")
"""The reverse-process variance σ_t² of Algorithm 2: β_t or β̃_t.

Ho et al. (Sec. 3.2) call them the two extremes: σ_t² = β_t is optimal for x_0 ~ N(0, I), and
σ_t² = β̃_t for x_0 deterministically set to one point; they correspond to upper and lower bounds on
the reverse-process entropy for data with coordinatewise unit variance. They are not equivalent: for
N(0, 1) data with T = 1000, β̃_t costs about 0.47 nats per dimension more in the bound (a test
checks it). On images both gave similar samples in the paper."""


class NoiseSchedule:
    """A variance schedule β_1..β_T and every quantity derived from it, in float64.

    Attributes (each a float64 tensor ``(T,)``, 0-based: entry ``t - 1`` belongs to step t):
        betas (β_t), alphas (α_t = 1 - β_t), alpha_bar (ᾱ_t), alpha_bar_prev (ᾱ_{t-1}, with ᾱ_0 = 1),
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
    """ε_θ(x_t, t) for 2D data: an MLP on ``[x_t, embedding(t)]``, ``(B, D) -> (B, D)``."""

    def __init__(self, dim: int = 2, hidden: int = 128, num_layers: int = 3, emb_dim: int = 32) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        layers: list[nn.Module] = []
        width = dim + emb_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x`` ``(B, D)``, ``t`` ``(B,)`` in 1..T; returns ``(B, D)``."""
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

    Raises:
        ValueError: for odd image sizes (in ``forward``).
    """

    def __init__(self, channels: int = 1, base: int = 32, emb_dim: int = 64) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.time = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        self.down1 = _ResBlock(base, base, emb_dim)
        self.downsample = nn.Conv2d(base, base, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(base, 2 * base, emb_dim)
        self.mid2 = _ResBlock(2 * base, 2 * base, emb_dim)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = _ResBlock(3 * base, base, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, base), nn.SiLU(), nn.Conv2d(base, channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)``, ``t`` ``(B,)`` in 1..T; returns ``(B, C, H, W)``."""
        if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"UNet needs (B, C, H, W) with even H and W, got {tuple(x.shape)}")
        emb = self.time(timestep_embedding(t, self.emb_dim))
        h1 = self.down1(self.conv_in(x), emb)  # (B, base, H, W)
        h = self.mid2(self.mid1(self.downsample(h1), emb), emb)  # (B, 2 base, H/2, W/2)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), emb)  # (B, base, H, W)
        return self.out(h)


# --------------------------------------------------------------------------- the model


class DDPM(nn.Module):
    """A DDPM: a network ``net(x_t, t)`` predicting ε or x_0, a ``NoiseSchedule`` and the event shape.

    * ``training_loss(batch)``: L_simple per example ``(B,)`` (Algorithm 1), the mean squared error
      per dimension of the ε (or x_0) prediction at a uniform random t.
    * ``p_sample`` / ``sample``: Algorithm 2 with σ_t² = β_t or β̃_t; ``ddim_sample``: DDIM.
    * ``bound_terms`` / ``nll``: the variational bound on -log P(y) in nats for images of integer
      levels (``num_levels`` set), with a discretized Gaussian decoder L_0.

    Image batches for ``training_loss`` are integer levels ``(B, C, H, W)`` when ``num_levels`` is set
    (scaled to [-1, 1] inside); 2D batches are the points themselves.

    Raises:
        ValueError: for an unknown prediction target.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, event_shape: Sequence[int],
                 prediction: str = "eps", num_levels: int | None = None) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.event_shape, self.num_levels = tuple(event_shape), num_levels

    # ------------------------------------------------------------------ data and training
    def to_unit(self, batch: Tensor) -> Tensor:
        """Levels to [-1, 1] for image models; 2D points unchanged. Shape ``(B, *event_shape)``."""
        x0 = levels_to_unit(batch, self.num_levels) if self.num_levels is not None else batch
        if tuple(x0.shape[1:]) != self.event_shape:
            raise ValueError(f"batch must have shape (B, {', '.join(map(str, self.event_shape))}), got {tuple(batch.shape)}")
        return x0

    def predict_eps_x0(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The network's ε̂ and x̂_0 at ``(x_t, t)``, both shaped like ``x_t``."""
        out = self.net(x_t, t)
        if self.prediction == "eps":
            return out, predict_x0_from_eps(self.schedule, x_t, t, out)
        return predict_eps_from_x0(self.schedule, x_t, t, out), out

    def training_loss(self, batch: Tensor) -> Tensor:
        r"""L_simple (Ho et al. Eq. 14, Algorithm 1) per example, ``(B,)``: mean over dimensions of
        :math:`(\epsilon - \epsilon_\theta(x_t, t))^2` (or of :math:`(x_0 - \hat x_0)^2`),
        :math:`t \sim U\{1, \dots, T\}`, :math:`\epsilon \sim \mathcal{N}(0, I)`.

        Not a likelihood: a reweighted bound with the weights dropped (the lecture derives it).
        """
        x0 = self.to_unit(batch)
        t = torch.randint(1, self.schedule.T + 1, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = q_sample(self.schedule, x0, t, noise)
        target = noise if self.prediction == "eps" else x0
        return (self.net(x_t, t) - target).pow(2).flatten(1).mean(1)

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, x_t: Tensor, t: Tensor, variance: str = "beta",
                        clip: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance ``(B, 1, ...)`` and x̂_0 of p_θ(x_{t-1} | x_t) = N(μ̃_t(x_t, x̂_0), σ_t² I).

        μ_θ is the posterior mean at the predicted x̂_0, which for ε-prediction equals Algorithm 2's
        ``(x_t - β_t/sqrt(1 - ᾱ_t) ε_θ) / sqrt(α_t)`` (Ho et al. Eq. 11). ``clip`` clamps x̂_0 to
        [-1, 1] for image models. σ_t² is β_t or β̃_t (``variance``).

        Raises:
            ValueError: for an unknown ``variance``.
        """
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
        _, x0_hat = self.predict_eps_x0(x_t, t)
        if clip and self.num_levels is not None:
            x0_hat = x0_hat.clamp(-1, 1)
        mean, post_var, _ = q_posterior_mean_variance(self.schedule, x0_hat, x_t, t)
        var = self.schedule.at(self.schedule.betas, t, x_t) if variance == "beta" else post_var
        return mean, var, x0_hat

    @torch.no_grad()
    def p_sample(self, x_t: Tensor, t: int, variance: str = "beta", generator: torch.Generator | None = None) -> Tensor:
        r"""One step of Algorithm 2: :math:`x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z`, :math:`z \sim \mathcal{N}(0, I)`
        for :math:`t > 1`, :math:`z = 0` at :math:`t = 1`.

        ``x_t`` ``(B, *event_shape)``; ``t`` one integer in 1..T. Raises ``ValueError`` for t outside 1..T.
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
    def sample(self, n: int, variance: str = "beta", generator: torch.Generator | None = None,
               keep: Sequence[int] = ()) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Algorithm 2: x_T ~ N(0, I), then T ancestral steps. Returns x_0 ``(n, *event_shape)``
        (clamped to [-1, 1] for images); with ``keep``, also ``{t: x_t}`` for those timesteps (t = 0 allowed)."""
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
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)) for t = 2..T (σ_t² = β̃_t) at one
        x_t ~ q(x_t | x_0) each; ``decoder`` = L_0 = -log p_θ(y | x_1), the discretized Gaussian over
        the K levels with mean μ_θ(x_1, 1) and variance β_1; ``total`` = their sum, ``(B,)``. The sum
        over t is exact (all T terms, no sampling of t), so the only noise is that of the x_t.

        Raises:
            ValueError: if the model has no ``num_levels`` (2D data have no discrete likelihood here).
        """
        if self.num_levels is None:
            raise ValueError("the bound needs discrete data: build the DDPM with num_levels")
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
            mean, var, _ = self.p_mean_variance(x_t, tt, "beta_tilde", clip=False)
            diffusion[:, t - 2] = normal_kl(true_mean, true_log_var.expand_as(x0), mean, var.log().expand_as(x0)).sum(dims)
        t1 = torch.ones(B, dtype=torch.long, device=x0.device)
        x_1 = q_sample(self.schedule, x0, t1, randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator))
        mean, _, _ = self.p_mean_variance(x_1, t1, "beta", clip=False)
        log_scale = 0.5 * self.schedule.at(self.schedule.betas, t1, x0).log().expand_as(x0)
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
