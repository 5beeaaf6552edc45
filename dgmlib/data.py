"""Datasets of the course: scikit-learn's 8x8 digits (default, embedded), 2D toys, MNIST.

The digits are 1797 greyscale 8x8 images with 17 grey levels (0..16). They ship with
scikit-learn, so nothing is downloaded. The split is fixed: a permutation seeded with 0,
then 1000 train / 350 validation / 447 test images, the sizes used by Tomczak's ``intro_dgm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

DIGITS_LEVELS = 17
DIGITS_SHAPE = (1, 8, 8)
DIGITS_SPLIT = {"train": (0, 1000), "val": (1000, 1350), "test": (1350, 1797)}
DIGITS_SEED = 0

from dgmlib.catalog import IMAGE_NAMES, TOY_NAMES  # noqa: E402  (named once, where the CLI reads them without torch)
TOY_DENSITIES = ("8gaussians", "checkerboard")
"""The toys whose true density ``toy_log_prob`` knows in closed form."""
TOY_SIZES = {"train": 20000, "val": 2000, "test": 5000}
TOY_SEEDS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ImageData:
    """Train/val/test tensors of discrete images plus what a model needs to know about them.

    Attributes:
        train, val, test: float32 tensors of shape ``(N, C, H, W)`` holding integer levels.
        num_levels: number of grey levels ``K`` (values lie in ``{0..K-1}``).
        name: dataset name.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    num_levels: int
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape ``(C, H, W)``."""
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    @property
    def num_dims(self) -> int:
        """Dimensions per image ``D = C * H * W`` (the denominator of bits/dim)."""
        return math.prod(self.shape)

    def to(self, device: str | torch.device) -> ImageData:
        """The same splits on ``device`` (e.g. for test metrics computed where the model is)."""
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def load_digits(split: str = "train", flat: bool = False) -> Tensor:
    """Return one split of scikit-learn's digits as integer levels 0..16 (float32).

    Args:
        split: ``"train"`` (1000), ``"val"`` (350) or ``"test"`` (447).
        flat: return ``(N, 64)`` instead of ``(N, 1, 8, 8)``.

    Raises:
        ValueError: for an unknown split.
    """
    if split not in DIGITS_SPLIT:
        raise ValueError(f"split must be one of {sorted(DIGITS_SPLIT)}, got {split!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    images = _sk_load_digits().images.astype(np.float32)  # (1797, 8, 8), values 0..16
    order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
    start, stop = DIGITS_SPLIT[split]
    x = torch.from_numpy(images[order[start:stop]]).unsqueeze(1)  # (N, 1, 8, 8)
    return x.flatten(1) if flat else x


def load_digit_labels(split: str = "train") -> Tensor:
    """The class (0..9) of each image of ``load_digits(split)``, int64 of shape ``(N,)``.

    The models are unsupervised; labels only colour plots such as latent scatters.

    Raises:
        ValueError: for an unknown split.
    """
    if split not in DIGITS_SPLIT:
        raise ValueError(f"split must be one of {sorted(DIGITS_SPLIT)}, got {split!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    target = _sk_load_digits().target
    order = np.random.default_rng(DIGITS_SEED).permutation(len(target))
    start, stop = DIGITS_SPLIT[split]
    return torch.from_numpy(target[order[start:stop]]).long()


def load_mnist(split: str = "train", root: str = "~/.cache/dgm/mnist") -> Tensor:
    """Return MNIST as integer levels 0..255 (float32), shape ``(N, 1, 28, 28)``; needs torchvision.

    ``"train"`` is the first 55000 training images, ``"val"`` the last 5000, ``"test"`` the 10000
    test images. This downloads on first use (meant for Colab).

    Raises:
        ValueError: for an unknown split.
        ImportError: if torchvision is not installed, saying how to install it.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    try:
        from torchvision.datasets import MNIST
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise ImportError("MNIST needs torchvision: run `pip install torchvision` "
                          "(it is preinstalled on Colab), or use the bundled digits") from err
    import os

    ds = MNIST(os.path.expanduser(root), train=split != "test", download=True)
    x = ds.data.float().unsqueeze(1)  # (N, 1, 28, 28)
    if split == "train":
        return x[:55000]
    return x[55000:] if split == "val" else x


def load_image_data(name: str = "digits") -> ImageData:
    """Load train/val/test of ``"digits"`` or ``"mnist"`` as an ``ImageData``.

    Raises:
        ValueError: for an unknown name. ImportError: for MNIST without torchvision.
    """
    if name == "digits":
        return ImageData(load_digits("train"), load_digits("val"), load_digits("test"), DIGITS_LEVELS, name)
    if name == "mnist":
        return ImageData(load_mnist("train"), load_mnist("val"), load_mnist("test"), 256, name)
    raise ValueError(f"unknown dataset {name!r}; choose 'digits' or 'mnist'")


