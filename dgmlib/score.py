r"""Score-based generative models (lecture 11): score matching, Langevin dynamics, score SDEs, the
probability-flow ODE and its likelihood, and Variational Diffusion Models (VDM).

A new module beside ``dgmlib.diffusion`` (which keeps DDPM, lecture 10): this one works in continuous
time t ∈ [0, 1] and with the score ∇_x log p_t(x), where ``diffusion`` works with T discrete steps and
the noise ε. The two meet in ``VPSDE.discrete_betas`` (DDPM is a discretised VP SDE) and in
``score_from_eps``.

Conventions.

* Every forward process here is linear-Gaussian: ``x_t = alpha(t) x_0 + sigma(t) ε`` with ε ~ N(0, I),
  so the networks predict ε (``eps_net(x_t, t)``) and ``score = -ε̂ / sigma(t)`` (``score_from_eps``).
* Batches are ``(B, *event_shape)``: ``(B, D)`` for 2D toys, ``(B, C, H, W)`` for images. Times are
  tensors ``(B,)`` in [0, 1]. Images of integer levels are scaled to [-1, 1] by
  ``dgmlib.diffusion.levels_to_unit``.
* Log-likelihoods are in nats; a name says when it is bits.

Sources.

* Denoising score matching: Vincent 2011, "A connection between score matching and denoising
  autoencoders", Eq. 7-11; explicit/implicit score matching: Hyvärinen 2005, Theorem 1; sliced score
  matching: Song, Garg, Shi & Ermon 2019, Eq. 7-8; Tweedie's formula: Efron 2011, Eq. 2.8.
* Langevin dynamics and annealed Langevin sampling, NCSN: Song & Ermon 2019, Eq. 4 and Algorithm 1;
  the choice of σ_1: Song & Ermon 2020, Technique 1.
* Score SDEs: Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole 2021: VE, VP and sub-VP SDEs
  (Eq. 9, 11, 12 and App. B), the reverse SDE (Eq. 6; Anderson 1982), the probability-flow ODE (Eq. 13),
  predictor-corrector sampling (Algorithms 2-5), likelihoods (App. D.2).
* VDM: Kingma, Salimans, Poole & Ho 2021: the schedule through γ(t) (Sec. 3), the discrete-time loss
  (Eq. 13-15), the continuous-time loss (Eq. 17) and its SNR form (Eq. 19), invariance to the schedule
  (Sec. 5.1), the monotone schedule network and the variance-minimising schedule objective (App. I.2),
  Fourier features (App. C), the decoder and prior terms (Sec. 3.3-3.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdiffeq import odeint

from dgmlib.cnf import CNFDynamics, TRACES, sample_noise
from dgmlib.dequantization import check_levels
from dgmlib.device import module_device, module_dtype, rand, randint, randn, value_checks
from dgmlib.diffusion import levels_to_unit
from dgmlib.flows import check_batch

__all__ = [
    "score_from_eps", "eps_from_score", "tweedie_denoise", "denoising_score_matching_loss",
    "explicit_score_matching_loss", "implicit_score_matching_loss", "sliced_score_matching_loss",
    "langevin_step", "langevin_dynamics", "geometric_sigmas", "annealed_langevin_step", "annealed_langevin_sample",
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "GammaSDE", "SDES", "make_sde", "alpha_sigma_of_gamma", "reverse_drift",
    "euler_maruyama_sample", "predictor_corrector_sample", "probability_flow_sample", "sample_sde", "ProbabilityFlow",
    "probability_flow_log_prob", "NCSN", "ScoreSDE", "fourier_features", "LinearGamma", "MonotoneGamma",
    "VDM", "SAMPLERS", "gaussian_log_prob",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score_fn(x, t) -> ∇_x log p_t(x)``: ``x`` ``(B, *event)``, ``t`` ``(B,)``; returns ``(B, *event)``."""

SDES = ("vp", "ve", "subvp")
"""The SDEs of Song et al. 2021 that ``make_sde`` builds."""

SAMPLERS = ("euler_maruyama", "predictor_corrector", "ode")
"""The samplers of a score SDE: the reverse SDE by Euler–Maruyama, with a Langevin corrector, or the
probability-flow ODE (adaptive dopri5)."""

