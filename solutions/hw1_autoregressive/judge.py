"""The judges of hw1_autoregressive: every test cell's points, decided in the grader (``dgmlib.grading.judge``).

Each judge draws its inputs and parameters from ``rng`` (a secret seed per submission), calls the student's
code through the cell's probe, and compares with the reference: the solution's own cells (``REF``) and
``dgmlib.autoregressive``, both here in the grader. Properties that the visible tests check with autograd in the
kernel (which pixel an output depends on) are checked here from the student's outputs alone, by perturbing one
input pixel at a time. The trained model's NLL is measured by loading its parameters into the reference
``MyPixelCNN``: the student's methods are never asked for a number that earns points.

This file is the instructor's: it is never released, and the student's kernel never sees it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dgmlib import autoregressive, data, train
from dgmlib.grading.judge import (JudgeFailure, as_tensor, expect, expect_close, expect_equal, expect_le,
                                  expect_shape, judge, parameters, randomise, solution_cells)

REF = solution_cells(Path(__file__).with_name("hw1_autoregressive.ipynb"), "made", "made_net", "conv",
                     "stack_masks", "conv_with_mask", "gated", "gated_model", "pixelcnn")

F64 = torch.float64


def _degrees(d: int, hidden: list[int], rng: torch.Generator) -> list[torch.Tensor]:
    return autoregressive.made_degrees(d, hidden, "random", rng)


def _student_masks(k, degrees: list[torch.Tensor]) -> list[torch.Tensor]:
    masks = k.made_masks(degrees)
    expect(isinstance(masks, list) and all(isinstance(m, torch.Tensor) for m in masks),
           "made_masks must return a list of tensors")
    expect(len(masks) == len(degrees), "one mask per weight matrix: L hidden layers + the outputs")
    expect(all(m.is_floating_point() for m in masks), "masks are float tensors of 0s and 1s")
    return masks


def dependence(outputs_of, x: torch.Tensor, delta: float = 0.37) -> torch.Tensor:
    """(H W, H W) booleans in raster order: does some output at pixel i change when input pixel j changes?

    ``outputs_of(batch (N, C, H, W)) -> (N, C_out, H, W)`` is evaluated on each image of ``x`` (B, C, H, W)
    and on copies with one (pixel, channel) moved by ``delta``. Outputs come from the student's kernel; the
    comparison is made here.
    """
    _, c, h, w = x.shape
    n = h * w
    dep = torch.zeros(n, n, dtype=torch.bool)
    for image in x:
        batch = image.repeat(n * c + 1, 1, 1, 1)  # (1 + n c, C, H, W): the image, then one change per input
        for j in range(n):
            for ch in range(c):
                batch[1 + j * c + ch, ch, j // w, j % w] += delta
        out = as_tensor(outputs_of(batch), "the output").to(F64)
        expect(out.dim() == 4 and out.shape[0] == n * c + 1 and out.shape[-2:] == (h, w),
               f"outputs of shape (N, C_out, {h}, {w}) expected, got {tuple(out.shape)}")
        change = (out[1:] - out[:1]).abs().reshape(n, c, out.shape[1], n)  # (input j, channel, out channel, pixel i)
        dep |= (change > 1e-9).any(1).any(1).T
    return dep


def _window(h: int, w: int, k: int, kind: str) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r, c = r.flatten(), c.flatten()
    raster = torch.arange(h * w)
    window = ((r[:, None] - r[None, :]).abs() <= k // 2) & ((c[:, None] - c[None, :]).abs() <= k // 2)
    before = raster[None, :] < raster[:, None]
    return window & (before | torch.eye(h * w, dtype=torch.bool)) if kind == "B" else window & before


def _remote_conv(k, cin: int, cout: int, size: int, kind: str, rng: torch.Generator, scale: float = 0.3):
    """The student's MaskedConv2d with random weight and bias chosen here (the mask stays theirs), in float64."""
    layer = k.MaskedConv2d(cin, cout, size, kind)
    weights = randomise(torch.nn.Conv2d(cin, cout, size), rng, scale)
    layer.load_state_dict(parameters(weights), strict=False)
    layer.double()
    return layer, weights


KEEP_WEIGHT = ("forward changed the layer's weight: convolve with the new tensor self.weight * self.mask and leave "
               "the parameter self.weight as it is (no self.weight.data *= self.mask, self.weight.mul_(...) or "
               "self.weight.data = ... in forward; Part 2)")


