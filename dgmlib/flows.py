"""Normalizing flows: bijections, their composition, and flow models.

The direction is **data -> latent** everywhere:

* ``forward(x) -> (z, log_det)`` with ``log_det = log |det dz/dx|`` of shape ``(B,)``;
* ``inverse(z) -> (x, log_det)`` with ``log_det = log |det dx/dz|`` of shape ``(B,)``;

so the change of variables reads ``log p(x) = log N(z; 0, I) + log_det`` (Dinh et al. 2017,
RealNVP, Eq. 3). All log-densities are in nats.

Sources: Rezende & Mohamed 2015 (planar, Eq. 10-12 and App. A.1); Dinh et al. 2015 (NICE,
additive coupling Eq. 5 and the scaling layer Sec. 3.3); Dinh et al. 2017 (RealNVP, affine
coupling Eq. 4-9, logit pre-processing Sec. 4.1, multi-scale architecture Sec. 3.6); Kingma &
Dhariwal 2018 (Glow: actnorm, invertible 1x1 convolution and its LU form, Sec. 3.1-3.2 and Table 1).

Most bijections keep the shape of their input. ``Squeeze`` does not: it maps ``(C, H, W)`` to
``(4C, H/2, W/2)``. Every bijection therefore has an ``event_shape`` (what it takes) and an
``out_shape`` (what it returns; equal to ``event_shape`` unless said otherwise), and ``Compose``
checks that consecutive shapes chain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgmlib.device import module_device, module_dtype, randn, value_checks
from dgmlib.dequantization import VariationalDequantizer, dequantized_nll, variational_dequantization_nll

__all__ = [
    "Bijection", "Compose", "Planar", "AdditiveCoupling", "AffineCoupling", "Scaling",
    "Permutation", "Logit", "MLPConditioner", "ConvConditioner", "Flow", "checkerboard_mask", "channel_mask",
    "check_batch", "realnvp", "nice", "planar_flow", "jacobian_log_det",
    "ActNorm", "InvConv1x1", "Squeeze", "Inverse", "Split", "GlowStep", "glow",
]


def check_batch(x: Tensor, event_shape: Sequence[int], name: str = "input") -> None:
    """Check that ``x`` is a finite floating batch of shape ``(B, *event_shape)``.

    Raises:
        TypeError: if ``x`` is not a tensor or not floating point (e.g. integer pixel levels).
        ValueError: if the shape is not ``(B, *event_shape)`` or ``x`` holds NaN or inf.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype} "
                        "(convert with .float(); dequantize integer data first)")
    event_shape = tuple(event_shape)
    if x.dim() != len(event_shape) + 1 or tuple(x.shape[1:]) != event_shape:
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, event_shape))}), "
                         f"got {tuple(x.shape)}")
    if value_checks(x) and not torch.isfinite(x).all():  # values are read only where that is cheap and possible
        raise ValueError(f"{name} contains NaN or inf")


class Bijection(nn.Module):
    """Base class of an invertible map on batches of shape ``(B, *event_shape)``.

    Subclasses implement ``forward(x) -> (z, log|det dz/dx|)`` and
    ``inverse(z) -> (x, log|det dx/dz|)``; both log-dets have shape ``(B,)``. ``x`` has shape
    ``(B, *event_shape)`` and ``z`` shape ``(B, *out_shape)``; ``out_shape`` is ``event_shape``
    unless a subclass (``Squeeze``) changes it. Both hold the same number of entries.
    """

    def __init__(self, event_shape: Sequence[int]) -> None:
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        if not self.event_shape or any(s < 1 for s in self.event_shape):
            raise ValueError(f"event_shape must be a non-empty tuple of positive sizes, got {event_shape!r}")
        self.out_shape = self.event_shape

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102 - documented on the class
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102 - documented on the class
        raise NotImplementedError


class Compose(Bijection):
    """Composition ``f_K o ... o f_1`` of bijections, applied to data in the order given.

    ``forward`` sums the log-dets starting from ``x.new_zeros(B)``; ``inverse`` runs the
    inverses in reverse order. Shapes: ``(B, *event_shape)`` in (the first transform's),
    ``(B, *out_shape)`` out (the last one's), log-det ``(B,)``.

    Raises:
        ValueError: if empty or if the event shapes do not chain (each transform must take the
        shape that the one before it returns).
    """

    def __init__(self, *transforms: Bijection) -> None:
        if not transforms:
            raise ValueError("Compose needs at least one bijection")
        super().__init__(transforms[0].event_shape)
        shape = self.event_shape
        for t in transforms:
            if not isinstance(t, Bijection):
                raise TypeError(f"Compose takes Bijection instances, got {type(t).__name__}")
            if t.event_shape != shape:
                raise ValueError(f"event shapes must chain: {type(t).__name__} takes {t.event_shape}, "
                                 f"but receives {shape}")
            shape = t.out_shape
        self.out_shape = shape
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to latent through every transform; return ``(z, log_det)``."""
        log_det = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map latent to data through the inverses in reverse order; return ``(x, log_det)``."""
        log_det = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ld = t.inverse(z)
            log_det = log_det + ld
        return z, log_det


