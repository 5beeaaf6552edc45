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


def _initialised(actnorm: flows.ActNorm) -> flows.ActNorm:
    """Mark an ActNorm as initialised so that the randomised parameters are the ones tested."""
    actnorm.initialized.fill_(True)
    return actnorm


def _glow_level_split():
    """Squeeze -> Glow step -> split (inner: step, squeeze -> step -> unsqueeze), latent left squeezed (8, 2, 2)."""
    inner = flows.Compose(flows.Squeeze((4, 2, 2)), flows.GlowStep((16, 1, 1), hidden=4),
                          flows.Inverse(flows.Squeeze((4, 2, 2))))
    return flows.Compose(flows.Squeeze(EVENT_IMG), flows.GlowStep((8, 2, 2), hidden=4, lu=False),
                         flows.Split(flows.Compose(flows.GlowStep((4, 2, 2), hidden=4), inner)))


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
    # Glow (Kingma & Dhariwal 2018)
    "actnorm": lambda: _initialised(flows.ActNorm(EVENT_IMG)),
    "actnorm_data_init": lambda: flows.ActNorm(EVENT_IMG),  # initialised from the test's first batch
    "invconv1x1": lambda: flows.InvConv1x1((3, 2, 2)),
    "invconv1x1_lu": lambda: flows.InvConv1x1((3, 2, 2), lu=True),
    "squeeze": lambda: flows.Squeeze(EVENT_IMG),
    "unsqueeze": lambda: flows.Inverse(flows.Squeeze(EVENT_IMG)),
    "split": lambda: flows.Split(flows.AffineCoupling(flows.checkerboard_mask((1, 4, 4)), _coupling_net((1, 4, 4)))),
    "glow_step": lambda: flows.GlowStep(EVENT_IMG, hidden=4),
    "glow_step_plain": lambda: flows.GlowStep(EVENT_IMG, hidden=4, lu=False, parity=1),
    "glow_level_split": _glow_level_split,
    "glow": lambda: flows.glow(EVENT_IMG, levels=2, steps_per_level=2, hidden=4).transform,
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
    assert z.shape == (3, *bij.out_shape) and ld_fwd.shape == (3,) and ld_inv.shape == (3,)
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


# --- Glow (Kingma & Dhariwal 2018) ---------------------------------------------------------------