LOG_2PI = math.log(2 * math.pi)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` to multiply a batch ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _per_example(v: Tensor | float, like: Tensor) -> Tensor | float:
    """A coefficient that is a number or ``(B,)``, ready to multiply the batch ``like``."""
    return _bcast(v, like) if isinstance(v, Tensor) and v.dim() == 1 else v


def _check_sigma(sigma: Tensor | float, name: str = "sigma") -> None:
    if isinstance(sigma, Tensor) and not value_checks(sigma):
        return
    s = sigma if isinstance(sigma, Tensor) else torch.as_tensor(sigma, device="cpu")  # not the default device
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{name} must be finite and positive, got {s.flatten()[:3].tolist()}")


def _check_t(t: Tensor, batch: int, name: str = "t") -> None:
    if not isinstance(t, Tensor) or t.shape != (batch,):
        raise ValueError(f"{name} must be a tensor of shape ({batch},), got {getattr(t, 'shape', type(t).__name__)}")


def _check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch (B, ...), got shape {tuple(x.shape)}")
    if value_checks(x) and torch.isnan(x).any():
        raise ValueError(f"{name} holds NaN")


def _sum_event(v: Tensor) -> Tensor:
    """Sum over every dimension but the batch: ``(B, ...) -> (B,)``."""
    return v.flatten(1).sum(1)


def gaussian_log_prob(x: Tensor, std: float = 1.0) -> Tensor:
    """log N(x; 0, std² I) in nats per example, ``(B, ...) -> (B,)``."""
    d = x[0].numel()
    return -0.5 * _sum_event(x ** 2) / std ** 2 - d * (math.log(std) + 0.5 * LOG_2PI)


# --------------------------------------------------------------------------- score matching


def score_from_eps(eps: Tensor, sigma: Tensor | float) -> Tensor:
    r"""The score of x_t = α x_0 + σ ε from a prediction of ε: ∇ log p_t(x_t) = -E[ε | x_t] / σ.

    ``eps`` ``(B, ...)``; ``sigma`` a float or ``(B,)`` (broadcast over the event). Vincent 2011, Eq. 11:
    the conditional score ∇ log q(x_t | x_0) = -ε / σ, whose conditional mean is the marginal score.

    Raises:
        ValueError: if ``sigma`` is not positive.
    """
    _check_sigma(sigma)
    return -eps / _per_example(sigma, eps)


def eps_from_score(score: Tensor, sigma: Tensor | float) -> Tensor:
    """The inverse of ``score_from_eps``: ε̂ = -σ ∇ log p_t(x_t), same shapes. Raises ValueError for σ ≤ 0."""
    _check_sigma(sigma)
    return -_per_example(sigma, score) * score


def tweedie_denoise(x_t: Tensor, score: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    r"""Tweedie's formula: E[x_0 | x_t] = (x_t + σ² ∇ log p_t(x_t)) / α for x_t = α x_0 + σ ε.

    ``x_t`` and ``score`` ``(B, ...)``; ``alpha`` and ``sigma`` floats or ``(B,)``. Efron 2011, Eq. 2.8
    (with α = 1); the posterior mean is the best denoiser in squared error, so a learned score is a
    learned denoiser.

    Raises:
        ValueError: if ``alpha`` or ``sigma`` is not positive, or the shapes differ.
    """
    _check_sigma(alpha, "alpha")
    _check_sigma(sigma)
    if x_t.shape != score.shape:
        raise ValueError(f"x_t and score must have the same shape, got {tuple(x_t.shape)} and {tuple(score.shape)}")
    return (x_t + _per_example(sigma, x_t) ** 2 * score) / _per_example(alpha, x_t)


def denoising_score_matching_loss(score_fn: ScoreFn, x: Tensor, sigma: Tensor, noise: Tensor | None = None,
                                  generator: torch.Generator | None = None) -> Tensor:
    r"""Denoising score matching at noise level σ, weighted by σ² (Vincent 2011; Song & Ermon 2019, Eq. 2, 5):

    .. math:: \ell(x) = \tfrac{\sigma^2}{2} \| s_\theta(\tilde x, \sigma) + \epsilon / \sigma \|^2,
              \quad \tilde x = x + \sigma \epsilon.

    Its expectation equals explicit score matching on the noisy density q_σ plus a constant that does
    not depend on θ, so its minimiser is the score of q_σ (lecture 11 derives it). The weight λ(σ) = σ²
    makes every level's loss of the same size (Song & Ermon 2019, Sec. 4.2).

    Args:
        score_fn: ``(x̃, sigma) -> score`` with ``x̃`` ``(B, ...)`` and ``sigma`` ``(B,)``.
        x: clean data ``(B, ...)``.
        sigma: noise levels ``(B,)``, positive.
        noise: ε ``(B, ...)``; drawn (with ``generator``) if None.

    Returns:
        ``(B,)``: the loss per example (sum over dimensions).

    Raises:
        TypeError / ValueError: for a non-float ``x``, NaN, bad shapes or σ ≤ 0.
    """
    _check_x(x)
    _check_t(sigma, len(x), "sigma")
    _check_sigma(sigma)
    if noise is None:
        noise = randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    elif noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    s = _bcast(sigma.to(x.dtype), x)
    x_noisy = x + s * noise
    return 0.5 * _sum_event((s * score_fn(x_noisy, sigma) + noise) ** 2)


def explicit_score_matching_loss(score: Tensor, true_score: Tensor) -> Tensor:
    r"""Explicit score matching (Hyvärinen 2005, Eq. 2): ½ ‖s_θ(x) - ∇ log p(x)‖², ``(B, ...) -> (B,)``.

    Needs the true score, so it is a reference for tests and the lecture, not a training objective.

    Raises:
        ValueError: if the shapes differ.
    """
    if score.shape != true_score.shape:
        raise ValueError(f"score and true_score must have the same shape, got {tuple(score.shape)} "
                         f"and {tuple(true_score.shape)}")
    return 0.5 * _sum_event((score - true_score) ** 2)


def implicit_score_matching_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    r"""Hyvärinen's implicit score matching, tr(∇_x s_θ(x)) + ½ ‖s_θ(x)‖², with the exact trace.

    Equals the explicit loss minus ½ ‖∇ log p(x)‖² in expectation (Hyvärinen 2005, Theorem 1;
    integration by parts). ``score_fn(x)`` maps ``(B, D) -> (B, D)``; returns ``(B,)``. D backward passes.

    Raises:
        ValueError: if ``x`` is not ``(B, D)``.
    """
    _check_x(x)
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D) for the exact trace, got {tuple(x.shape)}")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        s = score_fn(x)
        trace = x.new_zeros(len(x))
        for i in range(x.shape[1]):
            trace = trace + torch.autograd.grad(s[:, i].sum(), x, create_graph=True)[0][:, i]
    return trace + 0.5 * (s ** 2).sum(1)


def sliced_score_matching_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, num_projections: int = 1,
                               variance_reduced: bool = False, generator: torch.Generator | None = None) -> Tensor:
    r"""Sliced score matching (Song, Garg, Shi & Ermon 2019, Eq. 7-8), per example ``(B,)``:

    .. math:: \mathbb{E}_v\big[ v^\top \nabla_x (v^\top s_\theta(x)) + \tfrac12 (v^\top s_\theta(x))^2 \big],

    with v ~ N(0, I), ``num_projections`` of them per example; ``variance_reduced`` replaces
    ½ (vᵀs)² by its expectation ½ ‖s‖² (SSM-VR, Eq. 9). Since E[vᵀAv] = tr(A), its expectation is the
    implicit loss, which is the explicit one minus a constant. One backward pass per projection,
    whatever D.

    Args:
        score_fn: ``(B, ...) -> (B, ...)``.
        x: data ``(B, ...)``.

    Raises:
        ValueError: for ``num_projections < 1`` or bad ``x``.
    """
    _check_x(x)
    if not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be a positive integer, got {num_projections!r}")
    total = x.new_zeros(len(x))
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        s = score_fn(x)
        for _ in range(num_projections):
            v = randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            vs = _sum_event(v * s)  # (B,)
            grad = torch.autograd.grad(vs.sum(), x, create_graph=True)[0]
            second = 0.5 * _sum_event(s ** 2) if variance_reduced else 0.5 * vs ** 2
            total = total + _sum_event(v * grad) + second
    return total / num_projections


# --------------------------------------------------------------------------- Langevin dynamics


def langevin_step(score: Tensor, x: Tensor, step_size: float, noise: Tensor) -> Tensor:
    r"""One step of Langevin dynamics (Song & Ermon 2019, Eq. 4):
    x' = x + (ε/2) ∇ log p(x) + √ε z, with z ~ N(0, I).

    ``score``, ``x`` and ``noise`` ``(B, ...)``; returns ``(B, ...)``. As ε → 0 and the number of steps
    → ∞, x is distributed as p (the Euler–Maruyama step of the Langevin diffusion, whose stationary
    law is p).

    Raises:
        ValueError: for a step size that is not positive or mismatched shapes.
    """
    _check_sigma(step_size, "step_size")
    if not (score.shape == x.shape == noise.shape):
        raise ValueError(f"score, x and noise must have one shape, got {tuple(score.shape)}, "
                         f"{tuple(x.shape)}, {tuple(noise.shape)}")
    return x + 0.5 * step_size * score + math.sqrt(step_size) * noise


def langevin_dynamics(score_fn: Callable[[Tensor], Tensor], x: Tensor, step_size: float, num_steps: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """``num_steps`` Langevin steps from ``x`` ``(B, ...)`` with ``score_fn(x) -> (B, ...)``; returns the last ``x``.

    Raises:
        ValueError: for a bad step size or number of steps.
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    for _ in range(num_steps):
        x = langevin_step(score_fn(x), x, step_size, randn(x.shape, device=x.device, dtype=x.dtype, generator=generator))
    return x


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> Tensor:
    """Noise levels σ_1 > ... > σ_L in geometric progression (Song & Ermon 2019, Sec. 4.2), float64 ``(L,)``.

    Raises:
        ValueError: unless ``sigma_max > sigma_min > 0`` and ``num_levels >= 2``.
    """
    if not (sigma_max > sigma_min > 0) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"need sigma_max > sigma_min > 0 and num_levels >= 2, got {sigma_max}, {sigma_min}, {num_levels}")
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), num_levels, dtype=torch.float64, device="cpu")


def _host_sigmas(sigmas: Tensor | Sequence[float], min_levels: int = 1) -> Tensor:
    """Noise levels as float64 on the host (never the default device, which may be a GPU or ``meta``).

    Raises:
        ValueError: unless they are at least ``min_levels`` positive, strictly decreasing numbers.
    """
    sigmas = (sigmas.detach().to("cpu", torch.float64) if isinstance(sigmas, Tensor)
              else torch.tensor(list(sigmas), dtype=torch.float64, device="cpu"))
    if sigmas.dim() != 1 or len(sigmas) < min_levels or (sigmas <= 0).any() or (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f"sigmas must be at least {min_levels} positive, strictly decreasing noise levels")
    return sigmas


def annealed_langevin_step(score: Tensor, x: Tensor, sigma: float, sigma_min: float, epsilon: float,
                           noise: Tensor) -> Tensor:
    r"""One step of annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1, lines 3-6):
    α_i = ε σ_i² / σ_L², then x' = x + (α_i / 2) s_θ(x, σ_i) + √α_i z.

    The step size scales with σ_i² so that the "signal-to-noise" of every step is the same at every
    level (the paper's Sec. 4.3). ``score``, ``x``, ``noise`` ``(B, ...)``; returns ``(B, ...)``.

    Raises:
        ValueError: for a non-positive σ, σ_L or ε, or mismatched shapes.
    """
    _check_sigma(sigma)
    _check_sigma(sigma_min, "sigma_min")
    _check_sigma(epsilon, "epsilon")
    return langevin_step(score, x, epsilon * sigma ** 2 / sigma_min ** 2, noise)


@torch.no_grad()
def annealed_langevin_sample(score_fn: ScoreFn, x: Tensor, sigmas: Tensor, epsilon: float = 2e-5,
                             steps_per_level: int = 100, denoise: bool = True,
                             generator: torch.Generator | None = None) -> Tensor:
    r"""Annealed Langevin sampling (Song & Ermon 2019, Algorithm 1) from ``x`` ``(B, ...)``.

    For each level σ_1 > ... > σ_L, ``steps_per_level`` steps of ``annealed_langevin_step`` with
    ``score_fn(x, sigma (B,))``. With ``denoise``, one last Tweedie step x + σ_L² s(x, σ_L) removes the
    noise of the last level (Song & Ermon 2020, "denoising"). Returns ``(B, ...)``.

    Raises:
        ValueError: for bad ``sigmas`` (not decreasing and positive) or step counts.
    """
    sigmas = _host_sigmas(sigmas)
    if not isinstance(steps_per_level, int) or steps_per_level < 1:
        raise ValueError(f"steps_per_level must be a positive integer, got {steps_per_level!r}")
    sigma_min = float(sigmas[-1])
    for sigma in sigmas.tolist():
        s = x.new_full((len(x),), sigma)
        for _ in range(steps_per_level):
            noise = randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x = annealed_langevin_step(score_fn(x, s), x, sigma, sigma_min, epsilon, noise)
    if denoise:
        x = x + sigma_min ** 2 * score_fn(x, x.new_full((len(x),), sigma_min))
    return x


# --------------------------------------------------------------------------- SDEs


class SDE:
    r"""A linear forward SDE dx = f(t) x dt + g(t) dw on t ∈ [0, 1], with its Gaussian marginals.

    Subclasses give ``alpha_sigma(t)`` (x_t = α(t) x_0 + σ(t) ε, each ``(B,)``) and ``f_g2(t)`` (the
    drift coefficient f(t) and the squared diffusion g(t)², each ``(B,)``), and the prior's standard
    deviation ``prior_std`` (the marginal at t = 1 is close to N(0, prior_std² I)). They satisfy
    f = d log α / dt and g² = dσ²/dt - 2 f σ² (Song et al. 2021, App. B, Eq. 29-30), which a test checks.

    ``t_min`` is the smallest time used for sampling and likelihoods (the score blows up at t = 0).
    """

    prior_std: float = 1.0
    t_min: float = 1e-5

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α(t) and σ(t), each ``(B,)`` for ``t`` ``(B,)``."""
        raise NotImplementedError

    def f_g2(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """f(t) and g(t)², each ``(B,)``."""
        raise NotImplementedError

    def marginal_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = α(t) x_0 + σ(t) ε, ``(B, ...)``."""
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise

    def prior_sample(self, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32,
                     generator: torch.Generator | None = None) -> Tensor:
        """x_1 ~ N(0, prior_std² I) of ``shape``."""
        return self.prior_std * randn(shape, device=device, dtype=dtype, generator=generator)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std² I) in nats, ``(B, ...) -> (B,)``."""
        return gaussian_log_prob(z, self.prior_std)


class VPSDE(SDE):
    r"""The variance-preserving SDE dx = -½ β(t) x dt + √β(t) dw, β(t) = β_min + t (β_max - β_min)
    (Song et al. 2021, Eq. 11): the continuous limit of DDPM, with α(t) = exp(-½ ∫_0^t β) and
    σ(t)² = 1 - α(t)².

    Raises:
        ValueError: unless ``0 < beta_min < beta_max``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t: Tensor) -> Tensor:
        """β(t), ``(B,)``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """log α(t) = -¼ t² (β_max - β_min) - ½ t β_min, ``(B,)``."""
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_alpha = self.log_alpha(t)
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()

    def f_g2(self, t: Tensor) -> tuple[Tensor, Tensor]:
        beta = self.beta(t)
        return -0.5 * beta, beta

    def discrete_betas(self, num_steps: int) -> Tensor:
        r"""DDPM's β_i for N steps: β_i = β(t_i) / N at t_i = (i - 1) / (N - 1), i = 1..N, float64 ``(N,)``
        (Song et al. 2021, App. B: with β_min = 0.1, β_max = 20 and N = 1000 these are DDPM's linear
        schedule from 1e-4 to 0.02).

        Raises:
            ValueError: for ``num_steps < 1``.
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        t = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)  # β_1 = β_min / N, β_N = β_max / N
        return self.beta(t) / num_steps


class SubVPSDE(VPSDE):
    r"""The sub-VP SDE dx = -½ β(t) x dt + √(β(t) (1 - e^{-2∫_0^t β})) dw (Song et al. 2021, Eq. 12): the
    VP drift with a smaller diffusion, so σ(t) = 1 - α(t)² (its variance is below the VP's at every t)."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_alpha = self.log_alpha(t)
        return log_alpha.exp(), -torch.expm1(2 * log_alpha)

    def f_g2(self, t: Tensor) -> tuple[Tensor, Tensor]:
        beta = self.beta(t)
        return -0.5 * beta, beta * -torch.expm1(4 * self.log_alpha(t))


class VESDE(SDE):
    r"""The variance-exploding SDE dx = √(dσ²(t)/dt) dw with σ(t) = σ_min (σ_max/σ_min)^t (Song et al.
    2021, Eq. 9): NCSN's noise levels in continuous time. The marginal is x_t = x_0 + σ_t ε with the
    exact σ_t² = σ(t)² - σ_min² (Eq. 31), and the prior N(0, σ_max² I).

    Raises:
        ValueError: unless ``0 < sigma_min < sigma_max``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.prior_std = sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), self.sigma_min * torch.expm1(2 * self._log_ratio * t).sqrt()

    def f_g2(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma_min * torch.exp(self._log_ratio * t)
        return torch.zeros_like(t), sigma ** 2 * 2 * self._log_ratio


class GammaSDE(SDE):
    r"""The variance-preserving SDE of a VDM schedule γ(t): α(t)² = sigmoid(-γ(t)), σ(t)² = sigmoid(γ(t)),
    so f = -½ σ² γ'(t) and g² = σ² γ'(t) (from f = d log α/dt and g² = dσ²/dt - 2 f σ²).

    ``gamma`` is a schedule module with ``gamma_and_derivative(t) -> (γ, γ')``, each ``(B,)``
    (``LinearGamma`` or ``MonotoneGamma``). With it, a VDM samples and gives its likelihood through the
    same SDE samplers and probability-flow ODE as a score SDE.
    """

    def __init__(self, gamma: nn.Module) -> None:
        self.gamma = gamma

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return alpha_sigma_of_gamma(self.gamma(t))

    def f_g2(self, t: Tensor) -> tuple[Tensor, Tensor]:
        g, dg = self.gamma.gamma_and_derivative(t)
        s2 = torch.sigmoid(g)
        return -0.5 * s2 * dg, s2 * dg


def alpha_sigma_of_gamma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """α = √sigmoid(-γ) and σ = √sigmoid(γ) of a log-noise-to-signal ratio γ (VDM, Sec. 3), each of γ's shape."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def make_sde(name: str) -> SDE:
    """``"vp"``, ``"ve"`` or ``"subvp"`` with the paper's defaults (β from 0.1 to 20; σ from 0.01 to 50).

    Raises:
        ValueError: for another name.
    """
    if name == "vp":
        return VPSDE()
    if name == "subvp":
        return SubVPSDE()
    if name == "ve":
        return VESDE()
    raise ValueError(f"sde must be one of {', '.join(SDES)}, got {name!r}")


def reverse_drift(sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor, probability_flow: bool = False) -> Tensor:
    r"""The drift of the reverse-time SDE, f(t) x - g(t)² ∇ log p_t(x) (Song et al. 2021, Eq. 6;
    Anderson 1982), or of the probability-flow ODE, f(t) x - ½ g(t)² ∇ log p_t(x) (Eq. 13).

    ``x`` ``(B, ...)``, ``t`` ``(B,)``; returns ``(B, ...)``, the velocity dx/dt in forward time.
    """
    f, g2 = sde.f_g2(t)
    weight = 0.5 if probability_flow else 1.0
    return _bcast(f.to(x.dtype), x) * x - weight * _bcast(g2.to(x.dtype), x) * score_fn(x, t)


def _time_grid(sde: SDE, num_steps: int, x: Tensor) -> tuple[Tensor, list[float]]:
    """The times from 1 to t_min on ``x``'s device, and the step sizes as floats (made on the CPU, so that
    no step reads a value from the device)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    times = torch.linspace(1.0, sde.t_min, num_steps + 1, dtype=x.dtype, device="cpu")
    return times.to(x.device), (times[:-1] - times[1:]).tolist()


_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _ode_options(method: str, times: Tensor) -> dict:
    """Make torchdiffeq's adaptive solvers land on the end time instead of stepping past it and
    interpolating: the SDEs are not defined before t = 0 (the VE marginal's σ_t is imaginary there)."""
    return {"step_t": times[1:]} if method in _ADAPTIVE else {}


def _final_denoise(sde: SDE, score_fn: ScoreFn, x: Tensor) -> Tensor:
    """Tweedie at t_min: the mean of the data given the last noisy sample."""
    t = x.new_full((len(x),), sde.t_min)
    alpha, sigma = sde.alpha_sigma(t)
    return tweedie_denoise(x, score_fn(x, t), alpha.to(x.dtype), sigma.to(x.dtype))


def _reverse_em_step(sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor, dt: float,
                     generator: torch.Generator | None) -> Tensor:
    """x ← x - [f(t) x - g(t)² s(x, t)] Δt + g(t) √Δt z: one reverse-time Euler–Maruyama step, ``(B, ...)``."""
    _, g2 = sde.f_g2(t)
    noise = randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x - reverse_drift(sde, score_fn, x, t) * dt + _bcast(g2.sqrt().to(x.dtype), x) * math.sqrt(dt) * noise


@torch.no_grad()
def euler_maruyama_sample(sde: SDE, score_fn: ScoreFn, x: Tensor, num_steps: int = 1000, denoise: bool = True,
                          generator: torch.Generator | None = None) -> Tensor:
    r"""Integrate the reverse SDE from t = 1 to ``sde.t_min`` by Euler–Maruyama (Song et al. 2021, App. D.1):

    x ← x - [f(t) x - g(t)² s(x, t)] Δt + g(t) √Δt z, with Δt = (1 - t_min) / N and z ~ N(0, I).

    ``x`` ``(B, ...)`` are draws of the prior; returns ``(B, ...)``, denoised by Tweedie's formula at
    the end if ``denoise``.

    Raises:
        ValueError: for ``num_steps < 1``.
    """
    times, steps = _time_grid(sde, num_steps, x)
    for i in range(num_steps):
        x = _reverse_em_step(sde, score_fn, x, times[i].expand(len(x)), steps[i], generator)
    return _final_denoise(sde, score_fn, x) if denoise else x


@torch.no_grad()
def predictor_corrector_sample(sde: SDE, score_fn: ScoreFn, x: Tensor, num_steps: int = 1000,
                               corrector_steps: int = 1, snr: float = 0.16, denoise: bool = True,
                               generator: torch.Generator | None = None) -> Tensor:
    r"""Predictor–corrector sampling (Song et al. 2021, Algorithm 1 with Algorithms 4-5): each reverse
    Euler–Maruyama step (the predictor) is followed by ``corrector_steps`` Langevin steps at the new
    time (the corrector), with the step size set by the target signal-to-noise ratio ``snr``:
    ε = 2 α (snr ‖z‖ / ‖s‖)², x ← x + ε s + √(2ε) z, where α = α(t)² / α(t')² = 1 - β_i of the step (1 for VE)
    and the norms are averaged over the batch.

    ``x`` ``(B, ...)`` from the prior; returns ``(B, ...)``.

    Raises:
        ValueError: for bad step counts or ``snr <= 0``.
    """
    _check_sigma(snr, "snr")
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be a non-negative integer, got {corrector_steps!r}")
    times, steps = _time_grid(sde, num_steps, x)
    for i in range(num_steps):
        t, t_next = times[i].expand(len(x)), times[i + 1].expand(len(x))
        x = _reverse_em_step(sde, score_fn, x, t, steps[i], generator)
        ratio = (sde.alpha_sigma(t)[0] / sde.alpha_sigma(t_next)[0]) ** 2  # (B,): α_i = 1 - β_i of Algorithm 5
        for _ in range(corrector_steps):
            score = score_fn(x, t_next)
            z = randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            # the norms are averaged over the batch, as in the paper's code: per-example ratios blow up near modes
            norms = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
            step = 2 * ratio.to(x.dtype) * (snr * norms) ** 2  # (B,)
            x = x + _bcast(step, x) * score + _bcast((2 * step).sqrt(), x) * z
    return _final_denoise(sde, score_fn, x) if denoise else x


class ProbabilityFlow(nn.Module):
    r"""The probability-flow ODE's velocity dx/dt = f(t) x - ½ g(t)² s(x, t) as a module ``(t, z) -> dz/dt``
    on flat states ``(B, D)`` (Song et al. 2021, Eq. 13), for ``dgmlib.cnf.CNFDynamics`` and torchdiffeq.

    ``t`` is a scalar tensor (torchdiffeq's convention); ``event_shape`` reshapes the state for the score.
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, event_shape: Sequence[int]) -> None:
        super().__init__()
        self.sde, self.score_fn, self.event_shape = sde, score_fn, tuple(event_shape)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        x = z.reshape(len(z), *self.event_shape)
        v = reverse_drift(self.sde, self.score_fn, x, t.to(z.dtype).expand(len(z)), probability_flow=True)
        return v.reshape(len(z), -1)  # (B, D)


@torch.no_grad()
def probability_flow_sample(sde: SDE, score_fn: ScoreFn, x: Tensor, rtol: float = 1e-5, atol: float = 1e-5,
                            method: str = "dopri5", denoise: bool = False) -> tuple[Tensor, int]:
    """Integrate the probability-flow ODE from t = 1 to ``t_min`` with torchdiffeq's ``method``.

    ``x`` ``(B, ...)`` from the prior; returns the samples ``(B, ...)`` and the number of function
    evaluations. Deterministic given ``x``: the ODE maps the prior to the data one to one.
    """
    flow = ProbabilityFlow(sde, score_fn, x.shape[1:])
    nfe = 0

    def velocity(t: Tensor, z: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return flow(t, z)

    times = torch.tensor([1.0, sde.t_min], dtype=x.dtype, device=x.device)
    out = odeint(velocity, x.reshape(len(x), -1), times, rtol=rtol, atol=atol, method=method,
                 options=_ode_options(method, times))[-1]
    out = out.reshape(x.shape)
    return (_final_denoise(sde, score_fn, out) if denoise else out), nfe


def sample_sde(sde: SDE, score_fn: ScoreFn, x: Tensor, sampler: str, num_steps: int, snr: float = 0.16,
               denoise: bool = True, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """Run one of ``SAMPLERS`` from prior draws ``x`` ``(B, ...)``: the reverse SDE by Euler–Maruyama or with a
    Langevin corrector (``num_steps`` steps, ``snr``), or the probability-flow ODE (dopri5, rtol = atol = 1e-4).
    Returns the samples ``(B, ...)`` (Tweedie-denoised at t_min if ``denoise``) and the ODE's NFE (0 for the SDEs).

    Raises:
        ValueError: for an unknown sampler.
    """
    if sampler == "euler_maruyama":
        return euler_maruyama_sample(sde, score_fn, x, num_steps, denoise, generator), 0
    if sampler == "predictor_corrector":
        return predictor_corrector_sample(sde, score_fn, x, num_steps, snr=snr, denoise=denoise,
                                          generator=generator), 0
    if sampler == "ode":
        return probability_flow_sample(sde, score_fn, x, rtol=1e-4, atol=1e-4, denoise=denoise)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def probability_flow_log_prob(sde: SDE, score_fn: ScoreFn, x: Tensor, trace: str = "exact", rtol: float = 1e-5,
                              atol: float = 1e-5, method: str = "dopri5", generator: torch.Generator | None = None,
                              prior_log_prob: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, int]:
    r"""log p_0(x) in nats under the probability-flow ODE (Song et al. 2021, App. D.2), with ``dgmlib.cnf``'s
    instantaneous change of variables (Chen et al. 2018, Theorem 1):

    .. math:: \log p_0(x(0)) = \log p_1(x(1)) + \int_0^1 \nabla\cdot \tilde f(x(t), t)\, dt,

    solving [x, ∫ -div] from ``sde.t_min`` to 1 with ``CNFDynamics`` (``trace``: ``"exact"``, or
    Hutchinson with ``"rademacher"``/``"gaussian"`` noise fixed over the solve) and the prior's log
    density at the end (``sde.prior_log_prob``, or ``prior_log_prob(z) -> (B,)`` if given, e.g. the exact
    marginal p_1 where it is known). ``x`` ``(B, ...)`` continuous data at t_min; returns ``(B,)`` and the
    number of function evaluations.

    Raises:
        ValueError: for an unknown trace or bad ``x``.
    """
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {', '.join(TRACES)}, got {trace!r}")
    _check_x(x)
    dim = x[0].numel()
    dynamics = CNFDynamics(ProbabilityFlow(sde, score_fn, x.shape[1:]), dim, trace)
    dynamics.exact = trace == "exact"
    if trace != "exact":
        dynamics.noise = sample_noise((len(x), dim), trace, generator=generator, dtype=x.dtype, device=x.device)
    state = torch.cat([x.reshape(len(x), dim), x.new_zeros(len(x), 1)], dim=1)  # (B, D + 1)
    times = torch.tensor([sde.t_min, 1.0], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        final = odeint(dynamics, state, times, rtol=rtol, atol=atol, method=method,
                       options=_ode_options(method, times))[-1]
    z, neg_integral = final[:, :dim], final[:, dim]  # neg_integral = -∫ div dt
    log_p1 = (prior_log_prob or sde.prior_log_prob)(z.reshape(x.shape))
    return log_p1 - neg_integral, dynamics.nfe


# --------------------------------------------------------------------------- models


def _check_levels_batch(model: nn.Module, y: Tensor) -> Tensor:
    if model.num_levels is None:
        check_batch(y, model.event_shape, "batch")
        return y
    check_levels(y, model.num_levels)
    return levels_to_unit(y, model.num_levels).to(module_dtype(model))


class NCSN(nn.Module):
    r"""A noise-conditional score network (Song & Ermon 2019) trained by denoising score matching over
    L noise levels, sampled by annealed Langevin dynamics.

    The network ``net(x, i)`` takes the level's index i ∈ {0..L-1} as its time input and predicts ε, so
    s_θ(x, σ_i) = -net(x, i) / σ_i (``score_from_eps``; the σ-scaling of Song & Ermon 2020, Technique 3).
    With λ(σ) = σ², the denoising loss at level i is ½ ‖net(x̃, i) - ε‖².

    Args:
        net: ``(x (B, ...), i (B,)) -> (B, ...)``.
        sigmas: σ_1 > ... > σ_L ``(L,)``.
        event_shape: ``(D,)`` or ``(C, H, W)``.
        num_levels: K for images of integer levels (scaled to [-1, 1]); None for continuous data.
        epsilon, steps_per_level: the sampler's ε and steps per level (Algorithm 1).

    Raises:
        ValueError: for bad sigmas.
    """

    def __init__(self, net: nn.Module, sigmas: Tensor, event_shape: Sequence[int], num_levels: int | None = None,
                 epsilon: float = 2e-5, steps_per_level: int = 100) -> None:
        super().__init__()
        sigmas = _host_sigmas(sigmas, min_levels=2)
        self.net = net
        self.sigma_values = tuple(sigmas.tolist())  # float64 on the host, for the sampler (no device reads)
        self.register_buffer("sigmas", sigmas.float())  # cast at use; float32 so that MPS can hold it
        self.event_shape, self.num_levels = tuple(event_shape), num_levels
        self.epsilon, self.steps_per_level = epsilon, steps_per_level

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """s_θ(x, σ) for σ ``(B,)`` equal to levels in ``sigmas``; ``(B, ...)``."""
        index = (self.sigmas.to(sigma.dtype)[None] - sigma[:, None]).abs().argmin(1)  # (B,)
        return score_from_eps(self.net(x, index), sigma.to(x.dtype))

    def training_loss(self, batch: Tensor) -> Tensor:
        """The σ²-weighted denoising loss at a uniform random level per example, ``(B,)`` (Song & Ermon 2019, Eq. 5-6)."""
        x = _check_levels_batch(self, batch)
        index = torch.randint(0, len(self.sigmas), (len(x),), device=x.device)
        sigma = self.sigmas[index].to(x.dtype)
        noise = torch.randn_like(x)
        x_noisy = x + _bcast(sigma, x) * noise
        return 0.5 * _sum_event((self.net(x_noisy, index) - noise) ** 2)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, steps_per_level: int | None = None) -> Tensor:
        """``n`` samples ``(n, *event_shape)`` by annealed Langevin dynamics from U(-1, 1) noise (images in [-1, 1])."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        device, dtype = module_device(self), module_dtype(self)
        x = rand((n, *self.event_shape), device=device, dtype=dtype, generator=generator) * 2 - 1
        return annealed_langevin_sample(self.score, x, self.sigma_values, self.epsilon,
                                        steps_per_level or self.steps_per_level, generator=generator)


class ScoreSDE(nn.Module):
    r"""A score-based model of Song et al. 2021: ``net(x_t, 999 t)`` predicts ε, trained by denoising score
    matching with λ(t) = σ(t)² (the continuous-time objective, Eq. 7), t ~ U(t_min, 1).

    Images of integer levels are scaled to [-1, 1] and, with ``dequantize``, spread uniformly over their
    bins of width h = 2/(K - 1) in training and evaluation, so that ``nll`` is the probability-flow ODE's
    exact density of dequantized data: a bound on -log P(y), -log P(y) ≤ E_u[-log p(x + u)] - D log h.

    ``weighting="likelihood"`` uses λ(t) = g(t)² instead (Song, Durkan, Murray & Ermon 2021, "Maximum
    likelihood training of score-based diffusion models", Theorem 1: the weighted loss then bounds the KL
    to the data, up to a constant). In ε form its weight is g²/σ² = dγ/dt for the log-noise-to-signal
    ratio γ(t) = log(σ(t)²/α(t)²) of every SDE here, so the loss is VDM's L_∞ with this SDE's schedule;
    t is importance-sampled by drawing γ uniformly on [γ(t_min), γ(1)] (which makes every draw's weight the
    constant γ(1) - γ(t_min)), and ``log_snr_inverse`` maps γ back to t.

    Samplers: ``sample(n, sampler=...)`` with ``"euler_maruyama"``, ``"predictor_corrector"`` or ``"ode"``.

    Raises:
        TypeError: if ``sde`` is not an ``SDE``.
        ValueError: for an unknown ``weighting``.
    """

    WEIGHTINGS = ("score", "likelihood")

    def __init__(self, net: nn.Module, sde: SDE, event_shape: Sequence[int], num_levels: int | None = None,
                 dequantize: bool = True, sample_steps: int = 1000, weighting: str = "score") -> None:
        super().__init__()
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be an SDE, got {type(sde).__name__}")
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(self.WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        self.net, self.sde = net, sde
        ends = self.log_snr(torch.tensor([sde.t_min, 1.0], dtype=torch.float64))  # constants, on the host
        self._log_snr_ends = (float(ends[0]), float(ends[1]))
        self.event_shape, self.num_levels, self.dequantize = tuple(event_shape), num_levels, dequantize
        self.sample_steps = sample_steps
        self.last_nfe = 0

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """ε̂(x_t, t), ``(B, ...)``."""
        return self.net(x, 999.0 * t)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """s_θ(x, t) = -ε̂(x, t) / σ(t), ``(B, ...)``."""
        return score_from_eps(self.eps(x, t), self.sde.alpha_sigma(t)[1].to(x.dtype))

    def _bin_width(self) -> float:
        return 2.0 / (self.num_levels - 1)

    def to_unit(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Data in the model's space: images to [-1, 1] (dequantized if set), 2D points unchanged, ``(B, ...)``."""
        x = _check_levels_batch(self, batch)
        if self.num_levels is not None and self.dequantize:
            x = x + (rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) - 0.5) * self._bin_width()
        return x

    def log_snr(self, t: Tensor) -> Tensor:
        """γ(t) = log(σ(t)² / α(t)²), increasing in t, ``(B,)``."""
        alpha, sigma = self.sde.alpha_sigma(t)
        return 2 * (sigma.log() - alpha.log())

    def log_snr_inverse(self, gamma: Tensor, iterations: int = 50) -> Tensor:
        """The t in [t_min, 1] with γ(t) = ``gamma`` ``(B,)``, by bisection (γ is increasing); ``(B,)``."""
        lo, hi = torch.full_like(gamma, self.sde.t_min), torch.ones_like(gamma)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            below = self.log_snr(mid) < gamma
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def training_loss(self, batch: Tensor) -> Tensor:
        """Denoising score matching per example, ``(B,)``: ½ ‖ε̂(x_t, t) - ε‖² at t ~ U(t_min, 1) (λ(t) = σ(t)²),
        or, with the likelihood weighting, ½ (γ(1) - γ(t_min)) ‖ε̂(x_t, t) - ε‖² at t = γ⁻¹(u), u uniform
        (in nats: an estimate of the diffusion part of the continuous-time bound)."""
        x = self.to_unit(batch)
        u = torch.rand(len(x), device=x.device, dtype=x.dtype)
        weight = 0.5
        if self.weighting == "likelihood":
            lo, hi = self._log_snr_ends
            t = self.log_snr_inverse(lo + u * (hi - lo))
            weight = 0.5 * (hi - lo)
        else:
            t = u * (1 - self.sde.t_min) + self.sde.t_min
        noise = torch.randn_like(x)
        x_t = self.sde.marginal_sample(x, t, noise)
        return weight * _sum_event((self.eps(x_t, t) - noise) ** 2)

    def log_prob(self, batch: Tensor, trace: str | None = None, generator: torch.Generator | None = None) -> Tensor:
        """log p(x) in nats ``(B,)`` of the probability-flow ODE (``probability_flow_log_prob``); for
        images, of the dequantized point. ``last_nfe`` keeps the solver's NFE. ``trace`` None: exact for
        2D data, Hutchinson (``"rademacher"``) for images, whose exact trace costs D backward passes per step."""
        trace = trace or ("exact" if self.num_levels is None else "rademacher")
        x = self.to_unit(batch, generator)
        log_p, self.last_nfe = probability_flow_log_prob(self.sde, self.score, x, trace, generator=generator)
        return log_p

    def nll(self, batch: Tensor, trace: str | None = None, generator: torch.Generator | None = None) -> Tensor:
        """-log p(x) in nats ``(B,)``; for images of levels, the dequantization bound on -log P(y) per image
        (Theis et al. 2016; one uniform draw per image, the bin volume h^D accounted).

        Raises:
            ValueError: for images when the model was built with ``dequantize=False`` (a density at the
                grid points bounds nothing about P(y)).
        """
        if self.num_levels is not None and not self.dequantize:
            raise ValueError("nll of discrete images needs dequantize=True: the density at grid points is no bound")
        nll = -self.log_prob(batch, trace, generator)
        if self.num_levels is not None and self.dequantize:
            nll = nll - math.prod(self.event_shape) * math.log(self._bin_width())
        return nll

    @torch.no_grad()
    def sample(self, n: int, sampler: str = "euler_maruyama", generator: torch.Generator | None = None,
               num_steps: int | None = None) -> Tensor:
        """``n`` samples ``(n, *event_shape)`` by ``sampler`` (``SAMPLERS``); images in [-1, 1].

        Raises:
            ValueError: for an unknown sampler or a bad ``n``.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        device, dtype = module_device(self), module_dtype(self)
        x = self.sde.prior_sample((n, *self.event_shape), device, dtype, generator)
        samples, nfe = sample_sde(self.sde, self.score, x, sampler, num_steps or self.sample_steps,
                                  snr=0.16 if self.num_levels is not None else 0.05, generator=generator)
        if sampler == "ode":
            self.last_nfe = nfe
        return samples


# --------------------------------------------------------------------------- VDM


def fourier_features(z: Tensor, exponents: Sequence[int] = (4, 5, 6)) -> Tensor:
    r"""VDM's Fourier features of the input (Kingma et al. 2021, App. C): sin(2^n π z) and cos(2^n π z)
    for each n, concatenated on the channel axis: ``(B, C, ...) -> (B, 2 C len(exponents), ...)``.

    High frequencies let the network see where z lies inside a quantisation bin at low noise, which
    is what the likelihood depends on there. For K = 17 levels in [-1, 1] the bins are 1/8 wide, so
    n = 4 already resolves the position within a bin (16π z changes by 2π across one).
    """
    if len(exponents) == 0:
        raise ValueError("fourier_features needs at least one exponent")
    feats = [f(2.0 ** n * math.pi * z) for n in exponents for f in (torch.sin, torch.cos)]
    return torch.cat(feats, dim=1)


class LinearGamma(nn.Module):
    r"""A fixed linear schedule γ(t) = γ_min + (γ_max - γ_min) t, log-SNR(t) = -γ(t) (VDM, Sec. 3)."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0) -> None:
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        self.register_buffer("gamma_min", torch.tensor(float(gamma_min)))
        self.register_buffer("gamma_max", torch.tensor(float(gamma_max)))

    def forward(self, t: Tensor) -> Tensor:
        """γ(t), ``(B,) -> (B,)``."""
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t

    def gamma_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """γ(t) and dγ/dt, each ``(B,)``."""
        return self(t), (self.gamma_max - self.gamma_min).expand_as(t)


class _PositiveLinear(nn.Module):
    """A linear layer whose weights are softplus of free parameters, so it is monotone increasing."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.randn(n_out, n_in) * 0.5 - 1.0)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.softplus(self.raw), self.bias)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``2 L`` per example (``holder``), so the
    parameters behind it receive the gradient of E[L²] instead of E[L] (VDM, App. I.2)."""

    @staticmethod
    def forward(ctx, x: Tensor, holder: list) -> Tensor:  # noqa: ANN001 - autograd's ctx
        ctx.holder = holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        loss = ctx.holder[0]
        return grad * 2 * loss.reshape(grad.shape).to(grad.dtype), None


class MonotoneGamma(nn.Module):
    r"""A learned monotone schedule (VDM, App. I.1-I.2): γ(t) = γ_0 + (γ_1 - γ_0) γ̂(t) with learned
    endpoints γ_0 < γ_1 and a shape γ̂ increasing from γ̂(0) = 0 to γ̂(1) = 1,

    γ̃(t) = l_1(t) + l_3(φ(l_2(l_1(t)))),   γ̂(t) = (γ̃(t) - γ̃(0)) / (γ̃(1) - γ̃(0)),

    where the l_i have positive weights and φ is a sigmoid, so γ̃ is increasing. The endpoints set the
    bound's prior and reconstruction terms and, through SNR(0) and SNR(1), the diffusion loss; the
    shape leaves the continuous diffusion loss unchanged in expectation (Sec. 5.1) and only changes
    its variance. ``variance_holder`` (set by ``VDM.training_loss``) routes the gradient of E[L²] to
    the shape's parameters while the endpoints get the gradient of the bound.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, hidden: int = 1024) -> None:
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min)))
        self.log_range = nn.Parameter(torch.tensor(math.log(gamma_max - gamma_min)))
        self.l1, self.l2, self.l3 = _PositiveLinear(1, 1), _PositiveLinear(1, hidden), _PositiveLinear(hidden, 1)
        self.variance_holder: list | None = None

    def _tilde(self, t: Tensor) -> Tensor:
        h = self.l1(t[:, None])  # (B, 1)
        return (h + self.l3(torch.sigmoid(self.l2(h))))[:, 0]

    def _tilde_derivative(self, t: Tensor) -> Tensor:
        """dγ̃/dt in closed form, ``(B,)``: w_1 (1 + Σ_j W3_j φ'(a_j) W2_j) with a = l_2(l_1(t)), φ' = φ(1 - φ)."""
        w1, w2, w3 = (F.softplus(layer.raw) for layer in (self.l1, self.l2, self.l3))  # (1, 1), (H, 1), (1, H)
        phi = torch.sigmoid(self.l2(self.l1(t[:, None])))  # (B, H)
        return w1[0, 0] * (1 + (phi * (1 - phi) * w2[:, 0] * w3[0]).sum(1))

    def shape(self, t: Tensor) -> Tensor:
        """γ̂(t) ∈ [0, 1], increasing, ``(B,) -> (B,)``."""
        ends = self._tilde(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        return (self._tilde(t) - ends[0]) / (ends[1] - ends[0])

    def forward(self, t: Tensor) -> Tensor:
        """γ(t), ``(B,) -> (B,)``."""
        return self.gamma_and_derivative(t, need_derivative=False)[0]

    def gamma_and_derivative(self, t: Tensor, need_derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        """γ(t) and dγ/dt (the network's derivative in closed form, so it works under ``no_grad`` and
        ``inference_mode``), each ``(B,)``; the derivative is None if not asked for."""
        ends = self._tilde(torch.stack([t.new_zeros(()), t.new_ones(())]))
        shape = (self._tilde(t) - ends[0]) / (ends[1] - ends[0])
        derivative = self._tilde_derivative(t) / (ends[1] - ends[0]) if need_derivative else None
        if self.variance_holder is not None:
            shape = _ScaleGradient.apply(shape, self.variance_holder)
            derivative = _ScaleGradient.apply(derivative, self.variance_holder) if derivative is not None else None
        span = self.log_range.exp()
        gamma = self.gamma_0 + span * shape
        return gamma, (span * derivative if derivative is not None else None)


class VDM(nn.Module):
    r"""A Variational Diffusion Model (Kingma, Salimans, Poole & Ho 2021) with a continuous-time bound.

    Forward process z_t = α_t x + σ_t ε with α_t² = sigmoid(-γ(t)), σ_t² = sigmoid(γ(t)), so
    SNR(t) = α_t²/σ_t² = exp(-γ(t)). The bound on -log P(x) in nats (Eq. 11) is

    * ``prior``: KL(q(z_1 | x) ‖ N(0, I));
    * ``diffusion``: the continuous-time loss (Eq. 17)
      L_∞ = ½ E_{t ~ U(0, 1)} [γ'(t) ‖ε - ε̂(z_t; t)‖²] = -½ ∫_0^1 SNR'(t) ‖x - x̂(z_t; t)‖² dt;
    * ``reconstruction``: -log p(x | z_0), for images the discrete decoder over the K levels,
      p(x_i = x_k | z_0) ∝ exp(-(z_{0,i}/α_0 - x_k)² / (2 σ_0²/α_0²)) (Sec. 3.3), for 2D data the
      Gaussian N(x; z_0/α_0, σ_0²/α_0² I).

    ``net(input, c)`` predicts ε from the input ``z_t`` (with its Fourier features on the channel axis
    for images, ``fourier_exponents``) and the conditioning c = 1000 (γ(t) - γ_lo)/(γ_hi - γ_lo) for
    the initial range [γ_lo, γ_hi] (the network sees γ, not t, so a schedule change only reparametrises
    time). Training samples t with low discrepancy (antithetic, App. D): t_i = (u + i/B) mod 1.

    Args:
        net: the ε-network.
        event_shape: ``(D,)`` or ``(C, H, W)``.
        num_levels: K for images of integer levels; None for continuous 2D data.
        schedule: ``"learned"`` (``MonotoneGamma``, trained to minimise the loss's variance) or ``"fixed"``.
        gamma_min, gamma_max: the initial (or fixed) endpoints.

    Raises:
        ValueError: for an unknown schedule.
    """

    SCHEDULES = ("learned", "fixed")

    def __init__(self, net: nn.Module, event_shape: Sequence[int], num_levels: int | None = None,
                 schedule: str = "learned", gamma_min: float = -13.3, gamma_max: float = 5.0,
                 fourier_exponents: Sequence[int] = (4, 5, 6), sample_steps: int = 1000) -> None:
        super().__init__()
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(self.SCHEDULES)}, got {schedule!r}")
        self.net = net
        self.gamma = MonotoneGamma(gamma_min, gamma_max) if schedule == "learned" else LinearGamma(gamma_min, gamma_max)
        self.sde = GammaSDE(self.gamma)
        self.event_shape, self.num_levels = tuple(event_shape), num_levels
        self.fourier_exponents = tuple(fourier_exponents) if num_levels is not None else ()
        self.gamma_range = (gamma_min, gamma_max)
        self.sample_steps = sample_steps
        self.last_nfe = 0

    # ------------------------------------------------------------------ the network
    def eps(self, z: Tensor, gamma: Tensor) -> Tensor:
        """ε̂(z_t; γ_t): ``z`` ``(B, ...)``, ``gamma`` ``(B,)``; returns ``(B, ...)``."""
        lo, hi = self.gamma_range
        inputs = torch.cat([z, fourier_features(z, self.fourier_exponents)], 1) if self.fourier_exponents else z
        return self.net(inputs, 1000.0 * (gamma - lo) / (hi - lo))

    def score(self, z: Tensor, t: Tensor) -> Tensor:
        """s_θ(z, t) = -ε̂ / σ_t, ``(B, ...)``."""
        gamma = self.gamma(t)
        return score_from_eps(self.eps(z, gamma), alpha_sigma_of_gamma(gamma)[1].to(z.dtype))

    def to_unit(self, batch: Tensor) -> Tensor:
        """Images of levels to [-1, 1]; 2D points unchanged. ``(B, ...)``."""
        return _check_levels_batch(self, batch)

    # ------------------------------------------------------------------ the bound
    def prior_loss(self, x: Tensor) -> Tensor:
        """KL(q(z_1 | x) ‖ N(0, I)) in nats, ``(B, ...) -> (B,)``."""
        g1 = self.gamma(x.new_ones(1))
        var, mean_sq = torch.sigmoid(g1), torch.sigmoid(-g1) * x ** 2
        return 0.5 * _sum_event(var + mean_sq - 1 - F.logsigmoid(g1))

    def reconstruction_loss(self, y: Tensor, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """-log p(x | z_0) in nats ``(B,)`` with z_0 ~ q(z_0 | x): the discrete decoder for levels ``y``,
        or the Gaussian decoder for continuous ``x``."""
        g0 = self.gamma(x.new_zeros(1))
        eps = randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        z0_rescaled = x + (0.5 * g0).exp() * eps  # z_0 / α_0 = x + (σ_0/α_0) ε, σ_0²/α_0² = exp(γ_0)
        if self.num_levels is None:
            return 0.5 * _sum_event(eps ** 2) + 0.5 * x[0].numel() * (LOG_2PI + g0)
        log_probs = self.decoder_log_probs(z0_rescaled, g0)  # (B, ..., K)
        return -_sum_event(log_probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1))

    def decoder_log_probs(self, z0_rescaled: Tensor, gamma_0: Tensor) -> Tensor:
        r"""log p(x_i = x_k | z_0) over the K levels x_k, ``(B, ...) -> (B, ..., K)``: a softmax of
        -(z_0/α_0 - x_k)² / (2 exp(γ_0)), so it sums to 1 over the levels by construction."""
        levels = torch.linspace(-1, 1, self.num_levels, dtype=z0_rescaled.dtype, device=z0_rescaled.device)
        logits = -0.5 * (z0_rescaled.unsqueeze(-1) - levels) ** 2 * torch.exp(-gamma_0)
        return torch.log_softmax(logits, dim=-1)

    def _times(self, n: int, device: torch.device, dtype: torch.dtype,
               generator: torch.Generator | None) -> Tensor:
        u = rand((1,), device=device, dtype=dtype, generator=generator)
        return torch.remainder(u + torch.arange(n, device=device, dtype=dtype) / n, 1.0)  # (B,) antithetic

    def diffusion_loss(self, x: Tensor, t: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        r"""The continuous-time diffusion loss in nats, ``(B,)``: ½ γ'(t) ‖ε - ε̂(z_t; γ_t)‖² at one t per
        example (low-discrepancy t if ``t`` is None), an unbiased estimate of L_∞ (Eq. 17)."""
        if t is None:
            t = self._times(len(x), x.device, x.dtype, generator)
        gamma, dgamma = self.gamma.gamma_and_derivative(t)
        eps = randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        alpha, sigma = alpha_sigma_of_gamma(gamma)
        z = _bcast(alpha, x) * x + _bcast(sigma, x) * eps
        return 0.5 * dgamma * _sum_event((eps - self.eps(z, gamma)) ** 2)

    def discrete_diffusion_loss(self, x: Tensor, num_steps: int, generator: torch.Generator | None = None) -> Tensor:
        r"""The T-step diffusion loss (Eq. 14-15 in ε form): (T/2) E_i[(exp(γ(t_i) - γ(s_i)) - 1) ‖ε - ε̂(z_{t_i})‖²]
        with s_i = (i - 1)/T, t_i = i/T, at one i per example; ``(B,)`` nats. It decreases to L_∞ as T grows."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        i = randint(1, num_steps + 1, (len(x),), device=x.device, generator=generator)  # (B,)
        t, s = i.to(x.dtype) / num_steps, (i - 1).to(x.dtype) / num_steps
        gamma_t, gamma_s = self.gamma(t), self.gamma(s)
        eps = randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        alpha, sigma = alpha_sigma_of_gamma(gamma_t)
        z = _bcast(alpha, x) * x + _bcast(sigma, x) * eps
        return 0.5 * num_steps * torch.expm1(gamma_t - gamma_s) * _sum_event((eps - self.eps(z, gamma_t)) ** 2)

    def bound_terms(self, y: Tensor, generator: torch.Generator | None = None,
                    num_steps: int | None = None) -> dict[str, Tensor]:
        """The bound's terms in nats, each ``(B,)``: ``prior``, ``diffusion`` (continuous, or T-step if
        ``num_steps``), ``reconstruction`` and their sum ``total``."""
        x = self.to_unit(y)
        diffusion = (self.diffusion_loss(x, generator=generator) if num_steps is None
                     else self.discrete_diffusion_loss(x, num_steps, generator))
        prior, recon = self.prior_loss(x), self.reconstruction_loss(y, x, generator)
        return {"prior": prior, "diffusion": diffusion, "reconstruction": recon, "total": prior + diffusion + recon}

    def training_loss(self, batch: Tensor) -> Tensor:
        """The bound per example, ``(B,)`` nats. With a learned schedule, the shape of γ gets the
        gradient of E[L_diffusion²] (the variance-minimising objective), everything else that of the bound."""
        x = self.to_unit(batch)
        learned = isinstance(self.gamma, MonotoneGamma) and torch.is_grad_enabled()
        holder: list = [x.new_zeros(len(x))]
        if learned:
            self.gamma.variance_holder = holder
        try:
            diffusion = self.diffusion_loss(x)
        finally:
            if learned:
                self.gamma.variance_holder = None
        holder[0] = diffusion.detach()  # read by the backward pass of the schedule's shape
        return self.prior_loss(x) + diffusion + self.reconstruction_loss(batch, x)

    def nll(self, y: Tensor) -> Tensor:
        """The continuous-time bound on -log P(y) in nats per example, ``(B,)``, one t per example."""
        return self.bound_terms(y)["total"]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, sampler: str = "ancestral", generator: torch.Generator | None = None,
               num_steps: int | None = None) -> Tensor:
        r"""``n`` samples ``(n, *event_shape)``: ``"ancestral"`` steps z_s ~ p(z_s | z_t) over ``num_steps``
        (VDM, App. A.4: z_s = α_s/α_t (z_t - c σ_t ε̂) + √(c σ_s²) z, c = -expm1(γ_s - γ_t)), then the
        decoder's mean level; or any of ``SAMPLERS`` through ``GammaSDE``. Images in [-1, 1].

        Raises:
            ValueError: for an unknown sampler or bad ``n``.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        device, dtype = module_device(self), module_dtype(self)
        z = randn((n, *self.event_shape), device=device, dtype=dtype, generator=generator)
        steps = num_steps or self.sample_steps
        if sampler == "ancestral":
            times = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype, device=device)
            for i in range(steps):
                gamma_t, gamma_s = self.gamma(times[i].expand(n)), self.gamma(times[i + 1].expand(n))
                c = -torch.expm1(gamma_s - gamma_t)
                (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma_of_gamma(gamma_t), alpha_sigma_of_gamma(gamma_s)
                mean = _bcast(alpha_s / alpha_t, z) * (z - _bcast(c * sigma_t, z) * self.eps(z, gamma_t))
                z = mean + _bcast((c * sigma_s ** 2).sqrt(), z) * randn(z.shape, device=device, dtype=dtype,
                                                                         generator=generator)
            z = z / alpha_sigma_of_gamma(self.gamma(z.new_zeros(1)))[0]
        elif sampler in SAMPLERS:
            z, nfe = sample_sde(self.sde, self.score, z, sampler, steps, denoise=False, generator=generator)
            if sampler == "ode":
                self.last_nfe = nfe
            z = z / self.sde.alpha_sigma(z.new_full((1,), self.sde.t_min))[0]
        else:
            raise ValueError(f"sampler must be 'ancestral' or one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if self.num_levels is None:
            return z
        levels = torch.linspace(-1, 1, self.num_levels, dtype=dtype, device=device)
        return levels[(z.unsqueeze(-1) - levels).abs().argmin(-1)]  # the decoder's most likely level