def _expect_kept(module, expected: dict[str, torch.Tensor], what: str) -> None:
    """After the student's forward ran, ``module``'s parameters (read from the kernel) must still be ``expected``:
    a forward that masks its weight in place gives the right outputs but changes the parameter (and breaks
    ``torch.func``, with which the visible tests take Jacobians)."""
    state = module.state_dict()
    expect(isinstance(state, dict), f"{what} must be a module with a state_dict")
    for name, value in expected.items():
        expect(name in state, f"{what} has no parameter {name}")
        expect_equal(state[name], value, msg=f"{what} ({name}): {KEEP_WEIGHT}")


def _reference_mask(size: int, kind: str) -> torch.Tensor:
    return autoregressive.MaskedConv2d(1, 1, size, kind).mask[0, 0].to(F64)


def _strictly_before(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril(-1)


def _all_images(shape: tuple[int, int, int], levels: int) -> torch.Tensor:
    return REF.all_images(shape, levels)


def _log_prob_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log P(y) (B,) in nats from a model's (B, K, 1, H, W) logits, computed here."""
    return torch.log_softmax(logits.to(F64), 1).gather(1, y.long().unsqueeze(1)).sum((1, 2, 3, 4))


# ------------------------------------------------------------------ Part 1: MADE


@judge("test_made_masks")
def made_masks(k, rng):
    cases = [[torch.tensor([1, 2, 3]), torch.tensor([1, 2, 1, 2])]]
    for d, hidden in ((5, [7]), (int(torch.randint(6, 13, (1,), generator=rng)), [16, 8, 12]), (12, [20, 20])):
        cases.append(_degrees(d, hidden, rng))
    for degrees in cases:
        mine = _student_masks(k, degrees)
        for m, r in zip(mine, autoregressive.made_masks(degrees)):
            expect_equal(m, r.to(m.dtype), msg="MADE's mask (Eq. 12-13)")


@judge("test_made_causal")
def made_causal(k, rng):
    """The Jacobian of a MADE built from the student's masks: its pattern is exactly MADE's connectivity, and
    the probabilities of all 16 binary inputs sum to 1 (computed here, with the student's masks)."""
    for d, hidden in ((6, [16, 16]), (5, [9]), (7, [14, 14]), (8, [10, 12, 10])):
        degrees = _degrees(d, hidden, rng)
        masks = _student_masks(k, degrees)
        net = randomise(REF.MaskedMLP(degrees), rng, 0.7)
        for i, mask in enumerate(masks):
            expect_shape(mask, tuple(getattr(net, f"mask_{i}").shape), "shapes (out, in): (H_1, D), ..., (D, H_L)")
            getattr(net, f"mask_{i}").copy_(mask.to(F64))
        reference = autoregressive.made_masks(degrees)
        paths = reference[0].to(F64)
        for mask in reference[1:]:
            paths = mask.to(F64) @ paths  # (d, j): paths from input j to output d
        for _ in range(2):
            x = 2 * torch.randn(d, generator=rng, dtype=F64)
            jac = torch.func.jacrev(lambda v: net(v.unsqueeze(0)).squeeze(0))(x)
            expect_equal(jac != 0, paths > 0, msg="the Jacobian of a MADE with your masks is MADE's connectivity")
    grid = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=F64)] * 4)  # (16, 4)
    for _ in range(2):
        degrees = _degrees(4, [8, 8], rng)
        masks = _student_masks(k, degrees)
        net = randomise(REF.MaskedMLP(degrees), rng, 1.0)
        for i, mask in enumerate(masks):
            getattr(net, f"mask_{i}").copy_(mask.to(F64))
        expect_close(torch.logsumexp(net.log_prob(grid), 0), 0.0, msg="P(x) summed over all 16 inputs must be 1")


# ------------------------------------------------------------------ Part 2: masked convolutions