class Planar(Bijection):
    """Planar flow ``z = x + u_hat * tanh(w^T x + b)`` on vectors of shape ``(B, D)``.

    ``log|det dz/dx| = log|1 + u_hat^T w tanh'(w^T x + b)|`` (matrix determinant lemma), computed
    without cancellation as ``log(tanh^2 + tanh' softplus(w^T u))`` since ``w^T u_hat = softplus(w^T u) - 1``.
    Invertibility needs ``w^T u_hat >= -1``; the raw parameter ``u`` is projected to
    ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2`` with ``m(a) = -1 + softplus(a)`` so it always
    holds (Rezende & Mohamed 2015, Eq. 10-12 and App. A.1). There is no closed-form inverse,
    but along ``w`` it reduces to the increasing scalar equation ``a + (w^T u_hat) tanh(a) = w^T z + b``,
    which ``inverse`` solves by bisection in float64.

    Raises:
        ValueError: for a bad ``dim``; TypeError/ValueError on bad input (see ``check_batch``).
    """

    def __init__(self, dim: int, init_scale: float = 0.1) -> None:
        super().__init__((dim,))
        self.w = nn.Parameter(init_scale * torch.randn(dim))
        self.u = nn.Parameter(init_scale * torch.randn(dim))
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        """The constrained ``u`` that guarantees ``w^T u_hat > -1`` (shape ``(D,)``)."""
        wu = self.w @ self.u
        return self.u + (F.softplus(wu) - 1 - wu) * self.w / (self.w @ self.w).clamp_min(1e-12)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``z = x + u_hat tanh(w^T x + b)`` and ``log|det dz/dx|``, shapes ``(B, D)``, ``(B,)``."""
        check_batch(x, self.event_shape)
        u_hat = self.u_hat()
        a = x @ self.w + self.b  # (B,)
        z = x + torch.tanh(a)[:, None] * u_hat  # (B, D)
        return z, self._log_det(a)

    def _log_det(self, a: Tensor) -> Tensor:
        """``log(1 + h'(a) w^T u_hat)`` without cancellation, shape ``(B,)``.

        ``w^T u_hat = softplus(w^T u) - 1`` exactly, so with ``h' = 1 - tanh^2`` the argument is
        ``tanh(a)^2 + h'(a) softplus(w^T u)``: a sum of two non-negative terms. Computing
        ``1 + h' (w^T u_hat)`` instead loses everything once ``w^T u_hat`` rounds to -1 (float32,
        ``w^T u`` below about -17) and gives -inf.
        """
        tanh2 = torch.tanh(a) ** 2
        return torch.log(tanh2 + (1 - tanh2) * F.softplus(self.w @ self.u))

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Invert by bisection on ``a = w^T x + b``; return ``x`` ``(B, D)`` and ``log|det dx/dz|`` ``(B,)``."""
        check_batch(z, self.event_shape)
        u_hat = self.u_hat()
        c = self.w @ u_hat  # () ; > -1, so g(a) = a + c tanh(a) is increasing
        r = z @ self.w + self.b  # (B,) ; solve g(a) = r
        with torch.no_grad():
            c64, r64 = c.double(), r.double()
            lo, hi = r64 - c64.abs() - 1, r64 + c64.abs() + 1  # |a - r| <= |c| brackets the root
            for _ in range(80):  # 80 halvings shrink the bracket below float64 resolution
                mid = (lo + hi) / 2
                too_big = mid + c64 * torch.tanh(mid) > r64
                hi = torch.where(too_big, mid, hi)
                lo = torch.where(too_big, lo, mid)
            a0 = ((lo + hi) / 2).to(z.dtype)
        # One Newton step with gradients on: at the root it changes nothing numerically but gives
        # the exact derivatives da/dr = 1/g'(a), da/dc = -tanh(a)/g'(a) (implicit function theorem).
        a = a0 - (a0 + c * torch.tanh(a0) - r) / (1 + c * (1 - torch.tanh(a0) ** 2))
        x = z - torch.tanh(a)[:, None] * u_hat
        return x, -self._log_det(a)


class AdditiveCoupling(Bijection):
    """NICE additive coupling: ``z = x + (1 - m) * net(m * x)``, volume preserving (log-det 0).

    Args:
        mask: binary tensor of the event shape; entries with ``m = 1`` pass through unchanged.
        net: maps ``(B, *event_shape)`` to ``(B, *event_shape)``.

    Source: Dinh et al. 2015 (NICE), Eq. 5. Shapes: ``(B, *event_shape)``, log-det ``(B,)``.
    """

    def __init__(self, mask: Tensor, net: nn.Module) -> None:
        super().__init__(mask.shape)
        self.register_buffer("mask", _check_mask(mask))
        self.net = net

    def _shift(self, x: Tensor) -> Tensor:
        t = self.net(self.mask * x)
        if t.shape != x.shape:
            raise ValueError(f"coupling net must return shape {tuple(x.shape)}, got {tuple(t.shape)}")
        return (1 - self.mask) * t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x + (1 - m) net(m x), zeros(B))``."""
        check_batch(x, self.event_shape)
        return x + self._shift(x), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(z - (1 - m) net(m z), zeros(B))``; ``m z = m x`` makes this exact."""
        check_batch(z, self.event_shape)
        return z - self._shift(z), z.new_zeros(z.shape[0])


