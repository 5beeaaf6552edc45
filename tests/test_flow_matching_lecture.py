"""Lecture 12 shows flow matching's core inline, in code cells tagged ``mechanism``: the straight (OT) path and
the conditional flow-matching loss, the minibatch OT pairing, the Euler and Heun steps, and the classifier-free
guided field. These tests run exactly those cells (``tests/nbhelpers.run_tagged_cells``) and compare what they
compute with ``dgmlib.flow_matching`` on the same inputs."""

import pytest
import torch

from dgmlib import diffusion
from dgmlib import flow_matching as fm

DT = torch.float64


@pytest.fixture(scope="module")
def ns():
    from nbhelpers import ROOT, run_tagged_cells

    return run_tagged_cells(ROOT / "lectures" / "12_flow_matching.ipynb", "mechanism")


def _field(dim: int = 2):
    torch.manual_seed(0)
    net = diffusion.TimeMLP(dim, 16, 2, 8).double()
    return lambda x, t: net(x, 999 * t)


def test_the_mechanism_cells_define_what_the_lecture_uses(ns):
    for name in ("ot_interpolate", "ot_target", "cfm_loss_ot", "ot_pairing_hungarian", "euler_step", "heun_step",
                 "integrate", "guided", "guided_field"):
        assert callable(ns.get(name)), name


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_ot_path_and_cfm_loss_equal_dgmlib(ns, sigma_min):
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(32, 2, generator=g, dtype=DT), torch.randn(32, 2, generator=g, dtype=DT) * 2 + 1
    t = torch.rand(32, generator=g, dtype=DT)
    path = fm.OTPath(sigma_min)
    torch.testing.assert_close(ns["ot_interpolate"](x0, x1, t, sigma_min), path.interpolate(x0, x1, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(ns["ot_target"](x0, x1, sigma_min), path.conditional_velocity(x0, x1, t),
                               rtol=0, atol=1e-12)
    v = _field()
    torch.testing.assert_close(ns["cfm_loss_ot"](v, x0, x1, t, sigma_min), fm.cfm_loss(v, x0, x1, t, path),
                               rtol=1e-12, atol=1e-12)


def test_cfm_loss_on_images_sums_over_the_event(ns):
    """Images (B, 1, 8, 8): the time broadcasts over the event and the loss is one number per image."""
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(4, 1, 8, 8, generator=g, dtype=DT), torch.randn(4, 1, 8, 8, generator=g, dtype=DT)
    t = torch.rand(4, generator=g, dtype=DT)

    def v(x, s):
        return torch.tanh(x) * s.reshape(-1, 1, 1, 1)

    got = ns["cfm_loss_ot"](v, x0, x1, t)
    assert got.shape == (4,)
    torch.testing.assert_close(got, fm.cfm_loss(v, x0, x1, t, fm.OTPath()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [2, 17, 64])
def test_hungarian_pairing_is_the_exact_ot_plan_of_dgmlib(ns, batch):
    g = torch.Generator().manual_seed(batch)
    x0, x1 = torch.randn(batch, 2, generator=g), torch.randn(batch, 2, generator=g) * 3
    ours, dgm = ns["ot_pairing_hungarian"](x0, x1), fm.ot_pairing(x0, x1)
    assert sorted(ours.tolist()) == list(range(batch))  # a permutation
    cost = lambda perm: ((x0[perm] - x1) ** 2).sum().item()  # noqa: E731
    assert cost(ours) == pytest.approx(cost(dgm), rel=1e-6)
    assert torch.equal(ours, dgm)  # continuous draws: the optimum is unique


def test_euler_and_heun_equal_dgmlib_samplers(ns):
    v = _field()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    for steps in (1, 3, 10):
        for t_end in (1.0, fm.VPPath.t_max):
            torch.testing.assert_close(ns["integrate"](ns["euler_step"], v, x0, steps, t_end),
                                       fm.euler_sample(v, x0, steps, t_end), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ns["integrate"](ns["heun_step"], v, x0, steps, t_end),
                                       fm.heun_sample(v, x0, steps, t_end), rtol=1e-10, atol=1e-10)
    # one step of each, by hand
    t, h = 0.25, 0.1
    v0 = v(x0, torch.full((16,), t, dtype=DT))
    torch.testing.assert_close(ns["euler_step"](v, x0, t, h), x0 + h * v0)
    v1 = v(x0 + h * v0, torch.full((16,), t + h, dtype=DT))
    torch.testing.assert_close(ns["heun_step"](v, x0, t, h), x0 + 0.5 * h * (v0 + v1))


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, -0.5])
def test_guided_field_equals_dgmlib_and_guided_net(ns, w):
    torch.manual_seed(4)
    model = fm.FlowMatching(diffusion.UNet(1, base=8, num_classes=10), (1, 8, 8), num_levels=17, num_classes=10).eval()
    x, t = torch.randn(6, 1, 8, 8), torch.rand(6)
    labels = torch.tensor([0, 3, 9, 1, 1, 7])
    with torch.no_grad():
        v_c, v_u = model.velocity(x, t, labels), model.velocity(x, t)
        torch.testing.assert_close(ns["guided"](v_c, v_u, w), fm.guided_velocity(v_c, v_u, w), rtol=0, atol=0)
        ours = ns["guided_field"](model, labels, w)(x, t)
        torch.testing.assert_close(ours, model.field(labels, w)(x, t), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours, fm.GuidedNet(model.net, labels, w)(x, 999.0 * t), rtol=1e-6, atol=1e-6)
    # w = 0 ignores the labels, w = 1 is the conditional field
    if w == 0.0:
        torch.testing.assert_close(ours, v_u)
    if w == 1.0:
        torch.testing.assert_close(ours, v_c)
