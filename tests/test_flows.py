"""Every bijection: inverse round trip and log-det against slogdet of the autograd Jacobian."""

import math

import pytest
import torch
from torch import nn

from dgmlib import flows

EVENT_IMG = (2, 4, 4)


def _randomise(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Couplings start at the identity; give every parameter a random value so the test bites."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


def _coupling_net(event, out_channels=2, squeeze=False):
    return flows.MLPConditioner(event, hidden=16, num_layers=1, out_channels=out_channels, squeeze_out=squeeze)


BIJECTIONS = {
    "planar": lambda: flows.Planar(3),
    "planar_stack": lambda: flows.Compose(flows.Planar(3), flows.Planar(3), flows.Planar(3)),
    "additive_checkerboard": lambda: flows.AdditiveCoupling(
        flows.checkerboard_mask(EVENT_IMG), _coupling_net(EVENT_IMG, 1, True)),
    "affine_checkerboard": lambda: flows.AffineCoupling(
        flows.checkerboard_mask(EVENT_IMG, 1), _coupling_net(EVENT_IMG)),
    "affine_channel": lambda: flows.AffineCoupling(flows.channel_mask(EVENT_IMG), _coupling_net(EVENT_IMG)),
    "scaling": lambda: flows.Scaling(EVENT_IMG),
    "permutation": lambda: flows.Permutation.random(EVENT_IMG, seed=3),
    "reverse": lambda: flows.Permutation.reverse((5,)),
    "logit": lambda: flows.Logit(EVENT_IMG),
    "affine_conv_channel": lambda: flows.AffineCoupling(flows.channel_mask(EVENT_IMG, 1),
                                                        flows.ConvConditioner(2, hidden=4)),
    "realnvp": lambda: flows.realnvp(EVENT_IMG, num_couplings=3, hidden=4).transform,
    "nice": lambda: flows.nice(EVENT_IMG, num_couplings=2, hidden=16, num_layers=1).transform,
}


def _input(bij: flows.Bijection, batch: int = 3) -> torch.Tensor:
    x = torch.rand(batch, *bij.event_shape, dtype=torch.float64)
    # Logit and the models starting with it take data in (0, 1); the others any real input.
    if not isinstance(bij, flows.Logit) and not (isinstance(bij, flows.Compose)
                                                  and isinstance(bij.transforms[0], flows.Logit)):
        x = 4 * x - 2
    return x


@pytest.mark.parametrize("name", sorted(BIJECTIONS))
def test_round_trip(name):
    bij = _randomise(BIJECTIONS[name]()).double()
    x = _input(bij)
    z, ld_fwd = bij(x)
    x_back, ld_inv = bij.inverse(z)
    assert z.shape == x.shape and ld_fwd.shape == (3,) and ld_inv.shape == (3,)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ld_inv, -ld_fwd, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(BIJECTIONS))
def test_log_det_matches_autograd_jacobian(name):
    bij = _randomise(BIJECTIONS[name]()).double()
    x = _input(bij)
    _, log_det = bij(x)
    reference = flows.jacobian_log_det(bij, x)  # jacrev + slogdet, one example at a time
    assert torch.isfinite(reference).all()  # a non-singular Jacobian
    torch.testing.assert_close(log_det, reference, atol=1e-8, rtol=1e-8)
    # ...and the inverse's log-det matches the Jacobian of the inverse.
    z, _ = bij(x)
    torch.testing.assert_close(bij.inverse(z)[1], flows.jacobian_log_det(bij.inverse, z), atol=1e-8, rtol=1e-8)


def test_coupling_respects_mask():
    mask = flows.checkerboard_mask(EVENT_IMG)
    bij = _randomise(flows.AffineCoupling(mask, _coupling_net(EVENT_IMG))).double()
    x = torch.randn(4, *EVENT_IMG, dtype=torch.float64)
    z, _ = bij(x)
    kept = mask.bool().expand_as(x)
    assert torch.equal(z[kept], x[kept])
    assert not torch.allclose(z[~kept], x[~kept])
    # The transformed half depends only on the kept half: changing a transformed input entry
    # changes only that entry of the output.
    jac = torch.func.jacrev(lambda xb: bij(xb.unsqueeze(0))[0].flatten())(x[0]).reshape(32, 32)
    m = mask.flatten().bool()
    assert torch.count_nonzero(jac[~m][:, ~m] - torch.diag(torch.diagonal(jac[~m][:, ~m]))) == 0


def test_planar_constraint_keeps_invertibility():
    planar = flows.Planar(2)
    with torch.no_grad():  # a raw u that would break invertibility: w^T u = -5
        planar.w.copy_(torch.tensor([1.0, 0.0]))
        planar.u.copy_(torch.tensor([-5.0, 0.0]))
    assert planar.w @ planar.u_hat() > -1
    x = torch.linspace(-3, 3, 101)[:, None].repeat(1, 2)
    z, _ = planar(x)
    assert (z[1:, 0] > z[:-1, 0]).all()  # strictly increasing along w, hence injective