def toy_2d(name: str, n: int = 1000, seed: int = 0) -> Tensor:
    """Sample ``n`` points of a 2D toy density, shape ``(n, 2)``, float32, roughly in [-4, 4]^2.

    Names: ``8gaussians``, ``checkerboard``, ``2spirals``, ``moons``, ``pinwheel``, ``swissroll``
    (the toy set of FFJORD, Grathwohl et al. 2019, Fig. 2). The same seed gives the same points.

    Raises:
        ValueError: for an unknown name or ``n < 1``.
    """
    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOY_NAMES)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    if name == "8gaussians":
        angles = rng.integers(0, 8, n) * (2 * np.pi / 8)
        centres = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        x = centres + 0.2 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2 + np.floor(x1) % 2
        x = _float32_in_cells(2.0 * np.stack([x1, x2], axis=1), cell=2.0)
    elif name == "2spirals":
        t = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi  # angle, denser near the centre
        sign = rng.integers(0, 2, n) * 2 - 1  # which arm
        r = t / np.pi
        x = sign[:, None] * np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        x = x + 0.1 * rng.standard_normal((n, 2))
    elif name == "moons":
        from sklearn.datasets import make_moons

        pts, _ = make_moons(n, noise=0.05, random_state=seed)
        x = 2.0 * (pts - np.array([0.5, 0.25]))
    elif name == "pinwheel":
        arms, radial_sd, tangential_sd, rate = 5, 0.3, 0.08, 0.25
        arm = rng.integers(0, arms, n)
        feats = rng.standard_normal((n, 2)) * np.array([radial_sd, tangential_sd]) + np.array([1.0, 0.0])
        angle = arm * 2 * np.pi / arms + rate * np.exp(feats[:, 0])
        rot = np.stack([np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)], axis=1).reshape(n, 2, 2)
        x = 2.0 * np.einsum("ni,nji->nj", feats, rot)
    else:  # swissroll
        from sklearn.datasets import make_swiss_roll

        pts, _ = make_swiss_roll(n, noise=0.5, random_state=seed)
        x = pts[:, [0, 2]] / 5.0
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def _float32_in_cells(x: np.ndarray, cell: float) -> np.ndarray:
    """Round float64 points to float32 without leaving their half-open cells ``[k c, (k + 1) c)``.

    A value just below a cell edge can round up onto the edge, which belongs to the next cell
    (for the checkerboard, a square of the other colour, where the density is 0). Such values
    step down to the largest float32 below the edge.
    """
    x32 = x.astype(np.float32)
    crossed = np.floor(x32 / cell) != np.floor(x / cell)
    x32[crossed] = np.nextafter(x32[crossed], np.float32(-np.inf))
    return x32


@dataclass(frozen=True)
class ToyData:
    """Train/val/test samples ``(N, 2)`` of a 2D toy density (``load_toy_data``)."""

    train: Tensor
    val: Tensor
    test: Tensor
    name: str

    @property
    def num_dims(self) -> int:
        """2."""
        return self.train.shape[1]

    @property
    def num_levels(self) -> None:
        """None: the toys are continuous, so no bits/dim (``ImageData.num_levels`` is the discrete K)."""
        return None

    def to(self, device: str | torch.device) -> ToyData:
        """The same splits on ``device``."""
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def data_kind(name: str) -> str:
    """``"toy2d"`` for a 2D toy, else the image dataset's own name (``"digits"`` or ``"mnist"``).

    Raises:
        ValueError: for an unknown dataset name.
    """
    if name in TOY_NAMES:
        return "toy2d"
    if name in IMAGE_NAMES:
        return name
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join((*IMAGE_NAMES, *TOY_NAMES))}")


def load_data(name: str) -> ImageData | ToyData:
    """Load any dataset of the course by name: ``load_image_data`` for images, ``load_toy_data`` for toys.

    Raises:
        ValueError: for an unknown name. ImportError: for MNIST without torchvision.
    """
    return load_toy_data(name) if data_kind(name) == "toy2d" else load_image_data(name)


def load_toy_data(name: str) -> ToyData:
    """Fixed 20000/2000/5000 train/val/test samples of toy ``name`` (seeds 0, 1, 2).

    Raises:
        ValueError: for an unknown name.
    """
    return ToyData(*(toy_2d(name, TOY_SIZES[s], seed=TOY_SEEDS[s]) for s in ("train", "val", "test")), name=name)


def toy_log_prob(name: str, x: Tensor) -> Tensor:
    """The true log-density in nats of toy ``name`` at points ``x`` ``(B, 2)``; returns ``(B,)``.

    ``8gaussians``: the mixture (1/8) Σ_k N(x; 2(cos 2πk/8, sin 2πk/8), 0.2² I).
    ``checkerboard``: uniform on its 8 squares of side 2 (area 32), so log(1/32) inside and -inf outside.

    Raises:
        ValueError: for a toy without a closed form (only ``TOY_DENSITIES`` have one) or a bad shape.
    """
    if name not in TOY_DENSITIES:
        raise ValueError(f"the true density of {name!r} is not known in closed form; "
                         f"only {', '.join(TOY_DENSITIES)} have one")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must be a tensor of shape (B, 2), got {getattr(x, 'shape', type(x).__name__)}")
    x = x.double()
    if name == "8gaussians":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        centres = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)  # (8, 2)
        sq = ((x[:, None, :] - centres) ** 2).sum(-1)  # (B, 8)
        log_comp = -sq / (2 * 0.2 ** 2) - math.log(2 * math.pi * 0.2 ** 2)
        return torch.logsumexp(log_comp, dim=1) - math.log(8)
    cell = torch.floor(x / 2)  # (B, 2) the 2x2 square each point is in
    inside = (x.abs() <= 4).all(dim=1) & (cell[:, 0] % 2 == cell[:, 1] % 2)
    return torch.where(inside, torch.full_like(x[:, 0], -math.log(32.0)), torch.full_like(x[:, 0], -math.inf))


def toy_entropy(name: str, n: int = 200_000, seed: int = 123) -> tuple[float, float]:
    """Monte Carlo entropy H = E[-log p(x)] of toy ``name`` in nats, with its standard error.

    Uses ``n`` fresh samples (seed ``seed``) and ``toy_log_prob``; for the uniform checkerboard the
    estimate is exactly log 32 and the standard error 0. A model's test NLL can never be below H in
    expectation (Gibbs), so ``test NLL - H`` estimates KL(p_data || p_model).

    Raises:
        ValueError: as ``toy_log_prob``.
    """
    neg = -toy_log_prob(name, toy_2d(name, n, seed=seed))
    return neg.mean().item(), (neg.std() / math.sqrt(n)).item()