def _channel_data(batch=64, seed=0):
    """Images (B, 3, 4, 4) whose channels have very different means and spreads."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([5.0, -2.0, 0.0])[:, None, None]
    std = torch.tensor([3.0, 0.1, 1.0])[:, None, None]
    return mean + std * torch.randn(batch, 3, 4, 4, generator=g)


def test_actnorm_data_dependent_init_gives_zero_mean_unit_variance():
    layer = flows.ActNorm((3, 4, 4))
    assert not layer.initialized
    layer.eval()
    x = _channel_data()
    torch.testing.assert_close(layer(x)[0], x)  # eval mode: no initialisation, a fresh layer is the identity
    assert not layer.initialized
    layer.train()
    z, log_det = layer(x)
    assert layer.initialized
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    std = x.var(dim=(0, 2, 3), unbiased=False).sqrt()
    torch.testing.assert_close(log_det, (-16 * torch.log(std).sum()).expand(64))  # H W sum log|s|
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(_channel_data(seed=1) * 10)  # a second batch does not initialise again
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_actnorm_flag_is_a_buffer_and_survives_a_checkpoint():
    trained = flows.ActNorm((3, 4, 4))
    trained(_channel_data())
    state = trained.state_dict()
    assert "initialized" in state and state["initialized"].dtype == torch.bool and bool(state["initialized"])
    loaded = flows.ActNorm((3, 4, 4))
    loaded.load_state_dict(state)
    loaded.train()
    loaded(_channel_data(seed=2) + 100)  # a very different first batch after loading: no re-initialisation
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # ...and loading a never-initialised state makes the next training batch initialise it.
    trained.load_state_dict(flows.ActNorm((3, 4, 4)).state_dict())
    assert not trained.initialized
    z, _ = trained(_channel_data(seed=3))
    assert trained.initialized
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_actnorm_constant_channel_gives_no_nan():
    x = _channel_data()
    x[:, 1] = 0.0  # a channel with zero variance (like a pixel that is 0 in every digit)
    layer = flows.ActNorm((3, 4, 4))
    z, log_det = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all()
    assert torch.isfinite(layer.log_scale).all() and layer.log_scale[1].item() <= math.log(1 / layer.min_std) + 1e-6
    x_back, inv_log_det = layer.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inv_log_det, -log_det)


def test_lu_and_plain_1x1_convolutions_agree_for_the_same_matrix():
    lu = _randomise(flows.InvConv1x1((4, 3, 3), lu=True)).double()
    plain = flows.InvConv1x1((4, 3, 3), lu=False).double()
    with torch.no_grad():
        plain.weight.copy_(lu.matrix())
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    (z_lu, ld_lu), (z_plain, ld_plain) = lu(x), plain(x)
    torch.testing.assert_close(z_lu, z_plain)
    torch.testing.assert_close(ld_lu, ld_plain)  # H W sum log|s|  ==  H W slogdet(W)
    assert abs(ld_lu[0].item()) > 1e-3  # randomised: not the trivial log-det 0
    # A fresh layer starts at a rotation: log-det 0, W^T W = I.
    for layer in (flows.InvConv1x1((4, 3, 3), lu=True), flows.InvConv1x1((4, 3, 3))):
        w = layer.matrix().detach()
        torch.testing.assert_close(w.T @ w, torch.eye(4), atol=1e-5, rtol=0)
        assert abs(layer.log_abs_det().item()) < 1e-5


def test_squeeze_is_a_permutation_with_the_glow_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    squeeze = flows.Squeeze((3, 4, 6))
    z, log_det = squeeze(x)
    assert z.shape == (2, 12, 2, 3) and squeeze.out_shape == (12, 2, 3)
    assert torch.equal(log_det, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(z.flatten().sort().values, x.flatten())  # the same entries, rearranged
    for c, a, b, i, j in [(0, 0, 0, 0, 0), (1, 0, 1, 1, 2), (2, 1, 1, 0, 1), (2, 1, 0, 1, 0)]:
        assert z[1, 4 * c + 2 * a + b, i, j] == x[1, c, 2 * i + a, 2 * j + b]
    assert torch.equal(squeeze.inverse(z)[0], x)
    jac = torch.func.jacrev(lambda v: squeeze(v[None])[0].flatten())(x[0]).reshape(72, 72)
    assert torch.equal(jac.sum(0), torch.ones(72, dtype=torch.float64))  # a permutation matrix
    assert torch.equal(jac.sum(1), torch.ones(72, dtype=torch.float64))


def test_split_factors_out_half_the_channels():
    inner = _randomise(flows.AffineCoupling(flows.checkerboard_mask((2, 4, 4)), _coupling_net((2, 4, 4))))
    split = flows.Split(inner)
    x = torch.randn(3, 4, 4, 4)
    z, log_det = split(x)
    assert torch.equal(z[:, :2], x[:, :2])  # the factored-out half goes to the base density unchanged
    z2, inner_log_det = inner(x[:, 2:])
    torch.testing.assert_close(z[:, 2:], z2)
    torch.testing.assert_close(log_det, inner_log_det)


def test_glow_builds_for_the_digits_and_keeps_the_data_shape():
    flow = flows.glow()
    assert flow.event_shape == flow.latent_shape == (1, 8, 8)
    y = torch.randint(0, 17, (8, 1, 8, 8)).float()
    nll = flow.nll(y)
    assert nll.shape == (8,) and torch.isfinite(nll).all()
    actnorms = [m for m in flow.modules() if isinstance(m, flows.ActNorm)]
    assert len(actnorms) == 8 and all(bool(m.initialized) for m in actnorms)
    x = flow.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 8, 8) and (x >= 0).all() and (x <= 1).all()
    torch.testing.assert_close(flow.decode(flow.encode(x)), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("build, match", [
    (lambda: flows.Squeeze((1, 7, 8)), "even height and width"),
    (lambda: flows.Squeeze((8, 8)), r"\(C, H, W\)"),
    (lambda: flows.ActNorm((4,)), r"\(C, H, W\)"),
    (lambda: flows.ActNorm((2, 4, 4), min_std=0.0), "min_std"),
    (lambda: flows.InvConv1x1((4, 4)), r"\(C, H, W\)"),
    (lambda: flows.GlowStep((1, 4, 4)), "C >= 2"),
    (lambda: flows.Split(flows.Squeeze((2, 4, 4))), "maps \\(C/2, H, W\\) to itself"),
    (lambda: flows.Compose(flows.Squeeze((1, 4, 4)), flows.ActNorm((1, 4, 4))), "event shapes must chain"),
    (lambda: flows.glow((1, 8, 8), levels=4), "divisible by 16"),
    (lambda: flows.glow((1, 8, 8), steps_per_level=0), "at least 1"),
])
def test_glow_construction_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("layer, bad, err, match", [
    (flows.Squeeze((1, 4, 4)), torch.rand(2, 1, 4, 5), ValueError, "shape"),
    (flows.ActNorm((2, 4, 4)), torch.rand(2, 4, 4), ValueError, "shape"),
    (flows.InvConv1x1((2, 4, 4), lu=True), torch.randint(0, 3, (2, 2, 4, 4)), TypeError, "floating point"),
    (flows.GlowStep((2, 4, 4), hidden=4), torch.full((2, 2, 4, 4), float("nan")), ValueError, "NaN"),
])
def test_glow_bad_input_fails_loudly(layer, bad, err, match):
    with pytest.raises(err, match=match):
        layer(bad)
    if isinstance(layer, flows.Squeeze):
        with pytest.raises(ValueError, match="shape"):
            layer.inverse(torch.rand(2, 1, 4, 4))  # the inverse takes (4C, H/2, W/2)


def _glow_exercise(flow, batch):
    """A training step (fresh ActNorms initialise on it), nll in eval mode, seeded and unseeded samples."""
    flow.train()
    loss = flow.nll(batch).mean()
    loss.backward()
    flow.eval()
    with torch.no_grad():
        nll = flow.nll(batch)
    return [loss, nll, flow.sample(3), flow.sample(3, generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("lu", [True, False])
def test_glow_runs_on_meta(lu):
    """Shapes only: no tensor made on the CPU, no value read (the ActNorm initialisation included)."""
    flow = flows.glow((1, 8, 8), steps_per_level=1, hidden=4, lu=lu).to("meta")
    batch = torch.randint(0, 17, (4, 1, 8, 8)).float().to("meta")
    for out in _glow_exercise(flow, batch):
        assert out.device.type == "meta"


def test_glow_makes_no_tensor_on_the_default_device():
    torch.manual_seed(0)
    flow = flows.glow((1, 8, 8), steps_per_level=1, hidden=4)
    batch = torch.randint(0, 17, (4, 1, 8, 8)).float()
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        outputs = _glow_exercise(flow, batch)
    finally:
        torch.set_default_device(previous)
    for out in outputs:
        assert out.device.type == "cpu" and torch.isfinite(out).all()