class AffineCoupling(Bijection):
    """RealNVP affine coupling (Dinh et al. 2017, Eq. 9), data -> latent:

        z = m * x + (1 - m) * (x * exp(s(m * x)) + t(m * x)),   log|det dz/dx| = sum((1 - m) * s).

    The Jacobian is triangular (after permuting masked entries first), so its log-det is the sum
    of the log-scales. The network returns ``(B, 2, *event_shape)`` (raw scale, shift); the
    log-scale is bounded smoothly to ``(-scale_bound, scale_bound)`` by ``b * tanh(raw / b)``
    so that training cannot blow up.

    Args:
        mask: binary tensor of the event shape, e.g. ``checkerboard_mask`` or ``channel_mask``.
        net: maps ``(B, *event_shape)`` to ``(B, 2, *event_shape)``, e.g. ``MLPConditioner``.
        scale_bound: positive bound on ``|s|``.

    Raises:
        ValueError: for a non-binary mask, a non-positive bound, or a net output of wrong shape;
        TypeError/ValueError on bad input (see ``check_batch``).
    """

    def __init__(self, mask: Tensor, net: nn.Module, scale_bound: float = 3.0) -> None:
        super().__init__(mask.shape)
        if scale_bound <= 0:
            raise ValueError(f"scale_bound must be positive, got {scale_bound}")
        self.register_buffer("mask", _check_mask(mask))
        self.net = net
        self.scale_bound = float(scale_bound)

    def scale_and_shift(self, x_masked: Tensor) -> tuple[Tensor, Tensor]:
        """Return the bounded log-scale ``s`` and shift ``t``, zero where ``m = 1``, each ``(B, *event)``."""
        h = self.net(x_masked)
        expected = (x_masked.shape[0], 2, *self.event_shape)
        if tuple(h.shape) != expected:
            raise ValueError(f"coupling net must return shape {expected}, got {tuple(h.shape)}")
        raw_s, t = h.unbind(1)
        s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
        return (1 - self.mask) * s, (1 - self.mask) * t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``z`` of ``x``'s shape and ``log|det dz/dx|`` of shape ``(B,)``."""
        check_batch(x, self.event_shape)
        s, t = self.scale_and_shift(self.mask * x)
        z = x * torch.exp(s) + t  # masked entries: s = t = 0, so they pass through
        return z, s.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``x = (z - t) * exp(-s)`` and ``log|det dx/dz| = -sum(s)``."""
        check_batch(z, self.event_shape)
        s, t = self.scale_and_shift(self.mask * z)  # m * z == m * x
        return (z - t) * torch.exp(-s), -s.flatten(1).sum(1)


class Scaling(Bijection):
    """NICE's diagonal scaling layer ``z = x * exp(s)`` with a learned ``s`` of the event shape.

    ``log|det dz/dx| = sum(s)``, the same for every example (Dinh et al. 2015, Sec. 3.3).
    """

    def __init__(self, event_shape: Sequence[int]) -> None:
        super().__init__(event_shape)
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x * exp(s), sum(s))`` with log-det expanded to ``(B,)``."""
        check_batch(x, self.event_shape)
        return x * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(z * exp(-s), -sum(s))``."""
        check_batch(z, self.event_shape)
        return z * torch.exp(-self.log_scale), -self.log_scale.sum().expand(z.shape[0])


class Permutation(Bijection):
    """A fixed permutation of the flattened event; ``|det| = 1`` so the log-det is 0.

    Args:
        perm: a permutation of ``range(prod(event_shape))``, stored as a buffer.
        event_shape: the shape of one example.

    Raises:
        ValueError: if ``perm`` is not a permutation of the right length.
    """

    def __init__(self, perm: Tensor, event_shape: Sequence[int]) -> None:
        super().__init__(event_shape)
        perm = torch.as_tensor(perm, dtype=torch.long)
        n = math.prod(self.event_shape)
        if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
            raise ValueError(f"perm must be a permutation of range({n})")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    @classmethod
    def random(cls, event_shape: Sequence[int], seed: int = 0) -> Permutation:
        """A seeded random permutation of the event."""
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randperm(math.prod(event_shape), generator=g), event_shape)

    @classmethod
    def reverse(cls, event_shape: Sequence[int]) -> Permutation:
        """Reverse the order of the flattened event (as in NICE and RealNVP's 1D models)."""
        return cls(torch.arange(math.prod(event_shape) - 1, -1, -1), event_shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Permute: ``z.flatten(1) = x.flatten(1)[:, perm]``; log-det zeros ``(B,)``."""
        check_batch(x, self.event_shape)
        return x.flatten(1)[:, self.perm].view_as(x), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the permutation; log-det zeros ``(B,)``."""
        check_batch(z, self.event_shape)
        return z.flatten(1)[:, self.inv_perm].view_as(z), z.new_zeros(z.shape[0])


class Logit(Bijection):
    """Logit pre-processing for data in [0, 1]: ``z = logit(alpha + (1 - 2 alpha) x)``.

    The squeeze by ``alpha`` keeps ``z`` finite at the boundary. The log-det is counted:
    ``log|det dz/dx| = sum(log(1 - 2 alpha) - log p - log(1 - p))`` with
    ``p = alpha + (1 - 2 alpha) x`` (Dinh et al. 2017, Sec. 4.1, alpha = 0.05).

    Raises:
        ValueError: for ``alpha`` outside [0, 0.5) or input outside [0, 1].
    """

    def __init__(self, event_shape: Sequence[int], alpha: float = 0.05) -> None:
        super().__init__(event_shape)
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``x`` in [0, 1] to logit space; return ``(z, log_det)``."""
        check_batch(x, self.event_shape)
        if value_checks(x) and (x.min() < 0 or x.max() > 1):
            raise ValueError("Logit expects data in [0, 1]; dequantize and divide by the number of levels first")
        p = self.alpha + (1 - 2 * self.alpha) * x
        z = torch.log(p) - torch.log1p(-p)
        log_det = math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)
        return z, log_det.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map logits back to [0, 1]; ``log|det dx/dz| = sum(log sigmoid(z) + log sigmoid(-z)) - D log(1-2a)``."""
        check_batch(z, self.event_shape)
        x = (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)
        log_det = F.logsigmoid(z) + F.logsigmoid(-z) - math.log(1 - 2 * self.alpha)
        return x, log_det.flatten(1).sum(1)


class MLPConditioner(nn.Module):
    """Coupling network: flatten ``(B, *event_shape)``, MLP, reshape to ``(B, out_channels, *event_shape)``.

    The last layer starts at zero, so a fresh coupling is the identity (as in Glow, Sec. 3.3).
    Set ``out_channels=2`` for ``AffineCoupling`` (scale, shift) and ``1`` with
    ``squeeze_out=True`` for ``AdditiveCoupling``.
    """

    def __init__(self, event_shape: Sequence[int], hidden: int = 256, num_layers: int = 2,
                 out_channels: int = 2, squeeze_out: bool = False) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.out_channels = out_channels
        self.squeeze_out = squeeze_out
        d = math.prod(self.event_shape)
        layers: list[nn.Module] = []
        width = d
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.01)]
            width = hidden
        last = nn.Linear(width, out_channels * d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, *event)`` -> ``(B, out_channels, *event)`` (or ``(B, *event)`` when squeezing)."""
        h = self.net(x.flatten(1))  # (B, out_channels * D)
        h = h.view(x.shape[0], self.out_channels, *self.event_shape)
        return h.squeeze(1) if self.squeeze_out else h


class ConvConditioner(nn.Module):
    """Convolutional coupling network for images: ``(B, C, H, W) -> (B, out_channels, C, H, W)``.

    Three 3x3 convolutions with ``hidden`` channels and padding 1, so the spatial size is kept;
    weights are shared across positions, which generalises far better than an MLP on small data
    (RealNVP, Sec. 3.4, uses deeper ResNets of this kind). The last convolution starts at zero.
    """

    def __init__(self, channels: int, hidden: int = 64, out_channels: int = 2) -> None:
        super().__init__()
        self.channels, self.out_channels = channels, out_channels
        last = nn.Conv2d(hidden, out_channels * channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.LeakyReLU(0.01),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.01),
            last,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, out_channels, C, H, W)``."""
        h = self.net(x)  # (B, out_channels * C, H, W)
        return h.view(x.shape[0], self.out_channels, self.channels, *x.shape[2:])


