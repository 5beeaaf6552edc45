"""dgmlib.autoregressive: causality by the Jacobian, the blind spot, dilations, exact normalisation, sampling.

The causality checks read the autograd Jacobian of the network's outputs with respect to its input:
the outputs at position i must not move when the input at i or after i (in the model's ordering)
moves. The normalisation checks enumerate every image of a tiny event and sum the probabilities.
"""

import json

import pytest
import torch
from torch import nn

from dgmlib import autoregressive as ar
from dgmlib import vae
from dgmlib.cli import main


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise(model, scale=0.5, seed=0):
    """Random weights of a visible size, so that no connection is zero by accident."""
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _input_jacobian(fn, x):
    """``|d out_i / d x_j|`` summed over all but the pixels, ``(D, D)``, for ``fn: (1, C, H, W) -> (1, P, C, H, W)``."""
    jac = torch.autograd.functional.jacobian(fn, x)  # (1, P, C, H, W, 1, C, H, W)
    d = x[0].numel()
    return jac.abs().reshape(jac.shape[1], d, d).sum(0)  # (D_out, D_in)


def _models(shape=(1, 2, 2), levels=3, **extra):
    """One small model of each kind, both outputs."""
    for output in ar.OUTPUTS:
        yield f"made-{output}", ar.MADE(shape, levels, hidden=16, output=output, num_mixtures=2, **extra)
        yield f"made-random-3-{output}", ar.MADE(shape, levels, hidden=16, ordering="random", num_masks=3,
                                                 output=output, num_mixtures=2, **extra)
        yield f"pixelcnn-{output}", ar.PixelCNN(shape, levels, channels=6, num_layers=2, first_kernel=3,
                                                output=output, num_mixtures=2, **extra)
        yield f"gated-{output}", ar.GatedPixelCNN(shape, levels, channels=6, num_layers=2, first_kernel=3,
                                                  output=output, num_mixtures=2, **extra)


def _all_images(shape, levels):
    return torch.cartesian_prod(*[torch.arange(float(levels))] * int(torch.tensor(shape).prod())).view(-1, *shape)


# --------------------------------------------------------------------------- causality


def test_made_masks_follow_the_degrees():
    degrees = ar.made_degrees(5, [7, 6], "random", _gen(3))
    assert sorted(degrees[0].tolist()) == [1, 2, 3, 4, 5]
    assert all(1 <= d.min() and d.max() <= 4 for d in degrees[1:])  # hidden degrees in [min below, D - 1]
    masks = ar.made_masks(degrees, outputs_per_input=2)
    assert [tuple(m.shape) for m in masks] == [(7, 5), (6, 7), (10, 6)]
    paths = masks[2] @ masks[1] @ masks[0]  # (2D, D): how many paths join input j to output i
    before = degrees[0][None, :] < degrees[0].repeat(2)[:, None]
    assert ((paths > 0) <= before).all()  # a path only from an earlier input
    assert (paths[before] > 0).float().mean() > 0.5  # ...and most earlier inputs are reached


