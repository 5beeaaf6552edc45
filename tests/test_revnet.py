"""RevNet and i-RevNet (dgmlib.revnet): exact inversion, exact gradients, memory flat in depth.

Theorems checked (lecture 03; Gomez et al. 2017, Eq. 1-2 and Algorithm 1; Jacobsen et al. 2018):
a reversible block is inverted by x2 = y2 - G(y1), x1 = y1 - F(x2); backpropagating through a
stack by rebuilding each block's input from its output gives the same gradients as storing the
activations, while the bytes saved for backward stay constant in depth; an i-RevNet's features
determine the image exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgmlib import revnet
from dgmlib.ode import digits_classification_data, saved_tensor_bytes
from dgmlib.train import fit

F64 = torch.float64


def _grads(model: nn.Module, x: torch.Tensor, w: torch.Tensor, memory_efficient: bool):
    """d<w, model(x)>/d(x, θ) with the memory-efficient or the ordinary backward pass."""
    for m in model.modules():
        if isinstance(m, revnet.RevNet):
            m.memory_efficient = memory_efficient
    x = x.detach().requires_grad_()
    out = model(x)
    return torch.autograd.grad((out * w).sum(), [x, *model.parameters()])


def test_block_inverts_exactly():
    block = revnet.ReversibleBlock(6, hidden=8).to(F64)
    x = torch.randn(3, 6, 5, 7, dtype=F64)
    y = block(x)
    assert (y - x).abs().max() > 1e-2  # not the identity
    torch.testing.assert_close(block.inverse(y), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(block(block.inverse(x)), x, rtol=0, atol=1e-12)


def test_block_equations_1_and_2():
    f, g = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)
    block = revnet.ReversibleBlock(F=f, G=g)
    x = torch.randn(2, 4, 4, 4)
    x1, x2 = x[:, :2], x[:, 2:]
    y1 = x1 + f(x2)
    torch.testing.assert_close(block(x), torch.cat([y1, x2 + g(y1)], 1))


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_stack_inverts_exactly(memory_efficient):
    net = revnet.RevNet(8, depth=6, hidden=8, memory_efficient=memory_efficient).to(F64)
    x = torch.randn(2, 8, 4, 4, dtype=F64)
    torch.testing.assert_close(net.inverse(net(x)), x, rtol=0, atol=1e-11)


def test_irevnet_features_determine_the_image():
    for pad_to in (16, None):
        net = revnet.IRevNet(pad_to=pad_to, depths=(2, 2), hidden=8).to(F64)
        x = torch.rand(5, 1, 8, 8, dtype=F64)
        h = net.features(x)
        assert h.shape == (5, net.out_channels, 2, 2)
        torch.testing.assert_close(net.inverse(h), x, rtol=0, atol=1e-12)
    # real digits, in float32: recovered to round-off
    net = revnet.IRevNet(depths=(3, 3), hidden=16)
    x = digits_classification_data("val")[:32, :-1].reshape(-1, 1, 8, 8)
    torch.testing.assert_close(net.inverse(net.features(x)), x, rtol=0, atol=1e-5)


def test_space_to_depth_is_a_permutation():
    x = torch.arange(2 * 3 * 4 * 6, dtype=F64).reshape(2, 3, 4, 6)
    s = revnet.space_to_depth(x)
    assert s.shape == (2, 12, 2, 3)
    assert torch.equal(s.flatten().sort().values, x.flatten())
    assert torch.equal(revnet.depth_to_space(s), x)
    assert torch.equal(revnet.unpad_channels(revnet.pad_channels(x, 8), 3), x)


def test_stack_gradients_equal_ordinary_autograd():
    net = revnet.RevNet(6, depth=5, hidden=8).to(F64)
    x = torch.randn(3, 6, 5, 5, dtype=F64)
    w = torch.randn(3, 6, 5, 5, dtype=F64)
    ours = _grads(net, x, w, memory_efficient=True)
    ref = _grads(net, x, w, memory_efficient=False)
    assert len(ours) == 1 + 5 * 2 * 4  # input, then 4 tensors (2 weights, 2 biases) per F and G
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_irevnet_gradients_equal_ordinary_autograd():
    net = revnet.IRevNet(depths=(2, 1), hidden=8).to(F64)
    x = torch.rand(4, 1, 8, 8, dtype=F64)
    w = torch.randn(4, 10, dtype=F64)

    def grads(memory_efficient):
        for stage in net.stages:
            stage.memory_efficient = memory_efficient
        xx = x.clone().requires_grad_()
        return torch.autograd.grad((net.logits(xx) * w).sum(), [xx, *net.parameters()])

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_shared_parameters():
    torch.manual_seed(1)
    block = revnet.ReversibleBlock(4, hidden=3).to(F64)
    other = revnet.ReversibleBlock(4, hidden=3).to(F64)
    blocks = [block, other, block]  # one block used twice: its gradients must add up
    x = torch.randn(2, 4, 3, 3, dtype=F64, requires_grad=True)
    params = list(block.parameters()) + list(other.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: revnet.reversible_sequence(x, blocks), (x, *params))
    w = torch.randn(2, 4, 3, 3, dtype=F64)

    def plain(x):
        for b in blocks:
            x = b(x)
        return x

    ours = torch.autograd.grad((revnet.reversible_sequence(x, blocks) * w).sum(), [x, *params])
    ref = torch.autograd.grad((plain(x) * w).sum(), [x, *params])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_frozen_input_and_no_grad():
    net = revnet.RevNet(4, depth=2, hidden=4)
    x = torch.randn(2, 4, 3, 3)  # no requires_grad: only the parameters get gradients
    grads = torch.autograd.grad(net(x).sum(), list(net.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        assert net(x).grad_fn is None


def _saved(model: nn.Module, channels: int = 8) -> int:
    x = torch.randn(4, channels, 8, 8, requires_grad=True)
    return saved_tensor_bytes(lambda: model(x).pow(2).sum())[1]


def test_saved_bytes_flat_in_depth_against_resnet():
    depths = (2, 4, 8, 16)
    rev = [_saved(revnet.RevNet(8, d, hidden=16)) for d in depths]
    plain = [_saved(revnet.RevNet(8, d, hidden=16, memory_efficient=False)) for d in depths]
    res = [_saved(revnet.ResidualStack(8, d, hidden=16)) for d in depths]
    output_bytes = 4 * 8 * 8 * 8 * 4  # the one (B, C, H, W) float32 output kept for backward
    assert rev == [output_bytes] * len(depths)
    for grows in (plain, res):
        steps = [b - a for a, b in zip(grows, grows[1:])]
        per_block = steps[0] / (depths[1] - depths[0])
        for (d0, d1), step in zip(zip(depths, depths[1:]), steps):  # linear: the same bytes per block
            assert step == pytest.approx(per_block * (d1 - d0), rel=1e-6)
        assert grows[-1] > 6 * grows[0]
    assert res[-1] / rev[-1] > 20


def test_irevnet_learns_digits():
    train, val = digits_classification_data("train"), digits_classification_data("val")
    net = revnet.IRevNet(depths=(1, 1), hidden=16)
    fit(net, train, val, epochs=4, batch_size=64, lr=3e-3, progress=False, device="cpu")
    assert net.accuracy(val) > 0.6


@pytest.mark.parametrize("call, error, match", [
    (lambda: revnet.ReversibleBlock(3), ValueError, "even"),
    (lambda: revnet.ReversibleBlock(4, 4)(torch.randn(2, 3, 4, 4)), ValueError, "even number of channels"),
    (lambda: revnet.ReversibleBlock(4, 4)(torch.randn(2, 4, 4)), ValueError, r"\(B, C, H, W\)"),
    (lambda: revnet.ReversibleBlock(4, 4).inverse(torch.randn(2, 5, 4, 4)), ValueError, "even number"),
    (lambda: revnet.RevNet(4, 2)(torch.randn(2, 5, 4, 4)), ValueError, "even number of channels"),
    (lambda: revnet.RevNet(4, 2)(torch.randn(2, 4, 4, 4, 1)), ValueError, "5 dims"),
    (lambda: revnet.RevNet(4, 2)(torch.zeros(2, 4, 4, 4, dtype=torch.long)), TypeError, "floating"),
    (lambda: revnet.RevNet(4, 0), ValueError, "depth"),
    (lambda: revnet.space_to_depth(torch.randn(1, 2, 5, 4)), ValueError, "even height and width"),
    (lambda: revnet.space_to_depth(torch.randn(1, 2, 4, 3)), ValueError, "even height and width"),
    (lambda: revnet.depth_to_space(torch.randn(1, 6, 2, 2)), ValueError, "divisible by 4"),
    (lambda: revnet.pad_channels(torch.randn(1, 6, 2, 2), 4), ValueError, "fewer"),
    (lambda: revnet.IRevNet(image_size=6, depths=(1, 1)), ValueError, "divisible"),
    (lambda: revnet.IRevNet(pad_to=5), ValueError, "pad_to"),
    (lambda: revnet.IRevNet(pad_to=2), ValueError, "pad_to"),
    (lambda: revnet.IRevNet().features(torch.randn(2, 1, 7, 7)), ValueError, r"\(B, 1, 8, 8\)"),
    (lambda: revnet.IRevNet().inverse(torch.randn(2, 63, 2, 2)), ValueError, "features must"),
    (lambda: revnet.IRevNet().nll(torch.randn(2, 64)), ValueError, "65"),
    (lambda: revnet.IRevNet().nll(torch.cat([torch.rand(2, 64), torch.tensor([[3.0], [10.0]])], 1)),
     ValueError, "labels"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