@judge("test_mask_conv")
def mask_conv(k, rng):
    for size, kind in ((5, "A"), (5, "B"), (3, "A"), (7, "B"), (7, "A"), (1, "B"), (3, "B")):
        cin, cout = int(torch.randint(1, 4, (1,), generator=rng)), int(torch.randint(1, 4, (1,), generator=rng))
        layer, weights = _remote_conv(k, cin, cout, size, kind, rng)
        state = layer.state_dict()
        expect(isinstance(state, dict) and "mask" in state, "the mask must be a registered buffer named mask")
        mask = as_tensor(state["mask"], "the mask")
        expect(mask.is_floating_point(), "the mask is a float tensor")
        expect_equal(mask.to(F64), _reference_mask(size, kind), msg=f"mask {kind}, k = {size}, a (k, k) buffer")
        x = torch.randn(2, cin, 6, 5, generator=rng, dtype=F64)
        # new weights behind the mask too: forward must mask the kernel at every call
        expected = F.conv2d(x, weights.weight * _reference_mask(size, kind), weights.bias, padding=size // 2)
        expect_close(layer(x), expected, msg="forward must convolve with weight * mask, the bias and padding k // 2")
        _expect_kept(layer, parameters(weights), f"MaskedConv2d(k = {size}, mask {kind})")


@judge("test_conv_causal")
def conv_causal(k, rng):
    for size, kind in ((5, "A"), (5, "B"), (3, "A"), (3, "B")):
        h, w = int(torch.randint(4, 8, (1,), generator=rng)), int(torch.randint(4, 8, (1,), generator=rng))
        layer, weights = _remote_conv(k, 2, 3, size, kind, rng)
        dep = dependence(layer, torch.randn(2, 2, h, w, generator=rng, dtype=F64))
        _expect_kept(layer, parameters(weights), f"MaskedConv2d(k = {size}, mask {kind})")
        expect_equal(dep, _window(h, w, size, kind), msg=f"mask {kind}: the input pixels each output pixel depends on")
    # a stack A, B, B with tanh between (applied here): strictly causal, and it sees the pixel left and above
    for h, w in ((5, 7), (8, 4)):
        convs = [_remote_conv(k, cin, cout, 3, kind, rng)[0] for cin, cout, kind in ((1, 4, "A"), (4, 4, "B"), (4, 3, "B"))]

        def stack(batch):
            out = as_tensor(convs[0](batch), "the output")
            for conv in convs[1:]:
                out = as_tensor(conv(torch.tanh(out)), "the output")
            return out

        dep = dependence(stack, 3 * torch.randn(1, 1, h, w, generator=rng, dtype=F64))
        n = h * w
        expect(not bool((dep & ~_strictly_before(n)).any()), "a stack A, B, B must be strictly causal")
        left = torch.tensor([bool(dep[i, i - 1]) for i in range(n) if i % w])
        above = torch.tensor([bool(dep[i, i - w]) for i in range(w, n)])
        expect(bool(left.all() and above.all()), "each pixel must see the pixel to its left and the one above")


# ------------------------------------------------------------------ Part 3: the gated PixelCNN


@judge("test_stack_masks")
def stack_masks(k, rng):
    for size in (1, 3, 5, 7):
        for first in (True, False):
            v, h = k.vertical_mask(size, first), k.horizontal_mask(size, first)
            expect(as_tensor(v, "vertical_mask").is_floating_point() and as_tensor(h, "horizontal_mask").is_floating_point(),
                   "the masks are float tensors")
            expect_equal(v, autoregressive.vertical_mask(size, first).to(v.dtype), msg=f"vertical_mask({size}, {first})")
            expect_equal(h, autoregressive.horizontal_mask(size, first).to(h.dtype), msg=f"horizontal_mask({size}, {first})")


def _remote_gated_layer(k, cin: int, channels: int, size: int, first: bool, rng: torch.Generator, scale: float = 0.5):
    """The student's GatedLayer and the reference one with the same parameters AND the student's masks."""
    layer = k.GatedLayer(cin, channels, size, first)
    reference = randomise(REF.GatedLayer(cin, channels, size, first), rng, scale)
    layer.load_state_dict(parameters(reference), strict=False)
    layer.double()
    state = layer.state_dict()
    for name in ("v_conv.mask", "h_conv.mask"):  # Part 3's masks are judged on their own: use the student's here
        expect(name in state, f"GatedLayer keeps the given convolutions (no {name})")
        dict(reference.named_buffers())[name].copy_(as_tensor(state[name], name).to(F64))
    return layer, reference


@judge("test_gated_layer")
def gated_layer(k, rng):
    for cin, channels, size, first in ((4, 4, 3, False), (1, 4, 5, True), (3, 3, 5, False), (2, 3, 3, False)):
        layer, reference = _remote_gated_layer(k, cin, channels, size, first, rng)
        v = torch.randn(2, cin, 5, 6, generator=rng, dtype=F64)
        h = v if first else torch.randn(2, cin, 5, 6, generator=rng, dtype=F64)
        out = layer(v, h)
        expect(isinstance(out, tuple) and len(out) == 2, "forward returns the pair (v', h')")
        v_ref, h_ref = reference(v, h)
        expect_close(out[0], v_ref, msg="v' = tanh(a_v,f) * sigmoid(a_v,g) with a_v = v_conv(v)")
        expect_close(out[1], h_ref, msg="h' = h + h_out(gate(h_conv(h) + v_to_h(a_v))) (no residual when first "
                                        "or in_channels != channels)")


def _remote_gated_pair(k, shape, levels: int, channels: int, layers: int, first_kernel: int, rng, scale=0.6):
    """The student's MyGatedPixelCNN and the reference one, with the same random weights, in float64."""
    model = k.MyGatedPixelCNN(shape, levels, channels, layers, first_kernel)
    weights = randomise(REF.MyGatedPixelCNN(shape, levels, channels, layers, first_kernel), rng, scale)
    model.load_state_dict(parameters(weights), strict=False)
    model.double()
    return model, weights


def _remote_gated_model(k, shape, levels: int, channels: int, layers: int, first_kernel: int, rng, scale=0.6):
    return _remote_gated_pair(k, shape, levels, channels, layers, first_kernel, rng, scale)[0]


def _logits(model, y: torch.Tensor, levels: int) -> torch.Tensor:
    out = as_tensor(model(y), "the model's logits").to(F64)
    expect_shape(out, (y.shape[0], levels, 1, *y.shape[-2:]), "forward(y) is (B, K, 1, H, W)")
    return out


@judge("test_gated_causal")
def gated_causal(k, rng):
    for shape, layers, k1 in (((1, 5, 6), 3, 5), ((1, 6, 4), 4, 3), ((1, 4, 7), 2, 5), ((1, 7, 7), 3, 7)):
        model = _remote_gated_model(k, shape, 4, 3, layers, k1, rng)
        n = shape[1] * shape[2]
        dep = dependence(lambda y: _logits(model, y, 4).squeeze(2), 3 * torch.rand(2, *shape, generator=rng, dtype=F64))
        expect(not bool((dep & ~_strictly_before(n)).any()), "the logits at a pixel depend on that pixel or a later one")
    # the vertical stack alone: v' of the first layer at row r depends only on the rows above r
    layer, _ = _remote_gated_layer(k, 1, 2, 3, True, rng)
    dep = dependence(lambda x: layer(x, x)[0], torch.randn(1, 1, 4, 5, generator=rng, dtype=F64))
    rows = torch.arange(20) // 5
    expect(not bool((dep & (rows[None, :] >= rows[:, None])).any()), "the vertical stack sees only the rows above")


@judge("test_blind_spot")
def blind_spot(k, rng):
    for shape, layers, k1 in (((1, 6, 6), 5, 3), ((1, 5, 5), 4, 3), ((1, 4, 7), 6, 5)):
        n = shape[1] * shape[2]
        # Weights and inputs at which the reference, with the same weights, shows every dependence: with some random
        # weights a pixel's head is dead on every input drawn (its logits then depend on nothing), which no model
        # can be blamed for. Such a draw is the judge's bad luck and is drawn again (the reference failed at 3 of
        # 300 seeds before); a blind spot is structural and stays missing on every draw.
        for _ in range(50):
            model, reference = _remote_gated_pair(k, shape, 4, 8, layers, k1, rng)
            x = 3 * torch.rand(3, *shape, generator=rng, dtype=F64)
            with torch.no_grad():
                if bool((dependence(lambda y: reference(y).squeeze(2), x) == _strictly_before(n)).all()):
                    break
        dep = dependence(lambda y: _logits(model, y, 4).squeeze(2), x)
        expect_equal(dep, _strictly_before(n), msg="each pixel's logits must depend on every earlier pixel, and on no other")


@judge("test_gated_normalised")
def gated_normalised(k, rng):
    for shape, levels, layers in (((1, 2, 2), 3, 2), ((1, 2, 3), 2, 3), ((1, 3, 2), 3, 3)):
        model = _remote_gated_model(k, shape, levels, 4, layers, 3, rng, scale=1.5)
        images = _all_images(shape, levels)
        log_p = _log_prob_from_logits(_logits(model, images, levels), images)
        expect_close(torch.logsumexp(log_p, 0), 0.0, msg="the probabilities of all images must sum to 1")
        expect(bool(log_p.max() - log_p.min() > 0.5), "random weights give unequal probabilities")


# ------------------------------------------------------------------ Part 4: PixelCNN


@judge("test_pixelcnn")
def pixelcnn(k, rng):
    for shape, levels, channels, layers, k1, ks in (((1, 6, 5), 4, 6, 2, 5, 3), ((1, 4, 4), 3, 3, 3, 3, 3),
                                                    ((1, 5, 7), 5, 4, 1, 7, 5)):
        model = k.MyPixelCNN(shape, levels, channels, layers, k1, ks)
        reference = randomise(REF.MyPixelCNN(shape, levels, channels, layers, k1, ks), rng, 0.3)
        state = model.state_dict()
        want = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
        got = {name: tuple(as_tensor(t, name).shape) for name, t in state.items()} if isinstance(state, dict) else {}
        expect(got == want, "MyPixelCNN's layers must be first, layers and head as the instructions give them "
                            f"(parameters and buffers {sorted(got)[:6]}...)")
        model.load_state_dict(parameters(reference), strict=False)
        model.double()
        y = torch.randint(0, levels, (3, *shape), generator=rng).to(F64)
        # the same function as the reference with the same weights: masks A then B, the residuals, the head
        expect_close(_logits(model, y, levels), reference(y), msg="the logits of MyPixelCNN (mask A first, residual "
                                                                  "mask-B layers, the 1x1 head)")
        _expect_kept(model, parameters(reference), "MyPixelCNN")
    tiny = k.MyPixelCNN((1, 2, 2), 3, 4, 2, 3, 3)
    tiny.load_state_dict(parameters(randomise(REF.MyPixelCNN((1, 2, 2), 3, 4, 2, 3, 3), rng, 1.0)), strict=False)
    tiny.double()
    images = _all_images((1, 2, 2), 3)
    expect_close(torch.logsumexp(_log_prob_from_logits(_logits(tiny, images, 3), images), 0), 0.0,
                 msg="the probabilities of all 81 images of 2 x 2 must sum to 1")


TEST_NLL_BOUND = 100.0
"""nats/image; the reference solution gets about 88 in fast mode."""


@judge("test_nll")
def nll(k, rng):
    """The exact test NLL of the student's trained parameters, in the reference architecture, on the 447 test
    digits, with the course's code; and the same model on the 350 validation digits, so that a model fitted to
    the test digits themselves is caught (its test NLL would lie far below its validation NLL)."""
    state = k.model.state_dict()
    expect(isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
           "model must be a trained MyPixelCNN")
    try:
        first = state["first.weight"]
        channels, k1 = first.shape[0], first.shape[-1]
        layers = sum(1 for name in state if name.startswith("layers.") and name.endswith(".weight"))
        ks = state["layers.0.weight"].shape[-1] if layers else 3
        reference = REF.MyPixelCNN((1, 8, 8), 17, channels, layers, k1, ks)
        fresh_masks = {name: b.clone() for name, b in reference.named_buffers()}
        reference.load_state_dict({name: t.float() for name, t in state.items()}, strict=True)
    except (KeyError, RuntimeError, IndexError, ValueError) as err:
        raise JudgeFailure(f"model's parameters do not fit MyPixelCNN(images.shape, images.num_levels, ...) as "
                           f"instructed ({str(err)[:200]})") from None
    expect(layers >= 2, "the trained model needs at least 2 mask-B layers")
    for name, mask in fresh_masks.items():
        expect_equal(dict(reference.named_buffers())[name], mask, msg=f"the trained model's {name} must stay mask A/B")
    reference.eval()
    test_nll = expect_le(train.evaluate(reference, data.load_digits("test")), TEST_NLL_BOUND,
                         "exact test NLL (nats/image) of your trained parameters")
    val_nll = train.evaluate(reference, data.load_digits("val"))
    expect(test_nll >= val_nll - 5.0, f"the test NLL ({test_nll:.1f}) lies far below the validation NLL "
                                      f"({val_nll:.1f}): train on the training digits only")
    expect(math.isfinite(test_nll), "a finite NLL")
