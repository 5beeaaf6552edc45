"""Reversible networks: the RevNet block with memory-free backpropagation, and i-RevNet.

RevNet (Gomez et al. 2017, "The Reversible Residual Network: Backpropagation Without Storing
Activations", Eq. 1-2). The channels of ``x`` are split in two halves ``x = (x1, x2)`` and

    y1 = x1 + F(x2),            x2 = y2 - G(y1),
    y2 = x2 + G(y1),     <=>    x1 = y1 - F(x2),

for any two networks F and G (they need not be invertible). Because every block's input can be
recomputed from its output, backpropagation does not have to keep the activations: a stack of
blocks runs through ONE ``torch.autograd.Function`` that stores only the final output and, in the
backward pass, walks the blocks in reverse, rebuilding each block's input and recomputing F and G
to get their vector-Jacobian products (Gomez et al. 2017, Algorithm 1). Activation memory is then
O(1) in depth instead of O(depth); the price is one more forward evaluation of F and G per block,
and the float round-off of the reconstruction. (The lecture slide writes the inverse with F and G
swapped; the paper's Eq. 2 is the one above.)

i-RevNet (Jacobsen et al. 2018, "i-RevNet: Deep Invertible Networks", Sec. 3) keeps the whole
classifier invertible up to the final projection onto the classes: the image is reshaped by the
invertible downsampling ``space_to_depth`` (each 2×2 patch of C channels becomes 4C channels at
half the resolution), optionally zero-padded in channels (an injective map), and passed through
stages of reversible blocks separated by further ``space_to_depth``. ``IRevNet.inverse`` maps the
final features back to the exact image; only the classifier head discards information.

Shapes: images and features are ``(B, C, H, W)`` with C even wherever a reversible block sees them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dgmlib.ode import split_labelled

__all__ = [
    "ReversibleBlock", "RevNet", "ResidualStack", "IRevNet", "conv_residual_fn", "space_to_depth",
    "depth_to_space", "pad_channels", "unpad_channels", "reversible_sequence",
]


def _check_image(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)} ({x.dim()} dims)")


def _check_even_channels(x: Tensor, name: str = "x") -> None:
    _check_image(x, name)
    if x.shape[1] % 2:
        raise ValueError(f"{name} must have an even number of channels to split into (x1, x2), "
                         f"got C = {x.shape[1]}")


# ----------------------------------------------------------------------------- invertible reshapes

def space_to_depth(x: Tensor) -> Tensor:
    """Invertible downsampling: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, each 2×2 patch into channels.

    A pure permutation of the entries (``F.pixel_unshuffle`` with factor 2), so it is volume
    preserving and its inverse is ``depth_to_space`` (Jacobsen et al. 2018, Sec. 3.1; Dinh et al.
    2017, "squeeze").

    Raises:
        TypeError: for a non-floating ``x``.
        ValueError: for ``x`` that is not 4-D, or an odd height or width.
    """
    _check_image(x)
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"space_to_depth needs an even height and width, got H x W = {x.shape[2]} x {x.shape[3]}")
    return F_.pixel_unshuffle(x, 2)


def depth_to_space(x: Tensor) -> Tensor:
    """Inverse of ``space_to_depth``: ``(B, 4C, H, W) -> (B, C, 2H, 2W)``.

    Raises:
        TypeError: for a non-floating ``x``.
        ValueError: for ``x`` that is not 4-D or whose channels are not a multiple of 4.
    """
    _check_image(x)
    if x.shape[1] % 4:
        raise ValueError(f"depth_to_space needs channels divisible by 4, got C = {x.shape[1]}")
    return F_.pixel_shuffle(x, 2)


def pad_channels(x: Tensor, channels: int) -> Tensor:
    """Injective channel padding ``(B, C, H, W) -> (B, channels, H, W)``: append zero channels.

    i-RevNet's "injective padding" (Jacobsen et al. 2018, Sec. 3.1) that lets the reversible blocks
    work in more channels than the input has; ``unpad_channels`` is its left inverse.

    Raises:
        ValueError: if ``channels`` is smaller than ``C``.
    """
    _check_image(x)
    extra = channels - x.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {x.shape[1]} channels to fewer ({channels})")
    return F_.pad(x, (0, 0, 0, 0, 0, extra))  # pads dim 1 (channels) at the end


def unpad_channels(x: Tensor, channels: int) -> Tensor:
    """Left inverse of ``pad_channels``: keep the first ``channels`` channels."""
    _check_image(x)
    return x[:, :channels]


# ----------------------------------------------------------------------------- the reversible block

def conv_residual_fn(channels: int, hidden: int, kernel_size: int = 3) -> nn.Module:
    """A residual function for F or G: ``Conv -> ReLU -> Conv``, ``(B, channels, H, W)`` to the same.

    No batch normalisation: recomputing F in the backward pass must give the same function, and
    BatchNorm in training mode would update its running statistics a second time.
    """
    pad = kernel_size // 2
    return nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size, padding=pad),
        nn.ReLU(),
        nn.Conv2d(hidden, channels, kernel_size, padding=pad),
    )


class ReversibleBlock(nn.Module):
    """One RevNet block ``(x1, x2) -> (x1 + F(x2), x2 + G(y1))`` on ``(B, C, H, W)``, C even.

    F and G map ``(B, C/2, H, W)`` to the same shape; the block is invertible whatever they are
    (Gomez et al. 2017, Eq. 1-2). With ``channels`` and ``hidden`` given, F and G are
    ``conv_residual_fn(channels // 2, hidden)``; otherwise pass your own modules.

    Raises:
        ValueError: for an odd ``channels``, or (in forward/inverse) input that is not ``(B, C, H, W)``
            with even C.
    """

    def __init__(self, channels: int | None = None, hidden: int = 32, F: nn.Module | None = None,
                 G: nn.Module | None = None) -> None:
        super().__init__()
        if F is None or G is None:
            if channels is None or channels <= 0 or channels % 2:
                raise ValueError(f"channels must be a positive even number, got {channels}")
            F = F if F is not None else conv_residual_fn(channels // 2, hidden)
            G = G if G is not None else conv_residual_fn(channels // 2, hidden)
        self.F, self.G = F, G

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C, H, W) -> y (B, C, H, W)`` with ordinary autograd."""
        _check_even_channels(x)
        x1, x2 = x.chunk(2, dim=1)   # (B, C/2, H, W) each
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        """``y (B, C, H, W) -> x (B, C, H, W)``: ``x2 = y2 - G(y1)``, then ``x1 = y1 - F(x2)``."""
        _check_even_channels(y, "y")
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return torch.cat([x1, x2], dim=1)


class _ReversibleSequence(torch.autograd.Function):
    """y = blocks[-1](...blocks[0](x)); saves only y, rebuilds the activations in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: tuple[ReversibleBlock, ...], params: tuple[Tensor, ...],
                *flat_params: Tensor) -> Tensor:
        # autograd runs this under no_grad: no graph, no activations kept
        y = x
        for block in blocks:
            y = block(y)
        ctx.blocks, ctx.params = blocks, params
        ctx.save_for_backward(y)  # the only tensor kept: (B, C, H, W)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        (y,) = ctx.saved_tensors
        index = {id(p): i for i, p in enumerate(ctx.params)}
        grads: list[Tensor | None] = [None] * len(ctx.params)

        def accumulate(ps: Sequence[Tensor], gs: Sequence[Tensor | None]) -> None:
            for p, g in zip(ps, gs):  # a parameter shared by several blocks sums its gradients
                if g is not None:
                    i = index[id(p)]
                    grads[i] = g if grads[i] is None else grads[i] + g

        y1, y2 = y.detach().chunk(2, dim=1)  # (B, C/2, H, W) each
        dy1, dy2 = grad_y.chunk(2, dim=1)
        for block in reversed(ctx.blocks):
            g_params = [p for p in block.G.parameters() if p.requires_grad]
            f_params = [p for p in block.F.parameters() if p.requires_grad]
            # G: x2 = y2 - G(y1); y1 feeds y2 through G, so dL/dy1 gains G's VJP of dy2
            with torch.enable_grad():
                z1 = y1.detach().requires_grad_()
                g = block.G(z1)
                dz1, *dg = torch.autograd.grad(g, [z1, *g_params], dy2, allow_unused=True)
            accumulate(g_params, dg)
            dz1 = dy1 + (dz1 if dz1 is not None else 0)  # total dL/dy1
            x2 = y2 - g.detach()
            # F: x1 = y1 - F(x2); x2 feeds y1 through F
            with torch.enable_grad():
                x2_ = x2.requires_grad_()
                f = block.F(x2_)
                dx2, *df = torch.autograd.grad(f, [x2_, *f_params], dz1, allow_unused=True)
            accumulate(f_params, df)
            x1 = y1 - f.detach()
            dy1, dy2 = dz1, dy2 + (dx2 if dx2 is not None else 0)  # dL/dx1, dL/dx2
            y1, y2 = x1, x2.detach()
        grad_x = torch.cat([dy1, dy2], dim=1)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, ctx.params)]
        return (grad_x, None, None, *grads)


def reversible_sequence(x: Tensor, blocks: Sequence[ReversibleBlock]) -> Tensor:
    """Run ``x (B, C, H, W)`` through ``blocks`` keeping only the output for the backward pass.

    Gradients flow to ``x`` and to every parameter of the blocks' F and G that requires grad; they
    equal ordinary backpropagation up to the round-off of rebuilding the activations (Gomez et
    al. 2017, Algorithm 1). Under ``torch.no_grad`` the blocks simply run.

    Raises:
        TypeError: for a non-floating ``x``.
        ValueError: for ``x`` that is not ``(B, C, H, W)`` with even C.
    """
    _check_even_channels(x)
    blocks = tuple(blocks)
    params: list[Tensor] = []
    seen: set[int] = set()
    for block in blocks:
        for p in block.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        for block in blocks:
            x = block(x)
        return x
    return _ReversibleSequence.apply(x, blocks, tuple(params), *params)


class RevNet(nn.Module):
    """A stack of ``depth`` reversible blocks on ``(B, channels, H, W)``, invertible as a whole.

    ``memory_efficient=True`` (default) backpropagates through ``reversible_sequence``: the bytes
    saved for the backward pass do not grow with depth. ``False`` uses ordinary autograd through
    the same blocks (the reference the tests compare against).

    Raises:
        ValueError: for an odd ``channels`` or ``depth < 1``; in forward/inverse, for input that is
            not ``(B, C, H, W)`` with even C.
    """

    def __init__(self, channels: int, depth: int, hidden: int = 32, memory_efficient: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList(ReversibleBlock(channels, hidden) for _ in range(depth))
        self.memory_efficient = memory_efficient

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        if self.memory_efficient:
            return reversible_sequence(x, self.blocks)
        for block in self.blocks:
            x = block(x)
        return x

    def inverse(self, y: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``, the blocks' inverses in reverse order."""
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y


class ResidualStack(nn.Module):
    """The ResNet peer of ``RevNet``: ``depth`` blocks ``x -> x + H(x)`` on ``(B, channels, H, W)``.

    ``H = conv_residual_fn(channels, hidden)`` (He et al. 2016), the same shape and the same two
    convolutions per residual function as a RevNet block's F or G. Not invertible in general; its
    activations are all stored by autograd, so its saved bytes grow linearly in depth.
    """

    def __init__(self, channels: int, depth: int, hidden: int = 32) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList(conv_residual_fn(channels, hidden) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        _check_image(x)
        for h in self.blocks:
            x = x + h(x)
        return x


# ----------------------------------------------------------------------------- i-RevNet

class IRevNet(nn.Module):
    """An i-RevNet classifier for small images such as the 8×8 digits (Jacobsen et al. 2018).

    ``features(x)``: ``(B, in_channels, H, W)`` --space_to_depth--> ``(B, 4 in_channels, H/2, W/2)``
    --pad_channels--> ``(B, C0, H/2, W/2)`` with ``C0 = pad_to`` (or ``4 in_channels`` when
    ``pad_to`` is None) --RevNet stage 0--> then, for every further stage s, space_to_depth
    (channels ×4, resolution /2) and RevNet stage s. For the digits with the defaults:
    ``(B, 1, 8, 8) -> (B, 4, 4, 4) -> (B, 16, 4, 4) -> stage -> (B, 64, 2, 2) -> stage``.
    Every step is invertible (the padding injectively), so ``inverse(features(x)) == x`` up to
    round-off: the network discards no information before its head.

    The head (``ReLU -> global average pool -> Linear``, as in the paper) maps the features to
    ``num_classes`` logits; it is the only non-invertible part. ``nll(batch)`` takes the flat
    ``(B, C·H·W + 1)`` layout of ``dgmlib.ode.digits_classification_data`` (pixels, then label)
    and returns the cross-entropy in nats per example, so ``dgmlib.train.fit`` trains it.

    Args:
        in_channels, image_size: the input is ``(B, in_channels, image_size, image_size)``.
        pad_to: channels after the injective padding (even, >= 4 in_channels), or None for none.
        depths: reversible blocks per stage; ``len(depths)`` stages need ``image_size`` divisible by
            ``2 ** len(depths)``.
        hidden: hidden channels of every F and G.
        num_classes: outputs of the head.
        memory_efficient: backpropagate through ``reversible_sequence`` (True) or plain autograd.

    Raises:
        ValueError: for an image size not divisible by ``2 ** len(depths)``, a bad ``pad_to`` or odd
            stage channels; in ``features``, ``logits`` and ``nll``, for input of the wrong shape.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, pad_to: int | None = 16,
                 depths: Sequence[int] = (2, 2), hidden: int = 32, num_classes: int = 10,
                 memory_efficient: bool = True) -> None:
        super().__init__()
        if not depths:
            raise ValueError("depths must name at least one stage")
        if image_size % 2 ** len(depths):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{len(depths)} for {len(depths)} "
                             "space_to_depth steps")
        squeezed = 4 * in_channels
        channels = squeezed if pad_to is None else pad_to
        if channels < squeezed or channels % 2:
            raise ValueError(f"pad_to must be even and >= 4 * in_channels = {squeezed}, got {pad_to}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.squeezed, self.channels = squeezed, channels
        stages = []
        for s, depth in enumerate(depths):
            stages.append(RevNet(channels * 4 ** s, depth, hidden, memory_efficient))
        self.stages = nn.ModuleList(stages)
        self.out_channels = channels * 4 ** (len(depths) - 1)
        self.out_size = image_size // 2 ** len(depths)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.out_channels,
                                                                                               num_classes))

    def _check_input(self, x: Tensor) -> None:
        _check_image(x)
        want = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, out_channels, H / 2**S, W / 2**S)``, invertibly."""
        self._check_input(x)
        h = pad_channels(space_to_depth(x), self.channels)
        for s, stage in enumerate(self.stages):
            if s > 0:
                h = space_to_depth(h)
            h = stage(h)
        return h

    def inverse(self, features: Tensor) -> Tensor:
        """The image ``(B, in_channels, H, W)`` whose ``features`` these are (exact up to round-off)."""
        _check_image(features, "features")
        want = (self.out_channels, self.out_size, self.out_size)
        if tuple(features.shape[1:]) != want:
            raise ValueError(f"features must have shape (B, {', '.join(map(str, want))}), "
                             f"got {tuple(features.shape)}")
        h = features
        for s in range(len(self.stages) - 1, -1, -1):
            h = self.stages[s].inverse(h)
            if s > 0:
                h = depth_to_space(h)
        return depth_to_space(unpad_channels(h, self.squeezed))

    def logits(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, num_classes)`` unnormalised log-probabilities."""
        return self.head(self.features(x))

    def _split(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = split_labelled(batch, self.in_channels * self.image_size ** 2, self.num_classes)
        return x.reshape(-1, self.in_channels, self.image_size, self.image_size), labels  # (B, C, H, W)

    def nll(self, batch: Tensor) -> Tensor:
        """Cross-entropy ``-log p(label | x)`` in nats, shape ``(B,)``, for a flat ``(B, D + 1)`` batch."""
        x, labels = self._split(batch)
        return F_.cross_entropy(self.logits(x), labels, reduction="none")

    @torch.no_grad()
    def accuracy(self, batch: Tensor) -> float:
        """Fraction of a flat ``(B, D + 1)`` batch classified correctly."""
        x, labels = self._split(batch)
        return (self.logits(x).argmax(1) == labels).float().mean().item()
