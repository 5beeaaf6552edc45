r"""Units of likelihood: nats and bits per dimension.

Every model of discrete images in the course reports its negative log-likelihood in nats per
example and converts it with ``nats_to_bits_per_dim`` so that numbers compare across lectures:

.. math::

    \text{bits/dim} = \frac{\text{nats}}{D \ln 2},

with :math:`D` the number of dimensions (64 for the 8×8 digits, 784 for MNIST). The uniform
distribution over :math:`K` levels scores :math:`\log_2 K` bits/dim (4.09 for :math:`K = 17`).

``check_levels``, ``uniform_dequantize`` and ``dequantized_nll`` are re-exported for compatibility;
the home is ``dgmlib.dequantization`` (with the variational and importance-weighted bounds).
"""

from __future__ import annotations

import math

from torch import Tensor

# re-exported for compatibility; the home is dgmlib.dequantization
from dgmlib.dequantization import check_levels, dequantized_nll, uniform_dequantize

__all__ = ["LN2", "nats_to_bits_per_dim", "bits_per_dim_to_nats", "check_levels", "uniform_dequantize",
           "dequantized_nll"]

LN2 = math.log(2.0)


def nats_to_bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    r"""Convert a negative log-likelihood per example in nats to bits per dimension.

    :math:`\text{bits/dim} = \text{nats} / (D \ln 2)` with :math:`D` = ``num_dims`` (64 for 8x8 digits).
    Shapes: a tensor of any shape (each entry converted) or a float.

    Raises:
        ValueError: if ``num_dims`` is not a positive integer.
    """
    _check_dims(num_dims)
    return nats / (num_dims * LN2)


def bits_per_dim_to_nats(bits_per_dim: Tensor | float, num_dims: int) -> Tensor | float:
    r"""Convert bits per dimension back to nats per example (inverse of ``nats_to_bits_per_dim``).

    :math:`\text{nats} = \text{bits/dim} \cdot D \ln 2` with :math:`D` = ``num_dims``; any shape, or a float.

    Raises:
        ValueError: if ``num_dims`` is not a positive integer.
    """
    _check_dims(num_dims)
    return bits_per_dim * num_dims * LN2


def _check_dims(num_dims: int) -> None:
    if not isinstance(num_dims, int) or num_dims <= 0:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
