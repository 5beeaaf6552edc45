"""Autoregressive models of discrete images: the chain rule made into networks.

Any distribution over ``D`` values factorises by the chain rule of probability, for any ordering of
the values (van den Oord et al. 2016a, "Pixel recurrent neural networks", Eq. 1):

    P(y) = prod_{i=1}^{D} P(y_{o(i)} | y_{o(1)}, ..., y_{o(i-1)}),

so a network whose output at position ``o(i)`` may look only at the inputs strictly before it in the
ordering gives all ``D`` conditionals in **one** pass, and ``log P(y)`` is their sum: an exact
log-likelihood, no bound. Here the data are integer levels ``y`` in ``{0..K-1}`` of shape ``(B, C, H, W)``
(``K = 17`` for the 8x8 digits), each conditional is a distribution over the ``K`` levels, and so the
model is a discrete distribution: ``-log P(y)`` in nats per image is exactly what the other models of
the course bound from above (no dequantization term). Sampling goes the other way, one value at a
time (``D`` passes). What the modules of this file give:

* ``made_degrees``, ``made_masks``, ``MaskedLinear``, ``MADE``: masked fully-connected layers whose
  connectivity respects an ordering (Germain et al. 2015, Eq. 12-13), with natural or random orderings,
  connectivity resampled per minibatch and the ensemble of orderings at test time (Sec. 4.3);
* ``CausalConv1d``, ``receptive_field``: WaveNet's left-padded, dilated 1-D convolutions (van den Oord et
  al. 2016c, Sec. 2.1, Fig. 3);
* ``MaskedConv2d``: the PixelCNN convolution with mask A (the first layer: the centre pixel hidden) or
  mask B (the later layers: the centre kept), van den Oord et al. 2016a, Sec. 3.5 and Fig. 4;
* ``PixelCNN``: mask A, then residual mask-B layers; it has a **blind spot** (pixels above and to the
  right that no stack of masked 3x3 kernels reaches, van den Oord et al. 2016b, Fig. 1);
* ``GatedPixelCNNLayer``, ``GatedPixelCNN``: a vertical stack (the rows above) and a horizontal stack
  (the row so far) with the gated activation ``tanh(W_f * x) ⊙ σ(W_g * x)`` and the link from the
  vertical stack into the horizontal one: no blind spot; optional class conditioning, a label embedding
  added inside the gates (van den Oord et al. 2016b, "Conditional image generation with PixelCNN
  decoders", Eq. 2-4, Fig. 2).

**Output distributions** (every model, ``output=``): ``"softmax"``, a K-way softmax over the levels
(PixelRNN Sec. 5.3), or ``"logistic_mixture"``, a mixture of ``M`` logistics discretized onto the
levels through their CDF (PixelCNN++, Salimans et al. 2017, Eq. 2; computed by
``dgmlib.dequantization.discretized_logistic_mixture_log_prob``), ``3M`` numbers per pixel instead of
``K``. Both put probability exactly 1 on the ``K`` levels. The pixels are grey (one channel), so the
colour masks of PixelRNN are not needed.

**Conditional models** (``num_classes > 0``): ``P(y | c) = prod_i P(y_i | y_<i, c)``; the class enters
every layer. With a class prior ``π`` (uniform unless ``set_class_prior``) the model is also a
distribution over images alone, ``P(y) = Σ_c π_c P(y | c)``, computed exactly with ``num_classes`` passes
when ``log_prob`` gets no labels.

Conventions: ``forward(y, labels)`` returns the network's ``P`` numbers per pixel, ``(B, P, C, H, W)``,
and accepts any real ``y`` (levels, or continuous values for a Jacobian); ``log_prob``/``nll`` take
integer levels and return ``(B,)`` nats per image; ``sample(n, temperature, labels, generator)`` returns
levels ``(n, C, H, W)`` (float). Inputs enter the networks scaled to [-1, 1]. Everything runs on the
device of the parameters; seeded noise comes from ``dgmlib.device`` so a CPU generator gives the same
samples on every device. Convert nats with ``dgmlib.units.nats_to_bits_per_dim``.

Sources: van den Oord, Kalchbrenner & Kavukcuoglu 2016a (PixelRNN/PixelCNN, Eq. 1, Sec. 3.5, Fig. 4);
van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu 2016b (gated PixelCNN, Eq. 2-4,
Fig. 1-2); van den Oord et al. 2016c (WaveNet, Sec. 2.1-2.2, Fig. 2-3); Germain, Gregor, Murray &
Larochelle 2015 (MADE, Eq. 12-13, Sec. 4.2-4.3); Salimans, Karpathy, Chen & Kingma 2017 (PixelCNN++,
Eq. 2); slides "Likelihood-based models: PixelRNN, PixelCNN & WaveNet" and Isachenko's "GatedPixelCNN".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgmlib.dequantization import check_levels, discretized_logistic_mixture_log_prob
from dgmlib.device import inputs_checked, module_device, module_dtype, rand, randint, value_checks

__all__ = [
    "OUTPUTS", "ORDERINGS", "receptive_field", "CausalConv1d", "MaskedConv2d", "made_degrees", "made_masks",
    "MaskedLinear", "AutoregressiveModel", "MADE", "PixelCNN", "vertical_mask", "horizontal_mask",
    "GatedPixelCNNLayer", "GatedPixelCNN",
]

OUTPUTS = ("softmax", "logistic_mixture")
"""The per-pixel output distributions: a K-way softmax, or PixelCNN++'s discretized logistic mixture."""
ORDERINGS = ("natural", "random")
"""MADE's orderings of the pixels: raster order, or a random permutation per mask."""