def test_masks():
    cb = flows.checkerboard_mask((1, 2, 2))
    assert cb.tolist() == [[[1.0, 0.0], [0.0, 1.0]]]
    assert torch.equal(flows.checkerboard_mask((1, 2, 2), 1), 1 - cb)
    ch = flows.channel_mask((4, 1, 1))
    assert ch.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="C >= 2"):
        flows.channel_mask((1, 8, 8))


def test_change_of_variables_integrates_to_one():
    """A trained-like 2D flow's density, exp(log N(f(x)) + log_det), integrates to 1 on a grid."""
    torch.manual_seed(0)
    flow = flows.Flow(flows.Compose(
        _randomise(flows.Planar(2), 0.8),
        _randomise(flows.AffineCoupling(torch.tensor([1.0, 0.0]), _coupling_net((2,))), 0.3),
        flows.Permutation.reverse((2,)),
        _randomise(flows.AffineCoupling(torch.tensor([1.0, 0.0]), _coupling_net((2,))), 0.3),
    )).double()
    lim, n = 20.0, 1500  # the flow has heavy tails: samples reach |x| ~ 36
    xs = torch.linspace(-lim, lim, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (xs[1] - xs[0]) ** 2
    assert abs(mass.item() - 1.0) < 2e-3


def test_sampling_and_codes():
    flow = flows.realnvp((1, 4, 4), num_couplings=2, hidden=4, num_levels=17)
    _randomise(flow, 0.1)
    x = flow.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 4, 4) and (x >= 0).all() and (x <= 1).all()
    torch.testing.assert_close(flow.decode(flow.encode(x)), x, atol=1e-4, rtol=1e-4)
    assert torch.equal(flow.sample(1, temperature=0.0), flow.decode(torch.zeros(1, 1, 4, 4)))


@pytest.mark.parametrize("bad, err, match", [
    (torch.rand(3, 1, 8, 7), ValueError, "shape"),
    (torch.rand(3, 64), ValueError, "shape"),
    (torch.full((3, 1, 8, 8), float("nan")), ValueError, "NaN"),
    (torch.randint(0, 17, (3, 1, 8, 8)), TypeError, "floating point"),
    ([[0.5] * 64], TypeError, "torch.Tensor"),
    (torch.full((3, 1, 8, 8), 1.5), ValueError, r"\[0, 1\]"),
])
def test_bad_input_fails_loudly(bad, err, match):
    flow = flows.realnvp((1, 8, 8), num_couplings=2, hidden=8)
    with pytest.raises(err, match=match):
        flow.log_prob(bad)


@pytest.mark.parametrize("bad, match", [
    (torch.full((2, 1, 8, 8), 17.0), "range"),
    (torch.full((2, 1, 8, 8), 3.5), "integer"),
    (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
])
def test_nll_rejects_bad_levels(bad, match):
    flow = flows.realnvp((1, 8, 8), num_couplings=2, hidden=4, num_levels=17)
    with pytest.raises(ValueError, match=match):
        flow.nll(bad)


def test_construction_errors():
    with pytest.raises(ValueError, match="binary"):
        flows.AffineCoupling(torch.full((4,), 0.5), nn.Identity())
    with pytest.raises(ValueError, match="neither all 0 nor all 1"):
        flows.AffineCoupling(torch.ones(4), nn.Identity())
    with pytest.raises(ValueError, match="permutation"):
        flows.Permutation(torch.tensor([0, 0, 1]), (3,))
    with pytest.raises(ValueError, match="event shapes"):
        flows.Compose(flows.Scaling((2,)), flows.Scaling((3,)))
    coupling = flows.AffineCoupling(torch.tensor([1.0, 0.0]), nn.Identity())
    with pytest.raises(ValueError, match="coupling net must return"):
        coupling(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="num_levels"):
        flows.realnvp((1, 4, 4), num_couplings=1, hidden=4, num_levels=None).nll(torch.zeros(1, 1, 4, 4))


def test_flow_log_prob_is_normal_for_identity_like_flow():
    flow = flows.Flow(flows.Scaling((3,)))
    x = torch.randn(4, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(flow.log_prob(x), expected)
    assert math.isclose(flow.base_log_prob(torch.zeros(1, 3)).item(), -1.5 * math.log(2 * math.pi), rel_tol=1e-6)


def test_planar_log_det_has_no_cancellation_in_float32():
    """w.u far below -1: w.u_hat = softplus(w.u) - 1 rounds to -1 in float32, and the naive
    log|1 + h' w.u_hat| was -inf. The log-det must match slogdet of the Jacobian in float64."""
    layer = flows.Planar(2)
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, 0.5]))
        layer.u.copy_(torch.tensor([-19.0, 0.0]))  # w.u = -19: the old log-det was -inf
    x = torch.tensor([[0.0, 0.0], [0.3, -0.2], [2.0, 1.0]])
    _, log_det = layer(x)
    assert torch.isfinite(log_det).all()
    double = flows.Planar(2).double()
    double.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    for xi, ld in zip(x.double(), log_det):
        jac = torch.func.jacrev(lambda v: double(v[None])[0][0])(xi)
        assert ld.item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-4)
    _, inv_log_det = layer.inverse(layer(x[2:])[0])  # away from a = 0, where the map is nearly singular
    torch.testing.assert_close(inv_log_det, -log_det[2:])