@pytest.mark.parametrize("ordering", ["natural", "random"])
def test_made_is_causal_under_several_orderings(ordering):
    model = _randomise(ar.MADE((1, 3, 3), 4, hidden=40, ordering=ordering, num_masks=3).double())
    x = torch.rand(1, 1, 3, 3, dtype=torch.float64, generator=_gen()) * 3
    orders = set()
    for s in range(3):
        jac = _input_jacobian(lambda v: model(v, mask=s), x)
        rank = model.degrees(s)[0]  # the position of each pixel in this ordering, 1..D
        allowed = rank[None, :] < rank[:, None]
        assert (jac[~allowed] == 0).all()  # nothing from the pixel itself or a later one
        assert (jac[allowed] != 0).float().mean() > 0.8
        assert model.ordering_of(s) == torch.argsort(rank).tolist()
        orders.add(tuple(model.ordering_of(s)))
    assert len(orders) == (3 if ordering == "random" else 1)


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_convolutions_see_only_earlier_pixels(mask_type):
    conv = _randomise(ar.MaskedConv2d(1, 1, 5, mask_type).double())
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, generator=_gen())
    jac = _input_jacobian(lambda v: conv(v)[:, None], x)  # (36, 36), raster order
    assert (jac.triu(1) == 0).all()
    diagonal = jac.diagonal()
    assert (diagonal == 0).all() if mask_type == "A" else (diagonal != 0).all()
    assert conv.mask[0, 0].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, mask_type == "B", 0, 0],
                                        [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("kind", ["pixelcnn", "gated", "gated-conditional"])
def test_pixelcnns_are_causal_in_raster_order(kind):
    shape = (1, 5, 5)
    if kind == "pixelcnn":
        model = ar.PixelCNN(shape, 5, channels=8, num_layers=3, first_kernel=3)
    else:
        model = ar.GatedPixelCNN(shape, 5, channels=8, num_layers=4, first_kernel=3,
                                 num_classes=3 if kind == "gated-conditional" else 0)
    model = _randomise(model).double()
    x = torch.rand(1, *shape, dtype=torch.float64, generator=_gen()) * 4
    labels = torch.tensor([2]) if kind == "gated-conditional" else None
    jac = _input_jacobian(lambda v: model(v, labels), x)
    assert (jac.triu() == 0).all()  # output i ignores pixels i, i+1, ...
    assert (jac.tril(-1) != 0).sum() > 100  # ...and uses earlier ones


def _seen(model, shape, pixel):
    """Which input pixels move the outputs at ``pixel``: the receptive field the gradient reveals."""
    x = torch.rand(1, *shape, dtype=torch.float64, generator=_gen(), requires_grad=True)
    model(x)[0, :, 0, pixel[0], pixel[1]].sum().backward()
    return x.grad[0, 0] != 0


def test_blind_spot_in_pixelcnn_and_none_in_the_gated_pixelcnn():
    shape, pixel = (1, 6, 6), (4, 1)
    before = torch.zeros(6, 6, dtype=torch.bool)
    before.view(-1)[:4 * 6 + 1] = True  # every pixel before (4, 1) in raster order
    plain = _randomise(ar.PixelCNN(shape, 5, channels=16, num_layers=8, first_kernel=3)).double()
    seen = _seen(plain, shape, pixel)
    assert not (seen & ~before).any()
    blind = before & ~seen
    assert blind.any() and blind[3, 3:].all()  # the row above, right of the cone: unseen however deep
    assert not blind[:, :2].any()  # the blind spot lies to the upper right
    gated = _randomise(ar.GatedPixelCNN(shape, 5, channels=16, num_layers=8, first_kernel=3)).double()
    assert torch.equal(_seen(gated, shape, pixel), before)  # every earlier pixel and nothing else


def test_gated_layer_first_hides_the_centre():
    assert ar.vertical_mask(3, first=True).tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert ar.vertical_mask(3).tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert ar.horizontal_mask(5, first=True).tolist() == [[1, 1, 0, 0, 0]]
    assert ar.horizontal_mask(5).tolist() == [[1, 1, 1, 0, 0]]
    layer = ar.GatedPixelCNNLayer(4, 4, 3)
    v, h = layer(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5))
    assert v.shape == h.shape == (2, 4, 5, 5) and v.abs().max() < 1  # tanh ⊙ σ lies in (-1, 1)


# --------------------------------------------------------------------------- WaveNet


@pytest.mark.parametrize("kernel_size, dilations", [(2, (1, 2, 4, 8)), (3, (1, 2, 4)), (3, (1, 1, 1))])
def test_dilated_causal_convolutions_see_the_receptive_field(kernel_size, dilations):
    stack = _randomise(nn.Sequential(*[ar.CausalConv1d(2, 2, kernel_size, d) for d in dilations])).double()
    r = ar.receptive_field(kernel_size, dilations)
    x = torch.randn(1, 2, 40, dtype=torch.float64, generator=_gen(), requires_grad=True)
    t = 35
    stack(x)[0, :, t].sum().backward()
    seen = (x.grad[0] != 0).any(0).nonzero().squeeze(1).tolist()
    assert seen == list(range(t - r + 1, t + 1))
    assert stack(x).shape == x.shape


def test_receptive_field_formula_and_the_shifted_first_layer():
    assert ar.receptive_field(2, [2 ** i for i in range(10)]) == 1024  # WaveNet's 1, 2, ..., 512
    assert ar.receptive_field(3, [1, 1, 1]) == 7
    conv = _randomise(ar.CausalConv1d(1, 1, 3, dilation=2, include_current=False)).double()
    x = torch.randn(1, 1, 20, dtype=torch.float64, requires_grad=True)
    conv(x)[0, 0, 10].backward()
    assert (x.grad[0, 0] != 0).nonzero().squeeze(1).tolist() == [5, 7, 9]  # before t = 10, never t itself
    with pytest.raises(ValueError, match="dilation"):
        ar.receptive_field(2, [1, 0])


# --------------------------------------------------------------------------- probabilities