# --------------------------------------------------------------------------- checks


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_odd_kernel(kernel_size: int, name: str = "kernel_size") -> None:
    _check_positive_int(kernel_size, name)
    if kernel_size % 2 == 0:
        raise ValueError(f"{name} must be odd (a centre pixel), got {kernel_size}")


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One category per row of ``probs`` ``(n, K)`` by inverting the CDF with ``u ~ U[0, 1)``: int64 ``(n,)``.

    The uniform noise comes from ``dgmlib.device.rand``, so a seeded CPU generator gives the same draws on
    every device, and nothing reads a value (it runs on ``meta`` too)."""
    u = rand((probs.shape[0], 1), device=probs.device, dtype=probs.dtype, generator=generator)
    cdf = probs.cumsum(-1)
    return (cdf <= u * cdf[:, -1:]).sum(-1).clamp_max(probs.shape[-1] - 1)


# --------------------------------------------------------------------------- WaveNet: causal, dilated 1-D convolutions


def receptive_field(kernel_size: int, dilations: Sequence[int]) -> int:
    """How many inputs one output of a stack of causal 1-D convolutions sees: ``1 + (k - 1) Σ_l d_l``.

    Layer ``l`` (kernel ``k``, dilation ``d_l``) lets output ``t`` see its input at ``t, t - d_l, ...,
    t - (k - 1) d_l``, so it reaches ``(k - 1) d_l`` steps further back; the stack adds the reaches. With
    ``k = 2`` and dilations ``1, 2, 4, ..., 2^{L-1}`` that is ``2^L``: doubling dilations grow the receptive
    field exponentially with depth, a plain stack (all ``d = 1``) only linearly (WaveNet, Sec. 2.1, Fig. 3:
    dilations 1..512 give 1024).

    Args:
        kernel_size: ``k >= 1``. dilations: one positive integer per layer.

    Returns:
        the number of input steps ``t - r + 1 .. t`` that output ``t`` depends on.

    Raises:
        ValueError: for a non-positive kernel size or dilation.
    """
    _check_positive_int(kernel_size, "kernel_size")
    for d in dilations:
        _check_positive_int(d, "each dilation")
    return 1 + (kernel_size - 1) * sum(dilations)


class CausalConv1d(nn.Conv1d):
    """A causal, dilated 1-D convolution: output ``t`` sees inputs ``t - (k-1)d, ..., t - d, t`` only.

    A plain convolution pads both sides, so output ``t`` would see the future. Padding ``(k - 1) d``
    zeros on the **left** only keeps the length and makes every output causal (WaveNet, Sec. 2.1; the
    slides: "pad left the sequence with (kwidth - 1) zeros"). With ``include_current=False`` the output
    is also shifted one step right, so output ``t`` sees ``t - 1 - (k-1)d .. t - 1`` only: the first
    layer of an autoregressive model, the 1-D mask A.

    Shapes: ``(B, C_in, T) -> (B, C_out, T)``.

    Raises:
        ValueError: for a non-positive kernel size or dilation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 include_current: bool = True, bias: bool = True) -> None:
        _check_positive_int(kernel_size, "kernel_size")
        _check_positive_int(dilation, "dilation")
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation, bias=bias)
        self.left_padding = (kernel_size - 1) * dilation
        self.include_current = include_current

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, T) -> (B, C_out, T)``, causal."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a tensor of shape (B, C, T), got {getattr(x, 'shape', type(x).__name__)}")
        out = super().forward(F.pad(x, (self.left_padding, 0)))
        if not self.include_current:  # shift right by one step: output t gets what output t - 1 had
            out = F.pad(out, (1, 0))[..., :-1]
        return out


# --------------------------------------------------------------------------- PixelCNN masks