def _check_image_shape(event_shape: Sequence[int], who: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in event_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"{who} needs an image event shape (C, H, W) of positive sizes, got {tuple(event_shape)}")
    return shape  # type: ignore[return-value]


class ActNorm(Bijection):
    """Glow's activation normalisation: a per-channel affine map ``z = s * x + b`` on images.

    With ``s = exp(log_scale)`` and ``b`` of shape ``(C,)``, broadcast over the ``H x W`` positions,
    the Jacobian is diagonal and every channel's scale appears once per position:

        log|det dz/dx| = H * W * sum_c log|s_c|   (nats; Kingma & Dhariwal 2018, Sec. 3.1, Table 1).

    **Data-dependent initialisation** (Sec. 3.1): the first ``forward`` in training mode sets
    ``s_c = 1 / std_c`` and ``b_c = -mean_c / std_c`` from that batch (statistics over the batch and
    the positions), so the output of each channel has zero mean and unit variance; afterwards ``s``
    and ``b`` are ordinary trainable parameters. Whether this has happened is the registered
    boolean buffer ``initialized``, so it travels with ``state_dict``: a loaded checkpoint is
    never initialised again. Before initialisation (or in eval mode) the layer is whatever its
    parameters say, the identity for a fresh layer.

    A channel that is constant in the first batch has ``std_c = 0``; the std is floored at
    ``min_std`` so that the scale stays finite (``<= 1 / min_std``) and nothing becomes NaN.

    The initialisation reads no value on the host (it is a ``torch.where`` on the flag), so the
    layer runs on the ``meta`` device and on a GPU without a synchronisation.

    Args:
        event_shape: ``(C, H, W)``.
        min_std: floor on the per-channel std used by the initialisation (positive).

    Shapes: ``(B, C, H, W)`` in and out; log-det ``(B,)`` in nats.

    Raises:
        ValueError: for a shape that is not ``(C, H, W)`` or a non-positive ``min_std``;
        TypeError/ValueError on bad input (see ``check_batch``).
    """

    def __init__(self, event_shape: Sequence[int], min_std: float = 1e-2) -> None:
        c, _, _ = _check_image_shape(event_shape, "ActNorm")
        super().__init__(event_shape)
        if min_std <= 0:
            raise ValueError(f"min_std must be positive, got {min_std}")
        self.min_std = float(min_std)
        self.log_scale = nn.Parameter(torch.zeros(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._flag_seen = False  # a cache of the buffer, so that the check runs once, not every step

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # a loaded flag must be looked at again
        super()._load_from_state_dict(*args, **kwargs)
        self._flag_seen = False

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``s, b`` so that each channel of ``s * x + b`` has zero mean and unit variance over the
        batch ``x`` ``(B, C, H, W)``, unless the ``initialized`` flag is already set; then set it."""
        mean = x.mean(dim=(0, 2, 3))  # (C,)
        std = x.var(dim=(0, 2, 3), unbiased=False).sqrt().clamp_min(self.min_std)  # (C,), floored
        done = self.initialized
        self.log_scale.copy_(torch.where(done, self.log_scale, -torch.log(std)))
        self.bias.copy_(torch.where(done, self.bias, -mean / std))
        self.initialized.fill_(True)
        self._flag_seen = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``z = s * x + b`` ``(B, C, H, W)`` and ``H W sum(log|s|)`` expanded to ``(B,)``."""
        check_batch(x, self.event_shape)
        if self.training and not self._flag_seen:
            self.initialize(x)
        h, w = self.event_shape[1:]
        z = x * torch.exp(self.log_scale)[:, None, None] + self.bias[:, None, None]
        return z, (h * w * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``x = (z - b) / s`` and ``log|det dx/dz| = -H W sum(log|s|)``."""
        check_batch(z, self.event_shape)
        h, w = self.event_shape[1:]
        x = (z - self.bias[:, None, None]) * torch.exp(-self.log_scale)[:, None, None]
        return x, (-h * w * self.log_scale.sum()).expand(z.shape[0])


class InvConv1x1(Bijection):
    """Glow's invertible 1x1 convolution: the same ``C x C`` matrix ``W`` mixes the channels at every
    position, ``z[:, :, i, j] = W x[:, :, i, j]`` (Kingma & Dhariwal 2018, Sec. 3.2, Table 1).

    It generalises the fixed channel permutation between couplings to a learned one. Each of the
    ``H W`` positions contributes ``log|det W|``:

        log|det dz/dx| = H * W * log|det W|   (nats).

    * ``lu=False``: ``W`` is a free parameter and ``log|det W|`` comes from ``torch.linalg.slogdet``,
      an ``O(C^3)`` computation.
    * ``lu=True``: the LU parametrisation of Sec. 3.2, ``W = P L (U + diag(sign(s) exp(log|s|)))``,
      with ``P`` a fixed permutation (a buffer), ``L`` unit lower triangular and ``U`` strictly upper
      triangular (learned), the signs fixed and ``log|s|`` learned. Then ``det W = det P * prod(s)``
      with ``|det P| = 1``, so ``log|det W| = sum log|s|``, an ``O(C)`` computation.

    Both start from the same kind of point: a random rotation (the ``Q`` of the QR decomposition of
    a Gaussian matrix), so the log-det is 0 at initialisation. The inverse uses ``W^{-1}``.

    Args:
        event_shape: ``(C, H, W)``.
        lu: use the LU parametrisation.

    Shapes: ``(B, C, H, W)`` in and out; log-det ``(B,)`` in nats.

    Raises:
        ValueError: for a shape that is not ``(C, H, W)``; TypeError/ValueError on bad input.
    """

    def __init__(self, event_shape: Sequence[int], lu: bool = False) -> None:
        c, _, _ = _check_image_shape(event_shape, "InvConv1x1")
        super().__init__(event_shape)
        self.lu = bool(lu)
        rotation = torch.linalg.qr(torch.randn(c, c))[0]  # orthogonal: |det| = 1
        if not self.lu:
            self.weight = nn.Parameter(rotation)
            return
        p, lower, upper = torch.linalg.lu(rotation)  # rotation = P L U
        s = torch.diagonal(upper)
        self.register_buffer("P", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("eye", torch.eye(c))
        self.lower = nn.Parameter(lower)  # only the strictly lower part is used
        self.upper = nn.Parameter(upper)  # only the strictly upper part is used
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def matrix(self) -> Tensor:
        """The ``C x C`` matrix ``W`` (for ``lu=True``, assembled from ``P, L, U, s``)."""
        if not self.lu:
            return self.weight
        lower = torch.tril(self.lower, -1) + self.eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.P @ lower @ upper

    def log_abs_det(self) -> Tensor:
        """``log|det W|`` (a scalar, nats): ``slogdet`` for the plain form, ``sum(log|s|)`` for LU."""
        return self.log_s.sum() if self.lu else torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``z = W x`` at every position ``(B, C, H, W)`` and ``H W log|det W|`` ``(B,)``."""
        check_batch(x, self.event_shape)
        h, w = self.event_shape[1:]
        z = torch.einsum("ij,bjhw->bihw", self.matrix(), x)
        return z, (h * w * self.log_abs_det()).expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``x = W^{-1} z`` and ``-H W log|det W|``."""
        check_batch(z, self.event_shape)
        h, w = self.event_shape[1:]
        x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.matrix()), z)
        return x, (-h * w * self.log_abs_det()).expand(z.shape[0])


class Squeeze(Bijection):
    """Space-to-depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, each ``2 x 2`` block of a channel
    becoming 4 channels at one position (Dinh et al. 2017, Sec. 3.6; Glow, Sec. 3 and Fig. 2b).

    Output channel ``4c + 2a + b`` at position ``(i, j)`` holds input channel ``c`` at ``(2i + a, 2j + b)``.
    It only rearranges entries (a permutation, computed by ``torch.nn.functional.pixel_unshuffle``),
    so ``log|det| = 0``. It lets a coupling's
    channel mask, and a 1x1 convolution, mix neighbouring pixels.

    Args:
        event_shape: ``(C, H, W)`` with ``H`` and ``W`` even; ``out_shape`` is ``(4C, H/2, W/2)``.

    Raises:
        ValueError: for a shape that is not ``(C, H, W)`` or an odd ``H`` or ``W``;
        TypeError/ValueError on bad input (see ``check_batch``).
    """

    def __init__(self, event_shape: Sequence[int]) -> None:
        c, h, w = _check_image_shape(event_shape, "Squeeze")
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs an even height and width, got (C, H, W) = {(c, h, w)}")
        super().__init__(event_shape)
        self.out_shape = (4 * c, h // 2, w // 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (B, 4C, H/2, W/2)``; log-det zeros ``(B,)``."""
        check_batch(x, self.event_shape)
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])  # (B, 4C, H/2, W/2)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 4C, H/2, W/2) -> (B, C, H, W)``; log-det zeros ``(B,)``."""
        check_batch(z, self.out_shape)
        return F.pixel_shuffle(z, 2), z.new_zeros(z.shape[0])  # (B, C, H, W)


class Inverse(Bijection):
    """The inverse ``f^{-1}`` of a bijection ``f``, as a bijection: ``forward`` is ``f.inverse`` and
    ``inverse`` is ``f.forward`` (the two log-dets are already those of the respective maps).

    ``event_shape`` is ``f.out_shape`` and ``out_shape`` is ``f.event_shape``; e.g.
    ``Inverse(Squeeze((C, H, W)))`` is depth-to-space, ``(4C, H/2, W/2) -> (C, H, W)``.

    Raises:
        TypeError: if ``f`` is not a ``Bijection``.
    """

    def __init__(self, bijection: Bijection) -> None:
        if not isinstance(bijection, Bijection):
            raise TypeError(f"Inverse takes a Bijection, got {type(bijection).__name__}")
        super().__init__(bijection.out_shape)
        self.out_shape = bijection.event_shape
        self.bijection = bijection

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``f^{-1}(x)`` and its log-det ``(B,)``."""
        return self.bijection.inverse(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``f(z)`` and its log-det ``(B,)``."""
        return self.bijection(z)


class Split(Bijection):
    """The multi-scale split: factor out half of the channels, transform the other half further.

    With ``x = (x_1, x_2)`` split along the channels into two halves of ``C/2`` channels,

        z = (x_1, inner(x_2)),   log|det dz/dx| = log|det d inner(x_2) / dx_2|.

    The Jacobian is block diagonal (identity, inner's Jacobian), so the log-det is the inner one.
    The factored-out half ``x_1`` goes straight to the base density, as part of ``z``: the deeper
    layers, which squeeze further, spend their computation on only half of the dimensions
    (Dinh et al. 2017, Sec. 3.6; Glow, Sec. 3 and Fig. 2b). This keeps the Bijection API: the whole
    is still a bijection of the full ``(C, H, W)`` tensor with a tractable log-det, and
    ``Flow``'s standard normal on all of ``z`` is the same as a standard normal on each factored-out
    part. (Glow itself conditions the prior of ``x_1`` on ``x_2`` by a learned network; here the
    prior of every factored-out part is ``N(0, I)``, as in RealNVP.)

    Args:
        inner: a shape-preserving bijection on ``(C/2, H, W)``, e.g. the next level of a Glow.

    Shapes: ``(B, C, H, W)`` in and out with ``C = 2 * inner.event_shape[0]``; log-det ``(B,)``.

    Raises:
        ValueError: if ``inner`` does not keep its ``(C/2, H, W)`` shape;
        TypeError/ValueError on bad input (see ``check_batch``).
    """

    def __init__(self, inner: Bijection) -> None:
        if not isinstance(inner, Bijection):
            raise TypeError(f"Split takes a Bijection, got {type(inner).__name__}")
        if len(inner.event_shape) != 3 or inner.out_shape != inner.event_shape:
            raise ValueError("Split needs an inner bijection that maps (C/2, H, W) to itself, got "
                             f"{inner.event_shape} -> {inner.out_shape}")
        half, h, w = inner.event_shape
        super().__init__((2 * half, h, w))
        self.half = half
        self.inner = inner

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x_1, inner(x_2))`` concatenated on the channels and inner's log-det ``(B,)``."""
        check_batch(x, self.event_shape)
        z2, log_det = self.inner(x[:, self.half:])
        return torch.cat([x[:, :self.half], z2], dim=1), log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(z_1, inner^{-1}(z_2))`` and inner's inverse log-det ``(B,)``."""
        check_batch(z, self.event_shape)
        x2, log_det = self.inner.inverse(z[:, self.half:])
        return torch.cat([z[:, :self.half], x2], dim=1), log_det