@pytest.mark.parametrize("name, model", list(_models()))
def test_probabilities_sum_to_one_over_every_image(name, model):
    """All 81 images of a 2x2 event with 3 levels, and all 289 of a 1x2 event with 17 levels (the full
    digit range: the mixture's levels sum to 1 too)."""
    for shape, levels in (((1, 2, 2), 3), ((1, 1, 2), 17)):
        if (shape, levels) != ((1, 2, 2), 3):
            model = dict(_models(shape, levels))[name]
        model = _randomise(model.double(), seed=1).eval()
        with torch.no_grad():
            log_p = model.log_prob(_all_images(shape, levels).double())
        assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-9)


def test_conditional_models_normalise_per_class_and_marginally():
    images = _all_images((1, 2, 2), 3).double()
    for name, model in _models(num_classes=3):
        model = _randomise(model.double(), seed=2).eval()
        model.set_class_prior(torch.tensor([0.2, 0.5, 0.3]))
        with torch.no_grad():
            per_class = torch.stack([model.log_prob(images, c) for c in range(3)], 1)  # (81, 3)
            marginal = model.log_prob(images)
        assert torch.logsumexp(per_class, 0).tolist() == pytest.approx([0.0] * 3, abs=1e-9), name
        expected = torch.logsumexp(per_class + torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).log(), 1)
        torch.testing.assert_close(marginal, expected)
        assert (per_class[:, 0] - per_class[:, 1]).abs().max() > 1e-3  # the label changes the distribution


def test_conditional_output_depends_on_the_label():
    model = _randomise(ar.GatedPixelCNN((1, 4, 4), 5, channels=8, num_layers=3, num_classes=4))
    y = torch.randint(0, 5, (2, 1, 4, 4), generator=_gen()).float()
    a, b = model(y, torch.tensor([0, 0])), model(y, torch.tensor([3, 3]))
    assert (a - b).abs().max() > 1e-3
    assert not torch.equal(model.sample(6, labels=0, generator=_gen()), model.sample(6, labels=3, generator=_gen()))


def test_made_trains_on_each_mask_and_evaluates_their_ensemble():
    model = _randomise(ar.MADE((1, 2, 2), 3, hidden=12, ordering="random", num_masks=3).double())
    y = _all_images((1, 2, 2), 3).double()[::7]
    model.train()
    assert [model.next_mask() for _ in range(4)] == [1, 2, 0, 1]
    model.log_prob(y)
    assert model.mask_index == 2  # one step per training call: per minibatch in fit
    model.eval()
    with torch.no_grad():
        ensemble = model.log_prob(y)
        single = torch.stack([model._pixel_log_prob(model(y, mask=s), y).flatten(1).sum(1) for s in range(3)], 1)
    torch.testing.assert_close(ensemble, torch.logsumexp(single, 1) - torch.log(torch.tensor(3.0, dtype=torch.float64)))
    assert model.mask_index == 2  # evaluation leaves the mask alone


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name, model", list(_models((1, 2, 2), 2)))
def test_samples_follow_the_model(name, model):
    """20000 samples of the 16 images of a 2x2 event with 2 levels against the exact probabilities: total
    variation below 0.03 (its sampling noise is about 0.01); MADE's ensemble samples its mixture of orderings."""
    model = _randomise(model, seed=3).eval()
    levels = model.num_levels
    images = _all_images((1, 2, 2), levels)
    with torch.no_grad():
        probs = model.log_prob(images).exp()
        draws = model.sample(20000, generator=_gen(1))
    index = (draws.flatten(1).long() * (levels ** torch.arange(3, -1, -1))).sum(1)  # cartesian_prod order
    freq = torch.bincount(index, minlength=levels ** 4).float() / 20000
    assert 0.5 * (freq - probs).abs().sum() < 0.03, name


def test_sampling_is_seeded_and_temperature_sharpens():
    model = _randomise(ar.GatedPixelCNN((1, 3, 3), 5, channels=8, num_layers=2), 0.3)
    a = model.sample(5, generator=_gen(4))
    assert torch.equal(a, model.sample(5, generator=_gen(4)))
    assert a.shape == (5, 1, 3, 3) and ((a >= 0) & (a <= 4) & (a == a.round())).all()
    cold = [model.sample(4, temperature=1e-4, generator=_gen(s)) for s in (1, 2)]
    assert torch.equal(cold[0], cold[1]) and (cold[0] == cold[0][:1]).all()  # the greedy image, whatever the noise


# --------------------------------------------------------------------------- errors, devices, compatibility