class _MaskedConv(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 ``mask`` ``(kh, kw)`` (a buffer) at every call."""

    def __init__(self, in_channels: int, out_channels: int, mask: Tensor) -> None:
        kh, kw = mask.shape
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2))
        mask = mask.to(device=self.weight.device, dtype=self.weight.dtype)
        self.register_buffer("mask", mask.expand_as(self.weight).clone())

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H, W)`` with the masked kernel."""
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class MaskedConv2d(_MaskedConv):
    """A PixelCNN convolution: each output sees only the pixels before it in raster order.

    The ``k x k`` kernel keeps the rows above its centre and, on the centre row, the weights left of the
    centre; mask ``"A"`` also hides the centre (the first layer: the output at pixel ``i`` must not see
    ``y_i`` itself), mask ``"B"`` keeps it (later layers: the centre of a hidden feature map already
    depends only on pixels before ``i``). For ``k = 5``, mask A is

        1 1 1 1 1
        1 1 1 1 1
        1 1 0 0 0
        0 0 0 0 0
        0 0 0 0 0

    Single channel images, so no colour masks (van den Oord et al. 2016a, Sec. 3.5 and Fig. 4).

    Shapes: ``(N, C_in, H, W) -> (N, C_out, H, W)``.

    Raises:
        ValueError: for a mask type other than ``"A"``/``"B"`` or an even kernel size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str) -> None:
        if mask_type not in ("A", "B") or isinstance(kernel_size, bool) or not isinstance(kernel_size, int) \
                or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"mask_type must be 'A' or 'B' and kernel_size odd, got {mask_type!r}, {kernel_size}")
        mask = torch.ones(kernel_size, kernel_size, device="cpu")
        c = kernel_size // 2
        mask[c, c + (mask_type == "B"):] = 0  # the centre row: right of the centre (and the centre, for A)
        mask[c + 1:] = 0  # every row below
        super().__init__(in_channels, out_channels, mask)
        self.mask_type = mask_type


def vertical_mask(kernel_size: int, first: bool = False) -> Tensor:
    """The ``k x k`` mask of the gated PixelCNN's vertical stack: the rows above the centre, and the centre row.

    The vertical stack's features at row ``r`` must depend on the rows above ``r`` only. Its first layer
    therefore sees the rows above (``first=True`` hides the centre row too); a later layer may also use
    the centre row of the previous vertical features, which by induction hold rows above ``r`` only.
    The kernel is ``k`` wide, so the stack's view grows by ``k // 2`` columns on **both** sides per layer:
    nothing above is left out (van den Oord et al. 2016b, Sec. 2.2, Fig. 2).

    Raises:
        ValueError: for an even kernel size.
    """
    _check_odd_kernel(kernel_size)
    mask = torch.ones(kernel_size, kernel_size, device="cpu")
    c = kernel_size // 2
    mask[c + (0 if first else 1):] = 0
    return mask


def horizontal_mask(kernel_size: int, first: bool = False) -> Tensor:
    """The ``1 x k`` mask of the gated PixelCNN's horizontal stack: the pixels left of the centre, and the centre.

    ``first=True`` hides the centre too (the first layer must not see ``y_i``). The horizontal stack gets
    the rows above from the vertical stack through a 1x1 link (van den Oord et al. 2016b, Fig. 2).

    Raises:
        ValueError: for an even kernel size.
    """
    _check_odd_kernel(kernel_size)
    mask = torch.ones(1, kernel_size, device="cpu")
    mask[0, kernel_size // 2 + (0 if first else 1):] = 0
    return mask


# --------------------------------------------------------------------------- MADE masks


def made_degrees(num_inputs: int, hidden_sizes: Sequence[int], ordering: str = "natural",
                 generator: torch.Generator | None = None) -> list[Tensor]:
    """MADE's degrees: the input degrees (the ordering) and one degree per hidden unit (Germain et al. 2015).

    Input ``d`` gets degree ``m^0(d)``, its position (1..D) in the ordering: ``d + 1`` for the natural
    order, a random permutation of 1..D for ``"random"``. Hidden unit ``k`` of layer ``l`` gets a degree
    ``m^l(k)`` drawn uniformly from ``{min_k' m^{l-1}(k'), ..., D - 1}``: the largest number of inputs
    (in the ordering) that it may depend on. The lower bound keeps every unit connected; the upper
    bound ``D - 1`` because no output may depend on the input of degree ``D`` (Sec. 4.2).

    Args:
        num_inputs: ``D >= 2``. hidden_sizes: units per hidden layer.
        ordering: ``"natural"`` or ``"random"``.
        generator: draws the ordering and the hidden degrees (CPU).

    Returns:
        ``[m^0 (D,), m^1 (H_1,), ..., m^L (H_L,)]``, int64 on the CPU.

    Raises:
        ValueError: for ``D < 2``, an empty or non-positive hidden size, or an unknown ordering.
    """
    if isinstance(num_inputs, bool) or not isinstance(num_inputs, int) or num_inputs < 2:
        raise ValueError(f"num_inputs must be an integer >= 2, got {num_inputs!r}")
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}, got {ordering!r}")
    if len(hidden_sizes) == 0:
        raise ValueError("MADE needs at least one hidden layer")
    for h in hidden_sizes:
        _check_positive_int(h, "each hidden size")
    if ordering == "natural":
        degrees = [torch.arange(1, num_inputs + 1, device="cpu")]
    else:
        degrees = [torch.randperm(num_inputs, generator=generator, device="cpu") + 1]
    for h in hidden_sizes:
        low = int(degrees[-1].min())
        degrees.append(torch.randint(low, num_inputs, (h,), generator=generator, device="cpu"))
    return degrees


def made_masks(degrees: Sequence[Tensor], outputs_per_input: int = 1) -> list[Tensor]:
    """MADE's 0/1 masks from its degrees (Germain et al. 2015, Eq. 12-13).

    Hidden layer ``l`` connects unit ``k`` to unit ``j`` of the layer below when ``m^l(k) >= m^{l-1}(j)``
    (Eq. 12); output ``d`` connects to hidden unit ``k`` of the last layer when ``m^0(d) > m^L(k)``, a
    **strict** inequality (Eq. 13). By induction, a hidden unit of degree ``m`` depends only on inputs of
    degree ``<= m``, so output ``d`` depends only on inputs strictly before ``d`` in the ordering. Each
    input has ``outputs_per_input`` outputs (``K`` logits, or ``3M`` mixture numbers), laid out as
    ``p * D + d``, all with input ``d``'s degree.

    Args:
        degrees: ``[m^0 (D,), m^1 (H_1,), ..., m^L (H_L,)]`` as ``made_degrees`` returns.
        outputs_per_input: ``P >= 1``.

    Returns:
        ``L + 1`` float masks shaped like ``nn.Linear`` weights ``(out, in)``: ``(H_1, D)``, ...,
        ``(P D, H_L)``, on the degrees' device.

    Raises:
        ValueError: for fewer than two degree vectors or ``P < 1``.
    """
    if len(degrees) < 2:
        raise ValueError("made_masks needs the input degrees and at least one hidden layer's")
    _check_positive_int(outputs_per_input, "outputs_per_input")
    masks = [(upper[:, None] >= lower[None, :]).float() for lower, upper in zip(degrees[:-1], degrees[1:])]
    out_degrees = degrees[0].repeat(outputs_per_input)
    masks.append((out_degrees[:, None] > degrees[-1][None, :]).float())
    return masks


class MaskedLinear(nn.Linear):
    """``y = x (W ⊙ M)^T + b``: a linear layer with a 0/1 connectivity mask ``M`` ``(out, in)`` given per call.

    The mask is an argument, not a buffer, so that one layer serves the several connectivities of a
    MADE trained with resampled masks (Germain et al. 2015, Sec. 4.3).
    """

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``(B, in) -> (B, out)``; ``mask`` must have the weight's shape."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask must have shape {tuple(self.weight.shape)}, got {tuple(mask.shape)}")
        return F.linear(x, self.weight * mask.to(self.weight.dtype), self.bias)


# --------------------------------------------------------------------------- the shared model


class AutoregressiveModel(nn.Module):
    """What every autoregressive image model here shares: the output distribution, the likelihood,
    the class conditioning and sampling. A subclass implements ``_net(x, labels) -> (B, P, C, H, W)``
    on inputs ``x`` scaled to [-1, 1], with output ``(c, h, w)`` depending only on inputs before it.

    Args:
        event_shape: ``(C, H, W)`` of one image.
        num_levels: ``K >= 2``.
        output: ``"softmax"`` (``P = K`` logits per pixel) or ``"logistic_mixture"`` (``P = 3M``: mixture
            logits, locations, log-scales).
        num_mixtures: ``M``, the logistics of the mixture.
        num_classes: ``0`` for an unconditional model, else the number of classes of the labels.
        min_log_scale: the logistics' log-scales are floored softly at this (level units) for stable training.

    Raises:
        ValueError: for a bad shape, ``K < 2``, an unknown output, or non-positive sizes.
    """

    def __init__(self, event_shape: Sequence[int], num_levels: int, output: str = "softmax", num_mixtures: int = 5,
                 num_classes: int = 0, min_log_scale: float = -5.0) -> None:
        super().__init__()
        event_shape = tuple(int(s) for s in event_shape)
        if len(event_shape) != 3 or min(event_shape) < 1:
            raise ValueError(f"event_shape must be (C, H, W) with positive sizes, got {event_shape}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        _check_positive_int(num_mixtures, "num_mixtures")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be 0 (unconditional) or a positive integer, got {num_classes!r}")
        self.event_shape, self.num_levels, self.output = event_shape, num_levels, output
        self.num_mixtures, self.num_classes, self.min_log_scale = num_mixtures, num_classes, min_log_scale
        self.num_dims = math.prod(event_shape)
        self.params_per_pixel = num_levels if output == "softmax" else 3 * num_mixtures
        if num_classes:
            self.register_buffer("class_log_prior", torch.full((num_classes,), -math.log(num_classes), device="cpu"))
        else:
            self.class_log_prior = None

    # ---- checks

    def _check_input(self, y: Tensor, name: str = "y") -> None:
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() != 4 or tuple(y.shape[1:]) != self.event_shape:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, self.event_shape))}), "
                             f"got {tuple(y.shape)}")

    def _check_labels(self, labels: Tensor | int | None, batch: int, device: torch.device) -> Tensor | None:
        """``None``, or int64 labels ``(batch,)`` on ``device``; an int means that class for every image."""
        if labels is None:
            return None
        if not self.num_classes:
            raise ValueError("labels were given to an unconditional model (built with num_classes=0)")
        if isinstance(labels, int) and not isinstance(labels, bool):
            if not 0 <= labels < self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got {labels}")
            return torch.full((batch,), labels, dtype=torch.long, device=device)
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be an int or a torch.Tensor of class indices, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), one class per image, got {tuple(labels.shape)}")
        if value_checks(labels) and labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], "
                             f"got range [{labels.min().item()}, {labels.max().item()}]")
        return labels.to(device=device, dtype=torch.long)

    def _check_temperature(self, temperature: float) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")

    # ---- the network and the output distribution

    def _net(self, x: Tensor, labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, y: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """The network's ``P`` numbers per pixel, ``(B, P, C, H, W)``, for images ``y`` ``(B, C, H, W)``.

        ``y`` may hold any real values (levels, or continuous values for a Jacobian); it is scaled to
        ``2 y / (K - 1) - 1``. The numbers at pixel ``i`` depend only on ``y`` before ``i`` (and the label).

        Raises:
            TypeError/ValueError: for a non-float tensor, a wrong shape, or bad labels.
        """
        return self._net_levels(y, self._check_forward(y, labels))

    def _check_forward(self, y: Tensor, labels: Tensor | int | None) -> Tensor | None:
        self._check_input(y)
        if not y.is_floating_point():
            raise TypeError(f"y must be floating point, got dtype {y.dtype} (convert the levels with .float())")
        if self.num_classes and labels is None:
            raise ValueError("a conditional model's forward needs labels (log_prob and sample can marginalise them)")
        return self._check_labels(labels, y.shape[0], y.device)

    def _mixture(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split ``(..., 3M)`` into mixture logits, locations (level units) and log-scales, each ``(..., M)``."""
        logits, raw_mean, raw_scale = params.split(self.num_mixtures, dim=-1)
        half = (self.num_levels - 1) / 2
        return logits, half + half * raw_mean, self.min_log_scale + F.softplus(raw_scale - self.min_log_scale)

    def _pixel_log_prob(self, params: Tensor, y: Tensor) -> Tensor:
        """``log P(y_i | y_<i)`` of every pixel, ``(B, C, H, W)`` nats, from ``params (B, P, C, H, W)``."""
        if self.output == "softmax":
            return F.log_softmax(params, dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1)
        logits, means, log_scales = self._mixture(params.movedim(1, -1))  # each (B, C, H, W, M)
        return discretized_logistic_mixture_log_prob(y.to(params.dtype), logits, means, log_scales, self.num_levels)

    def level_log_probs(self, params: Tensor) -> Tensor:
        """``log P(level)`` of all ``K`` levels, ``(B, K)`` nats, from the network's numbers ``(B, P)`` of one pixel
        (a slice ``forward(y)[:, :, c, i, j]``): the log-softmax, or the discretized logistic mixture (PixelCNN++,
        Eq. 2) evaluated at every level. Each row sums to 1 in probability."""
        if self.output == "softmax":
            return F.log_softmax(params, dim=-1)
        b, k, m = params.shape[0], self.num_levels, self.num_mixtures
        levels = torch.arange(k, device=params.device, dtype=params.dtype).expand(b, k)
        logits, means, log_scales = (t[:, None, :].expand(b, k, m) for t in self._mixture(params))
        return discretized_logistic_mixture_log_prob(levels, logits, means, log_scales, self.num_levels)

    def _log_prob_given(self, y: Tensor, labels: Tensor | None) -> Tensor:
        """``log P(y | labels)`` ``(B,)`` nats for checked levels ``y`` (float) and labels (or None)."""
        return self._pixel_log_prob(self._net_levels(y, labels), y).flatten(1).sum(1)

    def _net_levels(self, y: Tensor, labels: Tensor | None, **kwargs) -> Tensor:
        x = y.to(module_dtype(self)) * (2.0 / (self.num_levels - 1)) - 1.0
        return self._net(x, labels, **kwargs)

    # ---- the likelihood

    def log_prob(self, y: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """Exact ``log P(y)`` (or ``log P(y | labels)``) in nats per image, ``(B,)``: the chain rule's sum.

        For a conditional model without labels it is the marginal ``log Σ_c π_c P(y | c)`` over the
        classes (``num_classes`` passes), still exact.

        Args:
            y: integer levels ``(B, C, H, W)`` in ``{0..K-1}`` (float or integer dtype).
            labels: ``(B,)`` class indices (or one int) for a conditional model; None otherwise.

        Raises:
            TypeError/ValueError: for a non-tensor, a wrong shape, invalid levels (``check_levels``), or
            labels that are bad or given to an unconditional model.
        """
        self._check_input(y)
        check_levels(y, self.num_levels)
        labels = self._check_labels(labels, y.shape[0], y.device)
        y = y.to(module_dtype(self))
        with inputs_checked():  # checked once above: no host round trip per pixel inside the mixture
            if self.num_classes and labels is None:
                per_class = torch.stack([self._log_prob_given(y, torch.full((y.shape[0],), c, dtype=torch.long,
                                                                            device=y.device))
                                         for c in range(self.num_classes)], dim=1)  # (B, num_classes)
                log_prior = F.log_softmax(self.class_log_prior.to(per_class.dtype), dim=0)  # exactly normalised
                return torch.logsumexp(per_class + log_prior, dim=1)
            return self._log_prob_given(y, labels)

    def nll(self, y: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """``-log P(y)`` (or ``-log P(y | labels)``) in nats per image, ``(B,)``, exact; see ``log_prob``."""
        return -self.log_prob(y, labels)

    def set_class_prior(self, probs: Tensor) -> None:
        """Set the class prior ``π`` (``(num_classes,)`` non-negative, normalised here) of a conditional model.

        Raises:
            ValueError: for an unconditional model, a wrong shape, or negative / all-zero weights.
        """
        if not self.num_classes:
            raise ValueError("an unconditional model has no class prior")
        probs = torch.as_tensor(probs, dtype=torch.float64, device="cpu")
        if probs.shape != (self.num_classes,) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"probs must be {self.num_classes} non-negative weights, not all zero")
        with torch.no_grad():
            self.class_log_prior.copy_((probs / probs.sum()).log().to(self.class_log_prior))

    # ---- sampling

    def _sampling_order(self, **kwargs) -> list[int]:
        """The flat pixel indices in the order they are drawn: raster order."""
        return list(range(self.num_dims))

    def _sample_labels(self, n: int, labels, generator: torch.Generator | None, device: torch.device):
        if labels is not None or not self.num_classes:
            return self._check_labels(labels, n, device)
        return _draw(self.class_log_prior.exp().expand(n, self.num_classes), generator)

    def _sample_with(self, n: int, temperature: float, labels: Tensor | None, generator: torch.Generator | None,
                     **kwargs) -> Tensor:
        """Draw ``n`` images pixel by pixel in ``_sampling_order``; each step runs the whole network."""
        device = module_device(self)
        y = torch.zeros(n, self.num_dims, device=device, dtype=module_dtype(self))
        with inputs_checked():
            for i in self._sampling_order(**kwargs):
                params = self._net_levels(y.view(n, *self.event_shape), labels, **kwargs).flatten(2)[:, :, i]  # (n, P)
                probs = F.softmax(self.level_log_probs(params) / temperature, dim=-1)
                y[:, i] = _draw(probs, generator).to(y.dtype)
        return y.view(n, *self.event_shape)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, labels: Tensor | int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` images, one pixel at a time in the model's order (raster order for the PixelCNNs).

        At each pixel the ``K`` level probabilities are raised to ``1 / temperature`` and renormalised:
        ``temperature = 1`` samples the model, ``< 1`` sharpens towards the most likely levels, ``> 1``
        flattens. A conditional model draws the classes from its prior ``π`` when ``labels`` is None.

        Args:
            n: number of images. temperature: ``> 0``. labels: ``(n,)`` class indices or one int
                (conditional models only). generator: a seeded ``torch.Generator`` (any device) for
                reproducible samples.

        Returns:
            levels ``(n, C, H, W)`` in ``{0..K-1}``, float, on the model's device.

        Raises:
            ValueError/TypeError: for ``n < 1``, a bad temperature or bad labels.
        """
        _check_positive_int(n, "n")
        self._check_temperature(temperature)
        labels = self._sample_labels(n, labels, generator, module_device(self))
        return self._sample_with(n, float(temperature), labels, generator)


# --------------------------------------------------------------------------- MADE


class MADE(AutoregressiveModel):
    """MADE: a masked MLP whose ``D`` outputs are the chain rule's conditionals (Germain et al. 2015).

    The input image is flattened (raster order) to ``D`` values; ``num_layers`` hidden layers of
    ``hidden`` ReLU units follow, then ``P D`` outputs (``P`` numbers per pixel). Every weight matrix is
    multiplied by a mask from ``made_masks``, so output ``d`` depends only on the inputs before ``d`` in
    the ordering: one pass gives all ``D`` conditionals.

    **Orderings and connectivity.** ``num_masks`` sets of degrees (seeded by ``seed``, ``seed + 1``, ...)
    are drawn at construction: each set is one ordering (``"natural"`` raster order, or ``"random"``) with
    its hidden connectivity. With ``num_masks > 1`` the model trains *connectivity-agnostically*: every
    ``log_prob`` call in training mode (one per minibatch in ``fit``) first moves on to the next set
    (``next_mask``), cycling through them (Sec. 4.3). In evaluation mode ``log_prob`` is the ensemble

        log P(y) = log (1/S) Σ_{s=1}^{S} P_s(y),   S = num_masks,

    which is the exact log-likelihood of the mixture of the ``S`` autoregressive models (the paper's
    test-time averaging over orderings), and ``sample`` draws from that mixture (a mask per image, then
    that mask's ordering). With ``num_masks = 1`` (the default) it is one fixed MADE.

    **Conditioning.** A label embedding is added to every hidden layer's pre-activation: the label may
    reach every output, it is not part of the ordering.

    Args:
        event_shape, num_levels, output, num_mixtures, num_classes: as ``AutoregressiveModel``.
        hidden: units per hidden layer. num_layers: hidden layers (``>= 1``).
        ordering: ``"natural"`` or ``"random"``. num_masks: ``S >= 1``. seed: seeds the degrees.

    Raises:
        ValueError: for bad sizes, an unknown ordering or output, or ``D < 2``.

    Source: Germain, Gregor, Murray & Larochelle 2015, "MADE: Masked autoencoder for distribution
    estimation", Eq. 12-13 (masks), Sec. 4.2 (degrees), Sec. 4.3 (order- and connectivity-agnostic training).
    """

    def __init__(self, event_shape: Sequence[int] = (1, 8, 8), num_levels: int = 17, hidden: int = 512,
                 num_layers: int = 2, ordering: str = "natural", num_masks: int = 1, seed: int = 0,
                 output: str = "softmax", num_mixtures: int = 5, num_classes: int = 0) -> None:
        super().__init__(event_shape, num_levels, output, num_mixtures, num_classes)
        _check_positive_int(hidden, "hidden")
        _check_positive_int(num_layers, "num_layers")
        _check_positive_int(num_masks, "num_masks")
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}, got {ordering!r}")
        self.hidden, self.num_layers, self.ordering, self.num_masks = hidden, num_layers, ordering, num_masks
        d = self.num_dims
        sets = [made_degrees(d, [hidden] * num_layers, ordering, torch.Generator(device="cpu").manual_seed(seed + s))
                for s in range(num_masks)]
        for layer in range(num_layers + 1):  # buffers (S, units): degrees of the inputs, then of each hidden layer
            self.register_buffer(f"degrees_{layer}", torch.stack([s[layer] for s in sets]))
        self._orders = [torch.argsort(s[0]).tolist() for s in sets]
        sizes = [d] + [hidden] * num_layers
        self.layers = nn.ModuleList([MaskedLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = MaskedLinear(hidden, self.params_per_pixel * d)
        self.embed = nn.Embedding(num_classes, hidden * num_layers) if num_classes else None
        self.mask_index = 0

    def degrees(self, mask: int | None = None) -> list[Tensor]:
        """The degrees ``[m^0 (D,), m^1 (hidden,), ...]`` of mask set ``mask`` (default: the current one)."""
        s = self.mask_index if mask is None else mask
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.num_masks:
            raise ValueError(f"mask must be an integer in [0, {self.num_masks - 1}], got {s!r}")
        return [getattr(self, f"degrees_{layer}")[s] for layer in range(self.num_layers + 1)]

    def masks(self, mask: int | None = None) -> list[Tensor]:
        """The 0/1 masks of mask set ``mask`` (default: the current one), as ``made_masks`` gives them."""
        return made_masks(self.degrees(mask), self.params_per_pixel)

    def ordering_of(self, mask: int | None = None) -> list[int]:
        """The flat pixel indices in the order of mask set ``mask`` (default: the current one): the pixel of
        degree 1 first. Kept as Python lists from construction, so it needs no device read."""
        self.degrees(mask)  # checks the index
        return list(self._orders[self.mask_index if mask is None else mask])

    def next_mask(self) -> int:
        """Move on to the next mask set (cyclically) and return its index; what training does per minibatch."""
        self.mask_index = (self.mask_index + 1) % self.num_masks
        return self.mask_index

    def _net(self, x: Tensor, labels: Tensor | None, mask: int | None = None,
             masks: list[Tensor] | None = None) -> Tensor:
        masks = self.masks(mask) if masks is None else masks  # sampling computes them once for D passes
        h = x.flatten(1)  # (B, D), raster order
        cond = self.embed(labels).chunk(self.num_layers, dim=1) if self.embed is not None else None
        for i, layer in enumerate(self.layers):
            pre = layer(h, masks[i])
            h = F.relu(pre + cond[i] if cond is not None else pre)
        out = self.out(h, masks[-1])  # (B, P D), laid out p * D + d
        return out.view(x.shape[0], self.params_per_pixel, *self.event_shape)

    def forward(self, y: Tensor, labels: Tensor | int | None = None, mask: int | None = None) -> Tensor:
        """``(B, P, C, H, W)`` numbers of mask set ``mask`` (default: the current one); see
        ``AutoregressiveModel.forward``."""
        self.degrees(mask)  # checks the index
        return self._net_levels(y, self._check_forward(y, labels), mask=mask)

    def _log_prob_given(self, y: Tensor, labels: Tensor | None) -> Tensor:
        if self.training or self.num_masks == 1:
            return super()._log_prob_given(y, labels)
        per_mask = torch.stack([self._pixel_log_prob(self._net_levels(y, labels, mask=s), y).flatten(1).sum(1)
                                for s in range(self.num_masks)], dim=1)  # (B, S)
        return torch.logsumexp(per_mask, dim=1) - math.log(self.num_masks)

    def log_prob(self, y: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """Exact ``log P(y)`` in nats per image ``(B,)``; in training mode with ``num_masks > 1`` it first
        moves to the next mask set (connectivity-agnostic training), in evaluation mode it is the ensemble
        over all mask sets. See ``AutoregressiveModel.log_prob`` for the arguments and errors."""
        if self.training and self.num_masks > 1:
            self.next_mask()
        return super().log_prob(y, labels)

    def _sampling_order(self, mask: int | None = None, masks: list[Tensor] | None = None) -> list[int]:
        return self.ordering_of(mask)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, labels: Tensor | int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` images from the ensemble: a mask set per image (uniformly), then pixel by pixel in
        that set's ordering. Arguments, returns and errors as ``AutoregressiveModel.sample``."""
        _check_positive_int(n, "n")
        self._check_temperature(temperature)
        device = module_device(self)
        labels = self._sample_labels(n, labels, generator, device)
        if self.num_masks == 1:
            return self._sample_with(n, float(temperature), labels, generator, mask=0, masks=self.masks(0))
        which = randint(0, self.num_masks, (n,), device="cpu", generator=generator)  # a mask set per image
        out = torch.zeros(n, *self.event_shape, device=device, dtype=module_dtype(self))
        for s in range(self.num_masks):
            rows = (which == s).nonzero().squeeze(1)
            if len(rows):
                part_labels = None if labels is None else labels[rows.to(device)]
                part = self._sample_with(len(rows), float(temperature), part_labels, generator, mask=s,
                                         masks=self.masks(s))
                out[rows.to(device)] = part
        return out


# --------------------------------------------------------------------------- PixelCNN


def _check_grey(event_shape: tuple[int, ...]) -> None:
    if event_shape[0] != 1:
        raise ValueError(f"the PixelCNNs here model grey images (one channel), got event_shape {event_shape}")


def _check_conv_sizes(event_shape: tuple[int, ...], channels: int, num_layers: int, first_kernel: int,
                      kernel_size: int) -> None:
    """The checks a convolutional autoregressive model makes of its sizes (ValueError naming the bad one)."""
    _check_grey(event_shape)
    _check_positive_int(channels, "channels")
    _check_positive_int(num_layers, "num_layers")
    _check_odd_kernel(first_kernel, "first_kernel")
    _check_odd_kernel(kernel_size)


def _output_head(channels: int, params_per_pixel: int) -> nn.Sequential:
    """ReLU, 1x1 conv, ReLU, 1x1 conv to the ``P`` output numbers per pixel: ``(B, channels, H, W) -> (B, P, H, W)``.
    A 1x1 convolution mixes channels at one position only, so it keeps the masks' causality."""
    return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, params_per_pixel, 1))