class GlowStep(Compose):
    """One step of Glow's flow: actnorm, then an invertible 1x1 convolution, then an affine coupling
    (Kingma & Dhariwal 2018, Sec. 3 and Fig. 2a).

    The coupling is ``AffineCoupling`` with a ``channel_mask`` (the first half of the channels is
    kept, the second half scaled and shifted) and a ``ConvConditioner`` whose last layer starts at
    zero, so a fresh step is actnorm followed by a rotation. Because the 1x1 convolution learns how
    to mix the channels, no fixed permutation is needed between steps (Sec. 3.2).

    Args:
        event_shape: ``(C, H, W)`` with ``C >= 2`` (squeeze first for one-channel images).
        hidden: channels of the coupling's convolutional network.
        lu: use the LU-decomposed 1x1 convolution.
        parity: which half of the channels the coupling keeps (0: the first).

    Shapes: ``(B, C, H, W)`` in and out; log-det ``(B,)`` in nats, the sum of the three.

    Raises:
        ValueError: for a shape that is not ``(C, H, W)`` or has ``C < 2``.
    """

    def __init__(self, event_shape: Sequence[int], hidden: int = 64, lu: bool = True, parity: int = 0) -> None:
        c, _, _ = _check_image_shape(event_shape, "GlowStep")
        super().__init__(ActNorm(event_shape), InvConv1x1(event_shape, lu=lu),
                         AffineCoupling(channel_mask(event_shape, parity), ConvConditioner(c, hidden)))