def test_bad_input_gives_clear_errors():
    model = ar.GatedPixelCNN((1, 4, 4), 5, channels=4, num_layers=2)
    y = torch.randint(0, 5, (2, 1, 4, 4)).float()
    with pytest.raises(ValueError, match=r"shape \(B, 1, 4, 4\)"):
        model.nll(y[:, :, :3])
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        model.nll(y + 5)
    with pytest.raises(ValueError, match="integer levels"):
        model.nll(y + 0.5)
    with pytest.raises(TypeError, match="Tensor"):
        model.nll(y.numpy())
    with pytest.raises(ValueError, match="unconditional"):
        model.nll(y, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=0.0)
    with pytest.raises(TypeError, match="floating"):
        model(y.long())
    conditional = ar.MADE((1, 4, 4), 5, hidden=8, num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        conditional.nll(y, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer class"):
        conditional.nll(y, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        conditional.nll(y, torch.tensor([0]))
    with pytest.raises(ValueError, match="needs labels"):
        conditional(y)
    for build, match in ((lambda: ar.PixelCNN((3, 4, 4), 5), "one channel"),
                         (lambda: ar.GatedPixelCNN((1, 4, 4), 5, output="gaussian"), "output"),
                         (lambda: ar.MADE((1, 4, 4), 1), "num_levels"),
                         (lambda: ar.MADE((1, 4, 4), 5, ordering="zigzag"), "ordering"),
                         (lambda: ar.MaskedConv2d(1, 1, 4, "A"), "odd"),
                         (lambda: ar.MaskedConv2d(1, 1, 3, "C"), "'A' or 'B'"),
                         (lambda: ar.GatedPixelCNN((1, 4, 4), 5, kernel_size=2), "odd"),
                         (lambda: ar.made_degrees(1, [4]), "num_inputs")):
        with pytest.raises(ValueError, match=match):
            build()
    with pytest.raises(ValueError, match="mask"):
        ar.MADE((1, 4, 4), 5, hidden=8).degrees(1)


def test_conditional_and_ensemble_models_keep_to_their_device():
    """The registry's device tests build the default options only; these are the others, on meta."""
    for model in (ar.GatedPixelCNN((1, 4, 4), 5, channels=4, num_layers=2, num_classes=3, output="logistic_mixture"),
                  ar.MADE((1, 4, 4), 5, hidden=8, ordering="random", num_masks=2, num_classes=3)):
        model = model.to("meta")
        y = torch.zeros(2, 1, 4, 4, device="meta")
        model.train()
        model.nll(y, torch.zeros(2, dtype=torch.long, device="meta")).mean().backward()
        model.eval()
        for out in (model.nll(y), model.sample(2), model.sample(2, labels=1, generator=_gen())):
            assert out.device.type == "meta"


def test_masked_conv2d_still_lives_in_vae_too():
    assert vae.MaskedConv2d is ar.MaskedConv2d and "MaskedConv2d" in vae.__all__
    decoder = vae.AutoregressiveDecoder(2, (1, 4, 4), 5, channels=4, num_layers=1)
    assert isinstance(decoder.first, ar.MaskedConv2d) and decoder.first.mask_type == "A"
    assert set(decoder.first.state_dict()) == {"weight", "bias", "mask"}  # old checkpoints still load


# --------------------------------------------------------------------------- the CLI


def test_cli_trains_a_conditional_gated_pixelcnn(tmp_path):
    out = tmp_path / "g"
    assert main(["train", "gated_pixelcnn", "--fast", "--epochs", "1", "--conditional", "yes", "--output",
                 "logistic_mixture", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nll_method"] == "exact" and metrics["options"] == {"output": "logistic_mixture",
                                                                       "conditional": "yes"}
    assert metrics["test_bits_per_dim"] == pytest.approx(metrics["test_nll_nats"] / (64 * 0.6931471805599453))
    # log P(y) = log Σ_c π_c P(y|c) >= log π_c + log P(y|c): the marginal NLL is below the conditional one + log 1/π
    assert metrics["test_nll_nats"] <= metrics["test_conditional_nll_nats"] + 2.5
    assert metrics["sample_seconds_per_image"] > 0 and metrics["class_samples_figure"] == "class_samples.png"
    for name in ("samples.png", "class_samples.png", "curves.png", "model.pt"):
        assert (out / name).stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["train", "gated_pixelcnn", "--masks", "4"])


def test_cli_trains_made_with_an_ensemble_of_orderings(tmp_path):
    out = tmp_path / "m"
    assert main(["train", "made", "--fast", "--epochs", "1", "--masks", "2", "--ordering", "random",
                 "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["masks"] == "2" and "ensemble of 2 orderings" in metrics["likelihood"]
    assert "test_conditional_nll_nats" not in metrics and not (out / "class_samples.png").exists()


def test_the_digit_labels_found_from_the_pixels():
    from dgmlib.data import load_digit_labels, load_digits
    from dgmlib.models import _digit_labels

    for split in ("train", "test"):
        torch.testing.assert_close(_digit_labels()(load_digits(split)), load_digit_labels(split), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not one of them"):
        _digit_labels()(torch.zeros(1, 1, 8, 8))