class PixelCNN(AutoregressiveModel):
    """PixelCNN: a mask-A convolution, then residual mask-B convolutions, then 1x1 layers to the outputs.

    ``h_0 = conv_A(x)``, ``h_l = h_{l-1} + conv_B(ReLU(h_{l-1})) [+ e_l(c)]`` for ``l = 1..L``, then
    ``ReLU -> 1x1 -> ReLU -> 1x1`` to ``P`` numbers per pixel (van den Oord et al. 2016a, Sec. 3.5 and
    Table 4, with one residual connection per layer). Every output sees only the pixels before it in raster
    order, but **not all of them**: a stack of masked ``k x k`` kernels never reaches the pixels above
    and to the right beyond a cone (the blind spot, van den Oord et al. 2016b, Fig. 1), which the gated
    PixelCNN removes. A conditional model adds a label embedding ``e_l(c)`` per layer.

    Args:
        event_shape: ``(1, H, W)``. num_levels, output, num_mixtures, num_classes: as ``AutoregressiveModel``.
        channels: feature maps. num_layers: mask-B layers. first_kernel: the mask-A kernel (odd).
        kernel_size: the mask-B kernels (odd).

    Raises:
        ValueError: for more than one channel, even kernels or non-positive sizes.
    """

    def __init__(self, event_shape: Sequence[int] = (1, 8, 8), num_levels: int = 17, channels: int = 64,
                 num_layers: int = 6, first_kernel: int = 7, kernel_size: int = 3, output: str = "softmax",
                 num_mixtures: int = 5, num_classes: int = 0) -> None:
        super().__init__(event_shape, num_levels, output, num_mixtures, num_classes)
        _check_conv_sizes(self.event_shape, channels, num_layers, first_kernel, kernel_size)
        self.channels, self.num_layers = channels, num_layers
        self.first = MaskedConv2d(1, channels, first_kernel, "A")
        self.layers = nn.ModuleList([MaskedConv2d(channels, channels, kernel_size, "B") for _ in range(num_layers)])
        self.head = _output_head(channels, self.params_per_pixel)
        self.embed = nn.Embedding(num_classes, channels * (num_layers + 1)) if num_classes else None

    def _net(self, x: Tensor, labels: Tensor | None) -> Tensor:
        cond = None
        if self.embed is not None:
            cond = self.embed(labels).view(-1, self.num_layers + 1, self.channels, 1, 1).unbind(1)
        h = self.first(x)
        if cond is not None:
            h = h + cond[0]
        for i, layer in enumerate(self.layers):
            h = h + layer(F.relu(h))
            if cond is not None:
                h = h + cond[i + 1]
        return self.head(h).unsqueeze(2)  # (B, P, 1, H, W)


