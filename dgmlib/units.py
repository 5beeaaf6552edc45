"""Units of likelihood: nats, bits per dimension, and the uniform-dequantization bound.

Every model of discrete images in the course reports its negative log-likelihood through
``dequantized_nll`` and ``nats_to_bits_per_dim`` so that numbers compare across lectures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dgmlib.device import rand, value_checks

LN2 = math.log(2.0)


def nats_to_bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert a negative log-likelihood per example in nats to bits per dimension.

    ``bits/dim = nats / (D * ln 2)`` with ``D = num_dims`` (64 for 8x8 digits).

    Raises:
        ValueError: if ``num_dims`` is not a positive integer.
    """
    _check_dims(num_dims)
    return nats / (num_dims * LN2)


def bits_per_dim_to_nats(bits_per_dim: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert bits per dimension back to nats per example (inverse of ``nats_to_bits_per_dim``).

    Raises:
        ValueError: if ``num_dims`` is not a positive integer.
    """
    _check_dims(num_dims)
    return bits_per_dim * num_dims * LN2


def check_levels(y: Tensor, num_levels: int) -> None:
    """Check that ``y`` holds integers in ``{0, ..., num_levels - 1}``.

    Raises:
        TypeError: if ``y`` is not a tensor.
        ValueError: if ``num_levels < 2``, or ``y`` holds NaN, non-integers or values out of range.

    The value checks read ``y`` (a host round trip on a GPU); they are skipped where
    ``dgmlib.device.value_checks(y)`` is False: on ``meta`` and inside ``fit``/``evaluate``, which
    check their whole data once.
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"expected a torch.Tensor of discrete levels, got {type(y).__name__}")
    if not isinstance(num_levels, int) or num_levels < 2:
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


def uniform_dequantize(y: Tensor, num_levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Map discrete levels to continuous data in [0, 1): ``x = (y + u) / K``, ``u ~ U[0, 1)^D``.

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
    """Upper bound on ``-log P(y)`` in nats per example from a continuous density on [0, 1)^D.

    With ``x = (y + u) / K`` the continuous density on ``[0, K)^D`` is ``p(x) K^{-D}`` (the
    scaling Jacobian), so Jensen's inequality gives the uniform-dequantization bound

        log P(y) = log ∫ p((y+u)/K) K^{-D} du  >=  E_u[log p((y+u)/K)] - D log K.

    This returns a one-sample Monte-Carlo estimate of the right-hand side, negated:
    ``-log p(x) + D log K``. Averaged over data and noise it is an upper bound on the discrete
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
    x = uniform_dequantize(y, num_levels, generator)
    log_px = log_prob(x)
    if log_px.shape != (y.shape[0],):
        raise ValueError(f"log_prob must return shape (B,) = ({y.shape[0]},), got {tuple(log_px.shape)}")
    num_dims = y[0].numel()
    return -log_px + num_dims * math.log(num_levels)


def _check_dims(num_dims: int) -> None:
    if not isinstance(num_dims, int) or num_dims <= 0:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