class Flow(nn.Module):
    """A normalizing flow ``z = f(x)`` with a standard normal base: ``log p(x) = log N(f(x)) + log_det``.

    Args:
        transform: the bijection ``f`` (data -> latent).
        num_levels: if the data are discrete levels ``{0..K-1}``, ``K``; enables ``nll``, which
            uses the uniform-dequantization bound on ``x = (y + u) / K``.
        dequantizer: optional ``q(u | y)`` (e.g. ``dequantization.VariationalDequantizer``), trained
            with the flow; ``nll`` is then the variational-dequantization bound (Flow++, Sec. 3.1).

    Shapes: data ``(B, *event_shape)``, latents ``(B, *latent_shape)`` (the transform's
    ``out_shape``; the same as ``event_shape`` for every builder here); log-probs ``(B,)`` in nats.
    """

    def __init__(self, transform: Bijection, num_levels: int | None = None,
                 dequantizer: nn.Module | None = None) -> None:
        super().__init__()
        if dequantizer is not None and num_levels is None:
            raise ValueError("a dequantizer needs discrete data: give num_levels=K as well")
        self.transform = transform
        self.dequantizer = dequantizer
        self.event_shape = transform.event_shape
        self.latent_shape = transform.out_shape
        self.num_dims = math.prod(self.event_shape)
        self.num_levels = num_levels

    def base_log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; 0, I)`` in nats, shape ``(B,)``."""
        return -0.5 * (z.flatten(1) ** 2).sum(1) - 0.5 * self.num_dims * math.log(2 * math.pi)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` in nats by the change of variables, shape ``(B,)``.

        Raises:
            TypeError/ValueError: for input of the wrong type, shape, or with NaN (see ``check_batch``).
        """
        check_batch(x, self.event_shape)
        z, log_det = self.transform(x)
        return self.base_log_prob(z) + log_det

    def nll(self, y: Tensor) -> Tensor:
        """Dequantization bound on ``-log P(y)`` for discrete levels ``y``, nats per example ``(B,)``.

        The uniform bound ``E_u[-log p((y+u)/K)] + D log K``, or with a ``dequantizer`` the variational
        bound ``E_q[-log p((y+u)/K) + log q(u|y)] + D log K`` (Flow++, Eq. 5); one noise draw.

        Raises:
            ValueError: if the flow was built without ``num_levels`` or ``y`` is not valid levels.
        """
        if self.num_levels is None:
            raise ValueError("nll needs discrete data: build the Flow with num_levels=K")
        if self.dequantizer is None:
            return dequantized_nll(self.log_prob, y, self.num_levels)
        return variational_dequantization_nll(self.log_prob, y, self.num_levels, self.dequantizer)

    def encode(self, x: Tensor) -> Tensor:
        """Latent code ``z = f(x)`` of data ``x``, shape ``(B, *latent_shape)``."""
        check_batch(x, self.event_shape)
        return self.transform(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """Data ``x = f^{-1}(z)`` of latents ``z`` ``(B, *latent_shape)``, shape ``(B, *event_shape)``."""
        check_batch(z, self.latent_shape, "latent")
        return self.transform.inverse(z)[0]

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples ``f^{-1}(T * eps)``, ``eps ~ N(0, I)``: shape ``(n, *event_shape)``.

        A temperature ``T < 1`` trades diversity for quality (Kingma & Dhariwal 2018, Glow, Sec. 6 and Fig. 8).

        Raises:
            ValueError: if ``n < 1`` or ``temperature < 0``.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {temperature}")
        eps = randn((n, *self.latent_shape), device=module_device(self), dtype=module_dtype(self), generator=generator)
        return self.decode(temperature * eps)


def checkerboard_mask(shape: Sequence[int], parity: int = 0) -> Tensor:
    """RealNVP's checkerboard mask of shape ``(C, H, W)``: 1 where ``(i + j + parity)`` is even.

    Raises:
        ValueError: unless ``shape`` is ``(C, H, W)`` and parity is 0 or 1.
    """
    if len(shape) != 3 or parity not in (0, 1):
        raise ValueError(f"checkerboard_mask needs shape (C, H, W) and parity 0/1, got {shape}, {parity}")
    c, h, w = shape
    ij = torch.arange(h)[:, None] + torch.arange(w)[None, :]
    return ((ij + parity) % 2 == 0).float().expand(c, h, w).clone()


def channel_mask(shape: Sequence[int], parity: int = 0) -> Tensor:
    """RealNVP's channel-wise mask of shape ``(C, H, W)``: the first ``C // 2`` channels are 1 (parity 0).

    Raises:
        ValueError: unless ``shape`` is ``(C, H, W)`` with ``C >= 2`` and parity is 0 or 1.
    """
    if len(shape) != 3 or shape[0] < 2 or parity not in (0, 1):
        raise ValueError(f"channel_mask needs shape (C, H, W) with C >= 2 and parity 0/1, got {shape}, {parity}")
    c, h, w = shape
    mask = torch.zeros(c, h, w)
    mask[: c // 2] = 1.0
    return 1.0 - mask if parity else mask


def realnvp(event_shape: Sequence[int] = (1, 8, 8), num_couplings: int = 8, hidden: int = 64,
            num_levels: int | None = 17, alpha: float = 0.01) -> Flow:
    """RealNVP for images in [0, 1]: logit pre-processing, then affine couplings with
    alternating checkerboard masks and convolutional conditioners (Dinh et al. 2017, Sec. 3-4).

    Args:
        event_shape: ``(C, H, W)``, e.g. ``(1, 8, 8)`` for digits.
        num_couplings: number of affine couplings (mask parities alternate).
        hidden: channels of each ``ConvConditioner``.
        num_levels: ``K`` for discrete data (enables ``Flow.nll``), or None.
        alpha: logit squeeze. The paper's 0.05 suits 256 levels; with the digits' 17 levels a
            smaller squeeze fits better (91.0 against 93.1 nats/image in our runs).
    """
    couplings = [AffineCoupling(checkerboard_mask(event_shape, k % 2), ConvConditioner(event_shape[0], hidden))
                 for k in range(num_couplings)]
    return Flow(Compose(Logit(event_shape, alpha), *couplings), num_levels=num_levels)


def nice(event_shape: Sequence[int] = (1, 8, 8), num_couplings: int = 4, hidden: int = 256,
         num_layers: int = 3, num_levels: int | None = 17, alpha: float = 0.01) -> Flow:
    """NICE for images in [0, 1]: logit, additive couplings with alternating checkerboard masks,
    and the final diagonal scaling layer (Dinh et al. 2015, Sec. 3-5; our masks, their 4 couplings).
    """
    couplings = [AdditiveCoupling(checkerboard_mask(event_shape, k % 2),
                                  MLPConditioner(event_shape, hidden, num_layers, 1, squeeze_out=True))
                 for k in range(num_couplings)]
    return Flow(Compose(Logit(event_shape, alpha), *couplings, Scaling(event_shape)), num_levels=num_levels)


def planar_flow(dim: int = 2, num_layers: int = 16) -> Flow:
    """A stack of ``num_layers`` planar flows on ``(B, dim)`` vectors, for 2D toy densities."""
    return Flow(Compose(*[Planar(dim) for _ in range(num_layers)]))


def glow(event_shape: Sequence[int] = (1, 8, 8), num_levels: int | None = 17, levels: int = 2,
         steps_per_level: int = 4, hidden: int = 64, lu: bool = True, alpha: float = 0.01,
         dequantization: str = "variational", dequantizer_hidden: int = 32) -> Flow:
    """Glow's multi-scale architecture for images in [0, 1] (Kingma & Dhariwal 2018, Sec. 3, Fig. 2b).

    Logit pre-processing (as in ``realnvp``), then ``levels`` levels. Level ``l`` squeezes,
    applies ``steps_per_level`` Glow steps and, unless it is the last, factors out half of the
    channels with ``Split`` and hands the other half to level ``l + 1``. For the digits with the
    defaults: ``(1, 8, 8)`` -squeeze-> ``(4, 4, 4)`` -4 steps-> split: 2 channels factored out, 2
    channels -squeeze-> ``(8, 2, 2)`` -4 steps.

    Every level ends with the inverse squeeze, so each level (and the whole flow) maps its shape
    to itself: the latent ``z`` has the data's shape ``(C, H, W)`` and ``Flow``'s standard normal
    base applies to it unchanged. This only rearranges where the entries of ``z`` sit (a
    permutation, log-det 0), so the density is the same as with Glow's list of factored-out
    latents, each with a ``N(0, I)`` prior (the paper learns that prior; we do not).

    Args:
        event_shape: ``(C, H, W)`` with ``H`` and ``W`` divisible by ``2 ** levels``.
        num_levels: ``K`` for discrete data (enables ``Flow.nll``), or None.
        levels: number of squeeze levels ``L`` (the paper's ``L``).
        steps_per_level: Glow steps per level (the paper's ``K``).
        hidden: channels of each coupling's ``ConvConditioner``.
        lu: LU-decomposed 1x1 convolutions.
        alpha: logit squeeze (see ``realnvp``).
        dequantization: ``"variational"`` (a ``dequantization.VariationalDequantizer`` q(u | y) with
            ``dequantizer_hidden`` channels, trained with the flow; ``nll`` is then the variational
            bound, Flow++ Sec. 3.1) or ``"uniform"``. Ignored without ``num_levels``.

    Raises:
        ValueError: for a shape that is not ``(C, H, W)``, ``levels`` or ``steps_per_level`` below 1,
        a height or width not divisible by ``2 ** levels``, or an unknown ``dequantization``.
    """
    c, h, w = _check_image_shape(event_shape, "glow")
    if dequantization not in ("variational", "uniform"):
        raise ValueError(f"dequantization must be 'variational' or 'uniform', got {dequantization!r}")
    if levels < 1 or steps_per_level < 1:
        raise ValueError(f"levels and steps_per_level must be at least 1, got {levels}, {steps_per_level}")
    if h % 2 ** levels or w % 2 ** levels:
        raise ValueError(f"glow with {levels} levels needs H and W divisible by {2 ** levels}, got {(c, h, w)}")

    def level(shape: tuple[int, int, int], remaining: int) -> Bijection:
        squeeze = Squeeze(shape)
        inner = squeeze.out_shape
        parts: list[Bijection] = [GlowStep(inner, hidden, lu) for _ in range(steps_per_level)]
        if remaining > 1:
            parts.append(Split(level((inner[0] - inner[0] // 2, *inner[1:]), remaining - 1)))
        return Compose(squeeze, *parts, Inverse(Squeeze(shape)))

    dequantizer = (VariationalDequantizer((c, h, w), num_levels, dequantizer_hidden)
                   if num_levels is not None and dequantization == "variational" else None)
    return Flow(Compose(Logit((c, h, w), alpha), level((c, h, w), levels)), num_levels=num_levels,
                dequantizer=dequantizer)


def jacobian_log_det(fn, x: Tensor) -> Tensor:
    """``log|det J|`` of ``fn`` at each example of ``x``, from ``torch.func.jacrev`` and ``slogdet``.

    The reference that every log-det is tested against; use float64 inputs (and a float64 ``fn``).

    Args:
        fn: maps ``(1, *event)`` to ``(y, ...)`` with ``y`` of shape ``(1, *event)`` (a ``forward`` or ``inverse``).
        x: ``(B, *event)`` points.

    Returns:
        ``(B,)`` log-absolute-determinants, in nats.
    """
    out = []
    for xb in x:
        jac = torch.func.jacrev(lambda v: fn(v.unsqueeze(0))[0].flatten())(xb)  # (D, *event)
        out.append(torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1])
    return torch.stack(out)


def _check_mask(mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    mask = mask.float()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be binary (0/1)")
    if mask.all() or not mask.any():
        raise ValueError("mask must keep some entries and transform others (neither all 0 nor all 1)")
    return mask