# --------------------------------------------------------------------------- the gated PixelCNN


class GatedPixelCNNLayer(nn.Module):
    """One layer of the gated PixelCNN: a vertical and a horizontal stack with gated activations.

    With ``*`` a masked convolution and ``⊙`` the elementwise product (van den Oord et al. 2016b, Eq. 2-4
    and Fig. 2):

        a_v = W_v * v                      (k x k, ``vertical_mask``: the rows above)
        v'  = tanh(a_v,f + V_f c) ⊙ σ(a_v,g + V_g c)
        a_h = W_h * h + U (a_v)            (1 x k, ``horizontal_mask``: the row so far; U a 1x1 link)
        h'  = h + W_o (tanh(a_h,f + V'_f c) ⊙ σ(a_h,g + V'_g c))     (W_o 1x1; no residual in the first layer)

    where ``a_·,f`` and ``a_·,g`` are the two halves of the ``2C`` channels and ``V c`` a label embedding
    (conditional models only). With ``cond_channels > 0`` a spatial map ``s (B, cond_channels, H, W)`` enters every
    gate the same way, through a 1x1 convolution ``V * s`` (Eq. 5: conditioning on an image-sized representation,
    as VQ-VAE-2's bottom prior is conditioned on the top codes). The vertical stack sees a growing block of rows above the pixel, ``k // 2``
    columns further on each side per layer; the link ``U`` hands it to the horizontal stack at the same
    pixel, which adds the pixels to the left: together every pixel before the current one is reached, so
    there is **no blind spot**. The first layer (``first=True``) hides the centre row from the vertical
    stack and the centre pixel from the horizontal one (the image itself); later layers keep them, since
    their inputs are features that already respect the ordering.

    Shapes: ``v, h (B, C_in, H, W) -> (v', h') (B, C, H, W)``.

    Raises:
        ValueError: for an even kernel or non-positive sizes; in ``forward``, for a missing label or map.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, first: bool = False,
                 num_classes: int = 0, cond_channels: int = 0) -> None:
        super().__init__()
        _check_positive_int(in_channels, "in_channels")
        _check_positive_int(channels, "channels")
        self.channels, self.first = channels, first
        self.v_conv = _MaskedConv(in_channels, 2 * channels, vertical_mask(kernel_size, first))
        self.h_conv = _MaskedConv(in_channels, 2 * channels, horizontal_mask(kernel_size, first))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.embed = nn.Embedding(num_classes, 4 * channels) if num_classes else None
        self.cond = nn.Conv2d(cond_channels, 4 * channels, 1) if cond_channels else None
        self.residual = not first and in_channels == channels

    @staticmethod
    def gate(a: Tensor) -> Tensor:
        """The gated activation ``tanh(a_f) ⊙ σ(a_g)`` of the two channel halves of ``a`` ``(B, 2C, H, W)``."""
        f, g = a.chunk(2, dim=1)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, v: Tensor, h: Tensor, labels: Tensor | None = None,
                cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, h) -> (v', h')``, each ``(B, C, H, W)``; ``labels (B,)`` for a class-conditional layer, ``cond
        (B, cond_channels, H, W)`` for a spatially conditioned one."""
        a_v = self.v_conv(v)
        a_h = self.h_conv(h) + self.v_to_h(a_v)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional layer needs labels")
            e_v, e_h = self.embed(labels)[:, :, None, None].chunk(2, dim=1)
            a_v, a_h = a_v + e_v, a_h + e_h
        if self.cond is not None:
            if cond is None:
                raise ValueError("a spatially conditioned layer needs its map cond")
            s_v, s_h = self.cond(cond).chunk(2, dim=1)
            a_v, a_h = a_v + s_v, a_h + s_h
        h_new = self.h_out(self.gate(a_h))
        return self.gate(a_v), (h + h_new if self.residual else h_new)


