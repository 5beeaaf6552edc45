"""Units, the dequantization bound, and the datasets."""

import math

import numpy as np
import pytest
import torch

from dgmlib import data, units
from dgmlib.config import fast_mode, pick


def test_bits_per_dim_round_trip():
    assert math.isclose(units.nats_to_bits_per_dim(64 * math.log(2), 64), 1.0)
    assert math.isclose(units.bits_per_dim_to_nats(units.nats_to_bits_per_dim(100.0, 64), 64), 100.0)
    # The course's headline target: 100 nats on 8x8 digits is 2.254 bits/dim.
    assert abs(units.nats_to_bits_per_dim(100.0, 64) - 2.2542) < 1e-4
    with pytest.raises(ValueError, match="num_dims"):
        units.nats_to_bits_per_dim(1.0, 0)


def _logistic_log_prob(x, loc=0.45, scale=0.12):
    z = (x - loc) / scale
    return (-z - 2 * torch.nn.functional.softplus(-z) - math.log(scale)).flatten(1).sum(1)


def _logistic_cdf(x, loc=0.45, scale=0.12):
    return torch.sigmoid((x - loc) / scale)


def test_dequantization_bound_exact_small_case():
    """1D, K = 4 levels, continuous logistic density on [0, 1): compute log P(y) exactly from the
    CDF and the bound E_u[log p((y+u)/K)] - log K by quadrature. The bound is below log P(y) for
    every level (Jensen), and the library's Monte-Carlo estimate converges to the quadrature value."""
    k = 4
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # midpoint rule on [0, 1)
    for y in range(k):
        # P(y) = mass of the continuous model on [y/K, (y+1)/K) (CDF discretization)
        log_p_exact = torch.log(_logistic_cdf(torch.tensor((y + 1) / k, dtype=torch.float64))
                                - _logistic_cdf(torch.tensor(y / k, dtype=torch.float64)))
        x = ((y + u) / k)[:, None]
        bound = (_logistic_log_prob(x)).mean() - math.log(k)
        assert bound <= log_p_exact + 1e-12
        # exact identity: log P(y) = log E_u[p((y+u)/K) / K]
        torch.testing.assert_close(torch.logsumexp(_logistic_log_prob(x), 0) - math.log(len(u)) - math.log(k),
                                   log_p_exact, atol=1e-7, rtol=0)
        g = torch.Generator().manual_seed(y)
        ys = torch.full((200000, 1), float(y), dtype=torch.float64)
        mc = -units.dequantized_nll(_logistic_log_prob, ys, k, generator=g).mean()
        assert abs(mc - bound) < 5e-3


def test_dequantized_nll_counts_scaling_jacobian():
    """A uniform density on [0, 1)^D gives exactly D log K nats: the discrete uniform's NLL."""
    y = torch.randint(0, 17, (5, 1, 8, 8)).float()
    nll = units.dequantized_nll(lambda x: torch.zeros(x.shape[0]), y, 17)
    torch.testing.assert_close(nll, torch.full((5,), 64 * math.log(17)))
    assert abs(units.nats_to_bits_per_dim(nll[0].item(), 64) - math.log2(17)) < 1e-6


def test_uniform_dequantize_stays_in_its_bin():
    y = torch.arange(17.0).repeat(100)
    x = units.uniform_dequantize(y, 17, torch.Generator().manual_seed(0))
    assert ((x * 17).floor() == y).all()


@pytest.mark.parametrize("bad, err", [(torch.tensor([0.5]), ValueError), (torch.tensor([-1.0]), ValueError),
                                      (torch.tensor([17.0]), ValueError), ([1, 2], TypeError)])
def test_dequantize_rejects_bad_levels(bad, err):
    with pytest.raises(err):
        units.uniform_dequantize(bad, 17)


def test_digits_split_is_fixed():
    tr, va, te = (data.load_digits(s) for s in ("train", "val", "test"))
    assert tr.shape == (1000, 1, 8, 8) and va.shape == (350, 1, 8, 8) and te.shape == (447, 1, 8, 8)
    assert data.load_digits("test", flat=True).shape == (447, 64)
    allx = torch.cat([tr, va, te]).flatten(1)
    assert allx.min() == 0 and allx.max() == 16 and torch.equal(allx, allx.round())
    # disjoint and complete: the three splits are a permutation of the 1797 images
    from sklearn.datasets import load_digits
    ref = np.sort(load_digits().images.reshape(1797, -1), axis=0)
    assert np.array_equal(np.sort(allx.numpy(), axis=0), ref)
    assert torch.equal(data.load_digits("train"), tr)  # deterministic
    with pytest.raises(ValueError, match="split"):
        data.load_digits("training")


def test_digit_labels_follow_the_same_split():
    from sklearn.datasets import load_digits
    sk = load_digits()
    images, labels = data.load_digits("val", flat=True), data.load_digit_labels("val")
    assert labels.shape == (350,) and labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    for k in (0, 123, 349):  # each image carries its own scikit-learn label
        match = np.flatnonzero((sk.images.reshape(1797, -1) == images[k].numpy()).all(1))
        assert labels[k].item() in sk.target[match]
    with pytest.raises(ValueError, match="split"):
        data.load_digit_labels("training")


@pytest.mark.parametrize("name", data.TOY_NAMES)
def test_toy_samplers_are_seeded(name):
    a, b = data.toy_2d(name, 500, seed=1), data.toy_2d(name, 500, seed=1)
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, data.toy_2d(name, 500, seed=2))
    assert a.abs().max() < 6 and a.std(0).min() > 0.3


def test_toy_and_mnist_errors():
    with pytest.raises(ValueError, match="unknown toy"):
        data.toy_2d("circles")
    with pytest.raises(ValueError, match="positive"):
        data.toy_2d("moons", 0)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_image_data("cifar")


def test_mnist_without_torchvision_says_what_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("no torchvision")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install torchvision"):
        data.load_mnist("train")


def test_fast_mode_switch(monkeypatch):
    monkeypatch.setenv("DGM_FAST", "1")
    assert fast_mode() and pick(10, 1) == 1
    monkeypatch.setenv("DGM_FAST", "0")
    assert not fast_mode() and pick(10, 1) == 10
    monkeypatch.setenv("DGM_FAST", "maybe")
    with pytest.raises(ValueError, match="DGM_FAST"):
        fast_mode()


def test_checkerboard_samples_stay_in_their_squares_in_float32():
    """A float64 sample just below a square's edge rounds up onto the edge in float32, i.e. into a
    square of the other colour, where the true density is 0 (log-density -inf)."""
    x = np.array([[2.0 - 1e-12, 1.0], [-1e-50, -1.0], [1.5, 2.0 - 1e-12]])  # in squares (0,0), (-1,-1), (0,0)
    assert not torch.isfinite(data.toy_log_prob("checkerboard", torch.from_numpy(x.astype(np.float32)))).all()
    fixed = torch.from_numpy(data._float32_in_cells(x, 2.0))
    assert fixed.dtype == torch.float32
    assert torch.isfinite(data.toy_log_prob("checkerboard", fixed)).all()
    samples = data.toy_2d("checkerboard", 200_000, seed=3)
    assert torch.isfinite(data.toy_log_prob("checkerboard", samples)).all()