class GatedPixelCNN(AutoregressiveModel):
    """The gated PixelCNN: stacked ``GatedPixelCNNLayer``s, then ``ReLU -> 1x1 -> ReLU -> 1x1`` on the
    horizontal stack to ``P`` numbers per pixel (van den Oord et al. 2016b, Sec. 2.1-2.3).

    The output at pixel ``(r, c)`` depends on every pixel before it in raster order once the stack is
    deep enough (about ``max(H, W)`` layers of 3x3 kernels after a ``first_kernel`` first layer): no blind
    spot. With ``num_classes > 0`` it is the conditional PixelCNN of Eq. 4, a label embedding inside
    every gate of both stacks.

    Args:
        event_shape: ``(1, H, W)``. num_levels, output, num_mixtures, num_classes: as ``AutoregressiveModel``.
        channels: feature maps of each stack. num_layers: gated layers (the first included).
        first_kernel, kernel_size: odd kernel sizes of the first and the later layers.

    Raises:
        ValueError: for more than one channel, even kernels or non-positive sizes.

    Source: van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu 2016b, "Conditional image
    generation with PixelCNN decoders", Eq. 2-4 and Fig. 2.
    """

    def __init__(self, event_shape: Sequence[int] = (1, 8, 8), num_levels: int = 17, channels: int = 64,
                 num_layers: int = 8, first_kernel: int = 5, kernel_size: int = 3, output: str = "softmax",
                 num_mixtures: int = 5, num_classes: int = 0) -> None:
        super().__init__(event_shape, num_levels, output, num_mixtures, num_classes)
        _check_conv_sizes(self.event_shape, channels, num_layers, first_kernel, kernel_size)
        self.channels, self.num_layers = channels, num_layers
        self.layers = nn.ModuleList(
            [GatedPixelCNNLayer(1, channels, first_kernel, first=True, num_classes=num_classes)]
            + [GatedPixelCNNLayer(channels, channels, kernel_size, num_classes=num_classes)
               for _ in range(num_layers - 1)])
        self.head = _output_head(channels, self.params_per_pixel)

    def _net(self, x: Tensor, labels: Tensor | None) -> Tensor:
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h).unsqueeze(2)  # (B, P, 1, H, W)
