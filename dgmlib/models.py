"""The registry of trainable models: everything ``dgm train NAME``, ``dgm list`` and ``dgm results`` know.

Each topic adds its models to ``MODELS``. An entry (``ModelSpec``) holds all that is particular to
one model: how to build it for a dataset, its options, its training settings and loss, its test
metrics and its figures. ``dgmlib.cli`` has no per-model code.

An image model (``"images"`` in ``data``) has ``nll(y) -> (B,)`` (nats per image, for integer levels
``y``) and ``sample(n) -> (n, C, H, W)``. A 2D model (``"toy2d"``) has ``sample(n) -> (n, 2)`` and, if
it is a density model, ``nll(x)`` and ``log_prob`` in nats per point.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from dgmlib import autoregressive, cnf, dequantization, diffusion, flows, plots, vae, vq
from dgmlib.config import pick
from dgmlib.data import DIGITS_SPLIT, TOY_DENSITIES, ImageData, ToyData, load_digit_labels, load_digits, toy_entropy
from dgmlib.device import module_device, value_checks
from dgmlib.results import Column, number
from dgmlib.train import evaluate

Data = ImageData | ToyData
MAX_TEST_IMAGES = 1000
"""Expensive test metrics (IWAE with k = 1000, the DDPM's T-term bound, ELBO surgery) use at most this
many images: all 447 test digits, the first 1000 of MNIST's 10000."""


@dataclass(frozen=True)
class Option:
    """One builder option of a model, e.g. ``dgm train vae --prior flow``.

    Attributes:
        choices: the allowed values; default: the value used when the option is not given; help: one line.
    """

    choices: tuple[str, ...]
    default: str
    help: str = ""


def _image_samples(model: nn.Module, data: Data, seed: int, title: str,
                   to_unit: Callable[[Tensor], Tensor] | None = None) -> dict[str, Figure]:
    """``samples.png``: 64 samples on a grid (images in [0, 1], or mapped there by ``to_unit``), or
    2000 samples over the test points of a 2D toy."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(data, ToyData):
        samples = model.sample(2000, generator=g)
        return {"samples": plots.samples_2d(samples, data.test[:2000],
                                            title=f"{title}: samples (blue), test data (grey)")}
    samples = model.sample(64, generator=g)
    if to_unit is not None:
        samples = to_unit(samples)
    return {"samples": plots.image_grid(samples.clamp(0, 1), nrow=8, vmax=1.0, title=f"{title}: samples")}


def _density_samples(model: nn.Module, data: Data, seed: int, title: str) -> dict[str, Figure]:
    """``samples.png`` of a 2D density model: the learned density with 500 samples on top."""
    samples = model.sample(2000, generator=torch.Generator().manual_seed(seed))
    model.eval()
    device = module_device(model)
    fig = plots.density_2d(lambda x: model.log_prob(x.to(device)).cpu(), samples[:500], resolution=pick(120, 40),
                           title=f"{title}: density and samples")
    return {"samples": fig}


samples_in_unit_interval = functools.partial(_image_samples, to_unit=lambda x: (x + 1) / 2)
"""``figures`` of a model that samples images in [-1, 1] (the diffusion and score models)."""


@dataclass(frozen=True)
class ModelSpec:
    """All that is particular to one model.

    Attributes:
        description: one line for ``dgm list`` and ``dgm train --help``.
        family: the family the model belongs to (``"normalizing flow"``, ``"VAE"``, ...): ``dgm results --gallery``
            shows the samples of one run per family.
        build: ``(data, **options) -> nn.Module``, sized to the data (digits, MNIST or a 2D toy)
            and, in fast mode, shrunk.
        epochs, lr, batch_size: training defaults. Training is bounded by epochs (and ``patience``), never
            by the clock, so the same command and seed give the same model on any machine; the full-mode
            epochs are chosen to take about 5 minutes or less on 2 CPU cores.
        fast_epochs: the epochs under ``DGM_FAST=1``.
        patience: early stopping after this many epochs without a better validation loss (None: off).
        report: ``(model, data, seed) -> dict`` of test metrics; it gives ``test_nll_nats`` (per image
            or per point) and ``nll_method`` (a few words: which bound or estimate) for a likelihood
            model, and ``likelihood`` (a sentence) saying how it was computed. The data are on the
            model's device.
        options: the keyword options ``build`` accepts (``dgm train MODEL --OPTION VALUE``).
        figures: ``(model, data, seed, title) -> {name: Figure}``, saved as ``NAME.png``.
        loss: ``model -> loss_fn`` for ``fit`` when the model does not train on its ``nll`` (the DDPM's
            L_simple); ``loss_label`` names it in ``metrics.json`` and on the curves.
        data: the kinds of data it trains on, ``"images"`` (digits, MNIST) and/or ``"toy2d"``; the
            first is the default (digits, or ``default_toy``).
        overrides: training settings by dataset kind (``"toy2d"``, ``"mnist"``), each a ``(full, fast)``
            pair, e.g. ``{"mnist": {"batch_size": (128, 64)}}``.
        columns: the model's own columns in ``dgm results --details`` (metrics of ``report``).
        betas: Adam's betas for ``fit`` (a GAN's are ``(0.5, 0.999)``).
        validate: whether ``fit`` keeps the weights of the best validation epoch; False for a GAN, whose
            losses say nothing about its samples (the last weights are kept).
        after_fit: ``(model, data, settings) -> dict``, a second training stage run after ``fit`` and before
            ``report`` (the VQ-VAE's prior over its codes); ``settings`` holds ``fit``'s ``seed``, ``progress``
            and ``device``, and the returned metrics go into ``metrics.json``.
        inputs: ``(model, data, split) -> Tensor``, what ``fit`` trains on for ``split`` (``"train"`` or ``"val"``)
            when it is not ``data.train`` / ``data.val``: a class-conditional model's images packed with their
            labels (``dgmlib.flow_matching.pack_labels``).
    """

    description: str
    family: str
    build: Callable[..., nn.Module]
    epochs: int
    fast_epochs: int
    report: Callable[[nn.Module, Data, int], dict]
    lr: float = 1e-3
    batch_size: int = 64
    patience: int | None = None
    options: dict[str, Option] = field(default_factory=dict)
    figures: Callable[[nn.Module, Data, int, str], dict[str, Figure]] = _image_samples
    loss: Callable[[nn.Module], Callable[[Tensor], Tensor]] | None = None
    loss_label: str | None = None
    data: tuple[str, ...] = ("images",)
    default_toy: str = "8gaussians"
    overrides: dict[str, dict[str, tuple]] = field(default_factory=dict)
    columns: tuple[Column, ...] = ()
    after_fit: Callable[[nn.Module, Data, dict], dict] | None = None
    inputs: Callable[[nn.Module, Data, str], Tensor] | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    validate: bool = True

    def resolve_options(self, options: dict[str, str]) -> dict[str, str]:
        """Check options such as ``{"prior": "flow"}`` and fill in the defaults of the others.

        Raises:
            ValueError: naming the option that does not apply to this model or its allowed values.
        """
        for key, value in options.items():
            if key not in self.options:
                raise ValueError(f"--{key} does not apply to this model")
            if value not in self.options[key].choices:
                raise ValueError(f"--{key} must be one of {', '.join(self.options[key].choices)}, got {value!r}")
        return {key: options.get(key, opt.default) for key, opt in self.options.items()}

    @property
    def default_data(self) -> str:
        """The dataset ``dgm train`` uses without ``--data``: the digits, or ``default_toy`` for a 2D-only model."""
        return "digits" if self.data[0] == "images" else self.default_toy

    def train_settings(self, kind: str = "digits") -> dict:
        """Keyword arguments for ``dgmlib.train.fit`` on data of ``kind`` (``"digits"``, ``"mnist"``,
        ``"toy2d"``), honouring fast mode and ``overrides``."""
        settings = {"epochs": pick(self.epochs, self.fast_epochs), "lr": self.lr, "batch_size": self.batch_size,
                    "betas": self.betas}
        if self.patience is not None and self.validate:
            settings["patience"] = self.patience
        settings.update({k: pick(*v) for k, v in self.overrides.get(kind, {}).items()})
        return settings


def _dequantization_report(model: flows.Flow, data: ImageData, seed: int) -> dict:
    """A flow's test NLL: the uniform-dequantization bound, 4 noise draws per test image."""
    return {"test_nll_nats": evaluate(model, data.test, num_samples=4, seed=seed, device=module_device(model)),
            "nll_method": "dequantization bound",
            "likelihood": "uniform-dequantization bound on -log P(y): E_u[-log p((y+u)/K)] + D log K, "
                          "4 noise draws per test image"}


def _glow_report(model: flows.Flow, data: ImageData, seed: int) -> dict:
    """Glow's three bounds on the same test images: variational (its training loss), importance-weighted
    with k samples of q(u | y), and the uniform bound of the same flow without its dequantizer."""
    test = data.test[:MAX_TEST_IMAGES]
    device = module_device(model)
    metrics = {"test_nll_nats": evaluate(model, test, num_samples=4, seed=seed, device=device)}
    if model.dequantizer is not None:
        k = pick(64, 8)
        g = torch.Generator().manual_seed(seed)  # CPU noise, moved to the device: the same numbers everywhere
        model.eval()
        with torch.no_grad():
            iw = torch.cat([dequantization.importance_weighted_dequantization_nll(
                model.log_prob, batch, model.num_levels, model.dequantizer, k=k, generator=g) for batch in test.split(50)])
        metrics.update(iw_nll_nats=iw.mean().item(), iw_k=k, nll_method="variational dequantization bound",
                       likelihood=("variational-dequantization bound on -log P(y): E_q[-log p((y+u)/K) + log q(u|y)] + "
                                   f"D log K, 4 draws of u ~ q(u|y) per test image; iw_nll_nats is the importance-"
                                   f"weighted bound with k = {k} (Flow++ Eq. 12); uniform_nll_nats is the uniform bound "
                                   "of the same flow"))
    else:
        metrics.update(nll_method="dequantization bound",
                       likelihood="uniform-dequantization bound on -log P(y): E_u[-log p((y+u)/K)] + D log K, "
                                  "4 noise draws per test image")
    uniform = flows.Flow(model.transform, num_levels=model.num_levels)
    metrics["uniform_nll_nats"] = evaluate(uniform, test, num_samples=4, seed=seed, device=device)
    return metrics


def _mnist(d: Data) -> bool:
    return isinstance(d, ImageData) and d.name == "mnist"


def _vae_report(model: vae.LatentVariableModel, data: ImageData, seed: int) -> dict:
    """Test metrics of a VAE: IWAE NLL with k = 1000 (100 in fast mode), the ELBO split, surgery, active units."""
    k = pick(1000, 100)
    test, train = data.test[:MAX_TEST_IMAGES], data.train[:MAX_TEST_IMAGES]
    metrics = vae.vae_metrics(model, test, train, k=k, seed=seed)
    metrics["nll_method"] = f"IWAE, k = {k}"
    metrics["likelihood"] = (f"importance-sampled -log P(y) with k = {k} samples of q(z|y) (IWAE bound) on {len(test)} "
                             "test images; the decoder is discrete over the levels, so no dequantization term enters")
    metrics["iwae_k"] = k
    return metrics


def _build_vae(d: ImageData, prior: str = "standard", decoder: str = "categorical") -> vae.VAE:
    big = _mnist(d)
    return vae.build_vae(d.shape, d.num_levels, latent_dim=32 if big else 16, prior=prior, decoder=decoder,
                         hidden=pick(512 if big else 256, 128), channels=pick(64, 32), pseudo_init=d.train[:5000])


def _build_hvae(d: ImageData) -> vae.HierarchicalVAE:
    big = _mnist(d)
    return vae.HierarchicalVAE(d.shape, d.num_levels, (32, 16) if big else (16, 8),
                               hidden=pick(512 if big else 256, 128), channels=pick(64, 32))


def _ffjord_report(model: cnf.CNF, data: ToyData, seed: int) -> dict:
    """Test NLL with the exact trace, the true entropy where it is known, and the solver's NFE."""
    model.eval()
    with torch.no_grad():
        nll = torch.cat([model.nll(batch) for batch in data.test.split(1000)])
    metrics = {"test_nll_nats": nll.mean().item(), "test_nll_se_nats": (nll.std() / math.sqrt(len(nll))).item(),
               "nll_method": "exact (continuous)",
               "likelihood": "exact -log p(x) of the continuous 2D density (exact trace, dopri5), nats per point; "
                             "no dequantization: the data are continuous"}
    if data.name in TOY_DENSITIES:
        entropy, se = toy_entropy(data.name, seed=seed + 123)
        metrics.update(true_entropy_nats=entropy, true_entropy_se_nats=se,
                       entropy_gap_nats=metrics["test_nll_nats"] - entropy,
                       entropy_gap_se_nats=math.hypot(metrics["test_nll_se_nats"], se))
    torch.manual_seed(seed)
    metrics["nfe_forward"], metrics["nfe_backward"] = model.count_nfe(data.train[:512])
    return metrics


def _build_ddpm(d: Data, schedule: str = "linear", variance: str = "fixed",
                t_sampling: str = "uniform") -> diffusion.DDPM:
    """A DDPM with T = 1000 (100 in fast mode): a U-Net for images, a time MLP for 2D toys, with twice the
    output channels (ε and v) for learned variances. The options are ``DDPM``'s (Nichol & Dhariwal 2021).

    Raises:
        ValueError: for an unknown schedule, variance or t_sampling.
    """
    T = pick(1000, 100)
    noise_schedule = diffusion.NoiseSchedule.from_name(schedule, T)
    if variance not in diffusion.VARIANCE_MODES:  # checked before a network is built and its weights drawn
        raise ValueError(f"variance must be one of {', '.join(diffusion.VARIANCE_MODES)}, got {variance!r}")
    outputs = 2 if variance == "learned" else 1
    if isinstance(d, ToyData):
        net = diffusion.TimeMLP(d.num_dims, hidden=pick(128, 64), num_layers=3,
                                out_dim=outputs * d.num_dims if outputs > 1 else None)
        return diffusion.DDPM(net, noise_schedule, (d.num_dims,), variance=variance, t_sampling=t_sampling)
    net = diffusion.UNet(outputs * d.shape[0], base=pick(64, 16), in_channels=d.shape[0] if outputs > 1 else None)
    return diffusion.DDPM(net, noise_schedule, d.shape, num_levels=d.num_levels, variance=variance,
                          t_sampling=t_sampling)


def _ddpm_report(model: diffusion.DDPM, data: Data, seed: int) -> dict:
    """The bound in nats (images), and DDPM (T steps) against DDIM (50 steps): time and sample distance.

    The bound and the ancestral samples use the model's variances (learned ones if it has them); DDIM
    uses ε only."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    metrics: dict = {"diffusion_steps": model.schedule.T, "ddim_steps": 50}
    images, learned = isinstance(data, ImageData), model.variance == "learned"
    if images:
        test = data.test[:MAX_TEST_IMAGES]
        terms = [model.bound_terms(batch, g) for batch in test.split(500)]
        total = torch.cat([t["total"] for t in terms])
        metrics.update(
            test_nll_nats=total.mean().item(), test_nll_se_nats=(total.std() / math.sqrt(len(total))).item(),
            bound_prior_nats=torch.cat([t["prior"] for t in terms]).mean().item(),
            bound_diffusion_nats=torch.cat([t["diffusion"].sum(1) for t in terms]).mean().item(),
            bound_decoder_nats=torch.cat([t["decoder"] for t in terms]).mean().item(),
            nll_method="variational bound" + (", learned variances" if learned else ""),
            likelihood=f"variational bound L_T + sum_t L_{{t-1}} + L_0 on -log P(y) (Ho et al. Eq. 5) on {len(test)} "
                       "test images, all T terms, one x_t per term, discretized Gaussian decoder over the levels; "
                       + ("with the learned variances Sigma_theta = exp(v log beta_t + (1 - v) log beta~_t) "
                          "(Nichol & Dhariwal Eq. 15) in every L_{t-1} and in the decoder's scale"
                          if learned else "with the fixed variances sigma_t^2 = beta~_t in the L_{t-1} and beta_1 "
                                          "in the decoder")
                       + "; no dequantization term")
    n = 64 if images else min(2000, len(data.test), len(data.val))
    flat = (lambda x: model.to_unit(x).flatten(1)) if images else (lambda x: x)
    test, held_out = flat(data.test[:n]), flat(data.val[:n])
    synchronize = torch.cuda.synchronize if module_device(model).type == "cuda" else (lambda: None)
    start = time.perf_counter()
    ddpm = model.sample(n, generator=g)
    synchronize()
    metrics["sample_seconds_ddpm"] = time.perf_counter() - start
    start = time.perf_counter()
    ddim = model.ddim_sample(n, 50, generator=g)
    synchronize()
    metrics["sample_seconds_ddim"] = time.perf_counter() - start
    metrics.update(sample_count=n,
                   sample_distance=diffusion.sliced_wasserstein(ddpm.flatten(1), test),
                   sample_distance_ddim=diffusion.sliced_wasserstein(ddim.flatten(1), test),
                   data_distance=diffusion.sliced_wasserstein(held_out, test),
                   distance=f"sliced 2-Wasserstein (512 directions) between {n} samples and {n} test points"
                            + (" in [-1, 1] pixel units" if images else "")
                            + "; data_distance: held-out data against the same test points, the floor")
    return metrics


_FLOW_COLUMNS = (Column("validation NLL (nats)", number("val_nll_nats")),)
_VAE_COLUMNS = (
    Column("−ELBO (nats)", number("neg_elbo_nats")), Column("reconstruction (nats)", number("recon_nats")),
    Column("KL (nats)", number("kl_nats")), Column("MI (nats)", number("mutual_info_nats", 2, "mutual_info_se")),
    Column("marginal KL (nats)", number("marginal_kl_nats", 2, "marginal_kl_se")),
    Column("active units", lambda r: f"{r['active_units']}/{r['latent_dim']}" if "active_units" in r else ""),
)
_FFJORD_COLUMNS = (
    Column("test NLL (nats/point)", number("test_nll_nats", 3, "test_nll_se_nats")),
    Column("true entropy (nats)", number("true_entropy_nats", 3, "true_entropy_se_nats")),
    Column("gap, a KL estimate (nats)", number("entropy_gap_nats", 3, "entropy_gap_se_nats")),
    Column("NFE forward / backward", lambda r: f"{r['nfe_forward']} / {r['nfe_backward']}" if "nfe_forward" in r else ""),
)
_DDPM_COLUMNS = (
    Column("bound (nats)", number("test_nll_nats", 1, "test_nll_se_nats")),
    Column("L_T / Σ L_{t-1} / L_0 (nats)", lambda r: " / ".join(
        _fmt(r[k]) for k in ("bound_prior_nats", "bound_diffusion_nats", "bound_decoder_nats")) if "bound_prior_nats" in r else ""),
    Column("DDPM: samples in s, distance", lambda r: f"{r['sample_count']} in {r['sample_seconds_ddpm']:.1f}, "
                                                      f"{r['sample_distance']:.3f}" if "sample_distance" in r else ""),
    Column("DDIM: s, distance", lambda r: f"{r['sample_seconds_ddim']:.2f}, {r['sample_distance_ddim']:.3f}"
                                          if "sample_distance_ddim" in r else ""),
    Column("data floor", number("data_distance", 3)),
)


def _fmt(value: float) -> str:
    """A bound term in nats: 1 decimal when large, 4 when small."""
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.4f}"


_MNIST = {"epochs": (20, 1), "batch_size": (128, 64)}
"""Training on MNIST (55000 images of 28x28, 256 levels): 20 epochs, sized for a GPU."""

# --------------------------------------------------------------------------- autoregressive models (lecture 01)

_AR_OPTIONS = {
    "output": Option(autoregressive.OUTPUTS, "softmax",
                     "p(y_i | y_<i): a K-way softmax over the levels, or a mixture of 5 discretized logistics "
                     "(PixelCNN++)"),
    "conditional": Option(("no", "yes"), "no",
                          "class-conditional p(y | c) on the digit's label, with p(y) = Σ_c π_c p(y | c) "
                          "reported; digits only"),
}
_AR_COLUMNS = (
    Column("−log P(y | c) (nats)", number("test_conditional_nll_nats")),
    Column("sampling (ms/image)", lambda r: f"{1000 * r['sample_seconds_per_image']:.1f}"
                                            if "sample_seconds_per_image" in r else ""),
)
_NUM_DIGIT_CLASSES = 10


def _ar_common(d: ImageData, output: str, conditional: str) -> dict:
    """The keyword arguments every autoregressive builder shares: the output and the classes (digits only)."""
    if conditional == "yes" and d.name != "digits":
        raise ValueError("--conditional yes needs class labels, which only the digits have here")
    return {"output": output, "num_classes": _NUM_DIGIT_CLASSES if conditional == "yes" else 0}


def _with_digit_prior(model: autoregressive.AutoregressiveModel) -> autoregressive.AutoregressiveModel:
    """A conditional model's class prior π: the class frequencies of the training digits."""
    if model.num_classes:
        model.set_class_prior(torch.bincount(load_digit_labels("train"), minlength=_NUM_DIGIT_CLASSES).double())
    return model


def _build_made(d: ImageData, output: str = "softmax", conditional: str = "no", masks: str = "8",
                ordering: str = "random") -> autoregressive.MADE:
    return _with_digit_prior(autoregressive.MADE(
        d.shape, d.num_levels, hidden=pick(256 if _mnist(d) else 512, 32), num_layers=2, ordering=ordering,
        num_masks=int(masks), **_ar_common(d, output, conditional)))


def _build_pixelcnn(d: ImageData, output: str = "softmax", conditional: str = "no") -> autoregressive.PixelCNN:
    big = _mnist(d)
    return _with_digit_prior(autoregressive.PixelCNN(
        d.shape, d.num_levels, channels=pick(128 if big else 64, 8), num_layers=pick(12 if big else 6, 2),
        first_kernel=7 if big else 5, **_ar_common(d, output, conditional)))


def _build_gated_pixelcnn(d: ImageData, output: str = "softmax",
                          conditional: str = "no") -> autoregressive.GatedPixelCNN:
    big = _mnist(d)
    return _with_digit_prior(autoregressive.GatedPixelCNN(
        d.shape, d.num_levels, channels=pick(128 if big else 64, 8), num_layers=pick(15 if big else 8, 2),
        first_kernel=7 if big else 5, **_ar_common(d, output, conditional)))


class _DigitLabels:
    """The class of a digits image found from its pixels: ``fit`` hands the loss images only.

    The 1797 digits are all different, so an image of the fixed train/val/test split has exactly one
    label (``data.load_digit_labels``). Each image gets a random integer hash of its 64 levels; a
    batch's hashes are looked up in the sorted table on the batch's device (no host round trip). Outside
    ``fit`` (where values may be read) an image that is not one of the digits raises ValueError.
    """

    def __init__(self) -> None:
        splits = tuple(DIGITS_SPLIT)
        images = torch.cat([load_digits(s, flat=True) for s in splits]).long()  # (1797, 64)
        labels = torch.cat([load_digit_labels(s) for s in splits])
        self.weights = torch.randint(1, 2 ** 40, (images.shape[1],), generator=torch.Generator().manual_seed(0),
                                     device="cpu")
        self.keys, order = (images * self.weights).sum(1).sort()
        self.labels = labels[order]
        self._on: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def __call__(self, y: Tensor) -> Tensor:
        """Labels ``(B,)`` int64 of digits images ``y`` ``(B, 1, 8, 8)``, on ``y``'s device."""
        if y.device not in self._on:
            self._on[y.device] = (self.weights.to(y.device), self.keys.to(y.device), self.labels.to(y.device))
        weights, keys, labels = self._on[y.device]
        key = (y.flatten(1).long() * weights).sum(1)
        index = torch.searchsorted(keys, key).clamp_max(len(keys) - 1)
        if value_checks(y) and not torch.equal(keys[index], key):
            raise ValueError("a conditional model trains on the digits only: an image is not one of them")
        return labels[index]


@functools.cache
def _digit_labels() -> _DigitLabels:
    return _DigitLabels()


def _ar_loss(model: autoregressive.AutoregressiveModel) -> Callable[[Tensor], Tensor]:
    """The training loss: ``-log P(y)``, exact; for a conditional model ``-log P(y, c) = -log P(y | c) - log π_c``
    with the digit's own label ``c``, an upper bound on ``-log P(y)`` (it drops the other classes' terms)."""
    if not model.num_classes:
        return model.nll

    def loss(y: Tensor) -> Tensor:
        labels = _digit_labels()(y)
        return model.nll(y, labels) - model.class_log_prior[labels]

    return loss


def _ar_report(model: autoregressive.AutoregressiveModel, data: ImageData, seed: int) -> dict:
    """The exact test NLL (the model is a discrete distribution), per class for a conditional model, and the
    sampling time per image."""
    test = data.test[:MAX_TEST_IMAGES]
    model.eval()
    with torch.no_grad():
        nll = torch.cat([model.nll(batch) for batch in test.split(250)])
    metrics = {"test_nll_nats": nll.mean().item(), "test_nll_se_nats": (nll.std() / math.sqrt(len(nll))).item(),
               "nll_method": "exact",
               "likelihood": f"exact -log P(y) by the chain rule, the sum of the {data.num_dims} conditionals "
                             f"-log P(y_i | y_<i) over the levels, on {len(test)} test images; no bound and no "
                             "dequantization term"}
    if isinstance(model, autoregressive.MADE) and model.num_masks > 1:
        metrics["likelihood"] += (f"; the ensemble of {model.num_masks} orderings, log (1/S) Σ_s P_s(y), "
                                  "is itself exact")
    if model.num_classes:
        labels = load_digit_labels("test")[:len(test)].to(test.device)
        with torch.no_grad():
            cond = torch.cat([model.nll(b, c) for b, c in zip(test.split(250), labels.split(250))])
        metrics["likelihood"] += (f"; conditional model: -log P(y) = -log Σ_c π_c P(y | c) over the "
                                  f"{model.num_classes} classes (π: the training class frequencies), and "
                                  "test_conditional_nll_nats = -log P(y | c) with the true labels")
        metrics.update(test_conditional_nll_nats=cond.mean().item(), class_samples_figure="class_samples.png")
    n = pick(64, 8)
    synchronize = torch.cuda.synchronize if module_device(model).type == "cuda" else (lambda: None)
    start = time.perf_counter()
    model.sample(n, generator=torch.Generator().manual_seed(seed))
    synchronize()
    metrics.update(sample_seconds_per_image=(time.perf_counter() - start) / n, sample_count=n)
    return metrics


def _ar_figures(model: autoregressive.AutoregressiveModel, data: ImageData, seed: int,
                title: str) -> dict[str, Figure]:
    """``samples.png`` (64 samples) and, for a conditional model, ``class_samples.png``: one row per class."""
    figures = _image_samples(model, data, seed, title, to_unit=lambda y: y / (model.num_levels - 1))
    if model.num_classes:
        per_class = 8
        labels = torch.arange(model.num_classes, device=module_device(model)).repeat_interleave(per_class)
        samples = model.sample(len(labels), labels=labels, generator=torch.Generator().manual_seed(seed + 1))
        figures["class_samples"] = plots.image_grid(samples / (model.num_levels - 1), nrow=per_class, vmax=1.0,
                                                    title=f"{title}: one row per class, 0 to {model.num_classes - 1}")
    return figures


def _build_vqvae(d: ImageData, codebook: str = "ema") -> vq.VQVAE:
    return vq.VQVAE(d.shape, d.num_levels, num_codes=64, code_dim=16, channels=pick(64, 32), downsample=2,
                    ema=codebook == "ema", prior_channels=pick(64, 32))


def _vqvae_prior(model: vq.VQVAE, data: ImageData, settings: dict, epochs: int = 300) -> dict:
    """Stage 2: the gated PixelCNN prior fitted to the training images' code maps (``vq.fit_prior``) for
    ``epochs`` (5 in fast mode), keeping the best validation epoch."""
    history = vq.fit_prior(model, data.train, data.val, epochs=pick(epochs, 5), lr=3e-3, batch_size=64, **settings)
    return {"prior_train_seconds": history.seconds, "prior_epochs_run": len(history.train_loss),
            "prior_stopped_by": history.stopped_by, "prior_val_nll_nats": min(history.val_loss)}


def _vqvae_report(model: vq.VQVAE, data: ImageData, seed: int) -> dict:
    """The bound -log p(y|z_q) - log p(c) with the fitted prior and with the uniform one, its two terms, and the
    codebook's health (perplexity, codes in use on the training and test images, restarts)."""
    test = data.test[:MAX_TEST_IMAGES]
    model.eval()
    with torch.no_grad():
        terms = [model.nll_terms(batch) for batch in test.split(250)]
        codes_test = torch.cat([model.codes(batch) for batch in test.split(250)])
    recon, prior = torch.cat([t[0] for t in terms]), torch.cat([t[1] for t in terms])
    nll = recon + prior
    uniform = vq.uniform_prior_nll(model.num_positions, model.num_codes)
    codes_train = vq.encode_codes(model, data.train[:MAX_TEST_IMAGES])
    used_train = len(torch.unique(codes_train))
    fitted = "a gated PixelCNN fitted to the training images' code maps (stage 2), its exact NLL of the test codes" \
        if model.prior_fitted else "the uniform prior"
    return {
        "test_nll_nats": nll.mean().item(), "test_nll_se_nats": (nll.std() / math.sqrt(len(nll))).item(),
        "nll_method": "VQ-VAE bound, " + ("PixelCNN prior" if model.prior_fitted else "uniform prior"),
        "likelihood": (f"-log P(y) <= -log p(y | z_q) - log p(c) on {len(test)} test images: q(c | y) is a point mass "
                       "on the nearest codes (log q = 0), p(y | z_q) a categorical decoder over the levels, p(c) "
                       f"{fitted}; with the uniform prior -log p(c) = M log K = {uniform:.2f} nats "
                       f"(M = {model.num_positions} positions, K = {model.num_codes} codes)"),
        "recon_nll_nats": recon.mean().item(), "prior_nll_nats": prior.mean().item(),
        "uniform_prior_nll_nats": uniform, "uniform_bound_nats": recon.mean().item() + uniform,
        "perplexity": vq.codebook_perplexity(codes_test, model.num_codes).item(), "num_codes": model.num_codes,
        "codes_used_train": used_train, "dead_codes_train": model.num_codes - used_train,
        "codes_used_test": len(torch.unique(codes_test)), "restarts": int(model.quantizer.restarts),
    }


def _vqvae_figures(model: vq.VQVAE, data: ImageData, seed: int, title: str) -> dict[str, Figure]:
    """``samples.png`` (prior samples, decoded), ``reconstructions.png`` (test images over their reconstructions)
    and ``codes.png`` (how often each code is used on the test images)."""
    figures = _image_samples(model, data, seed, title)
    model.eval()
    test = data.test[:32]
    with torch.no_grad():
        recon = model.reconstruct(test)
        codes = torch.cat([model.codes(b) for b in data.test[:MAX_TEST_IMAGES].split(250)])
    pair = torch.cat([test.to(recon.dtype), recon]) / (model.num_levels - 1)
    figures["reconstructions"] = plots.image_grid(pair, nrow=8, vmax=1.0,
                                                  title=f"{title}: test images (top 4 rows), reconstructions (bottom)")
    counts = torch.bincount(codes.flatten().cpu(), minlength=model.num_codes)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(model.num_codes), counts.tolist())
    ax.set(xlabel="code", ylabel="uses on the test images", title=f"{title}: codebook usage "
           f"(perplexity {vq.codebook_perplexity(codes, model.num_codes).item():.1f} of {model.num_codes})")
    figures["codes"] = fig
    return figures


def _vqvae2_report(model: vq.VQVAE2, data: ImageData, seed: int) -> dict:
    """The two-level bound -log p(y|e_top, e_bottom) - log p(c_top) - log p(c_bottom|c_top), its three terms, the
    uniform priors' bound, and each codebook's health."""
    test = data.test[:MAX_TEST_IMAGES]
    model.eval()
    with torch.no_grad():
        terms = [model.nll_terms(batch) for batch in test.split(250)]
        codes = [model.codes(batch) for batch in test.split(250)]
    recon, top, bottom = (torch.cat([t[i] for t in terms]) for i in range(3))
    c_top, c_bottom = torch.cat([c[0] for c in codes]), torch.cat([c[1] for c in codes])
    nll = recon + top + bottom
    m_top, m_bottom = model.num_positions
    uniform = vq.uniform_prior_nll(m_top, model.num_codes) + vq.uniform_prior_nll(m_bottom, model.num_codes)
    fitted = "a gated PixelCNN p(c_top) and a PixelCNN p(c_bottom | c_top) conditioned on the top codes, fitted to " \
        "the training images' code maps (stage 2)" if model.prior_fitted else "uniform priors"
    return {
        "test_nll_nats": nll.mean().item(), "test_nll_se_nats": (nll.std() / math.sqrt(len(nll))).item(),
        "nll_method": "VQ-VAE-2 bound, " + ("PixelCNN priors" if model.prior_fitted else "uniform priors"),
        "likelihood": (f"-log P(y) <= -log p(y | e_top, e_bottom) - log p(c_top) - log p(c_bottom | c_top) on "
                       f"{len(test)} test images: q is a point mass on both code maps ({model.top_shape[0]}x"
                       f"{model.top_shape[1]} top, {model.bottom_shape[0]}x{model.bottom_shape[1]} bottom, "
                       f"{model.num_codes} codes each), the decoder categorical over the levels, the priors {fitted}"),
        "recon_nll_nats": recon.mean().item(), "prior_nll_nats": (top + bottom).mean().item(),
        "top_prior_nll_nats": top.mean().item(), "bottom_prior_nll_nats": bottom.mean().item(),
        "uniform_prior_nll_nats": uniform, "uniform_bound_nats": recon.mean().item() + uniform,
        "perplexity": vq.codebook_perplexity(c_bottom, model.num_codes).item(),
        "top_perplexity": vq.codebook_perplexity(c_top, model.num_codes).item(), "num_codes": model.num_codes,
        "codes_used_test": len(torch.unique(c_bottom)), "top_codes_used_test": len(torch.unique(c_top)),
        "restarts": int(model.quant_bottom.restarts), "top_restarts": int(model.quant_top.restarts),
    }


def _vqvae2_figures(model: vq.VQVAE2, data: ImageData, seed: int, title: str) -> dict[str, Figure]:
    """``samples.png`` (top codes from their prior, bottom codes given them, decoded) and ``codes.png``: test images
    beside their top and bottom code maps."""
    figures = _image_samples(model, data, seed, title)
    model.eval()
    test = data.test[:6]
    with torch.no_grad():
        c_top, c_bottom = model.codes(test)
    fig, axes = plt.subplots(3, len(test), figsize=(1.6 * len(test), 5))
    for j in range(len(test)):
        for row, (image, cmap, vmax) in enumerate([(test[j, 0], "gray", model.num_levels - 1),
                                                   (c_top[j], "tab20", model.num_codes - 1),
                                                   (c_bottom[j], "tab20", model.num_codes - 1)]):
            axes[row, j].imshow(image.cpu(), cmap=cmap, vmin=0, vmax=vmax)
            axes[row, j].set(xticks=[], yticks=[])
    for row, name in enumerate(["image", f"top codes {model.top_shape}", f"bottom codes {model.bottom_shape}"]):
        axes[row, 0].set_ylabel(name)
    fig.suptitle(f"{title}: the two levels of codes of test images")
    figures["codes"] = fig
    return figures


def _fqgan_report(model: vq.GAN, data: ImageData, seed: int) -> dict:
    """The Fréchet distance of 447 samples to the training digits (features of ``vq.digit_classifier``) beside its
    floor, the held-out test digits' distance; the classifier's accuracy; for FQ-GAN, the usage of the
    discriminator's feature codes on real images. No likelihood: a GAN has none."""
    metrics: dict = {"nll_method": "none (a GAN has no likelihood)",
                     "likelihood": "none: a GAN defines no density; its samples are compared by the Fréchet distance"}
    if tuple(data.shape) == (1, 8, 8):
        samples = model.sample(len(data.test), generator=torch.Generator().manual_seed(seed))
        metrics.update(frechet_distance=vq.frechet_digit_distance(samples),
                       frechet_floor=vq.frechet_digit_distance(load_digits("test") / 16.0),
                       classifier_accuracy=vq.classifier_accuracy(), frechet_samples=len(samples))
        metrics["likelihood"] += (f" on the 64-d features of a digit classifier trained by dgmlib.vq.digit_classifier "
                                  f"(test accuracy {metrics['classifier_accuracy']:.3f}); the floor is the held-out "
                                  "test digits' distance to the same training digits")
    quantizer = model.discriminator.quantizer
    if quantizer is not None:
        model.eval()
        with torch.no_grad():
            real = data.test[:MAX_TEST_IMAGES].to(model.generator.linear.weight.dtype) * (2.0 / (data.num_levels - 1)) - 1
            codes = vq.nearest_code(model.discriminator.bottom(real), quantizer.codebook)
        metrics.update(feature_perplexity=vq.codebook_perplexity(codes, quantizer.num_codes).item(),
                       feature_codes=quantizer.num_codes, restarts=int(quantizer.restarts))
    return metrics


_GAN_COLUMNS = (
    Column("Fréchet distance", number("frechet_distance")),
    Column("floor (test digits)", number("frechet_floor")),
    Column("feature perplexity", lambda r: f"{r['feature_perplexity']:.1f} / {r['feature_codes']}"
                                           if "feature_perplexity" in r else ""),
)
_VQ_OPTIONS = {"codebook": Option(("ema", "loss"), "ema", "codes moved by EMA of their encoder outputs, or trained by "
                                                         "the codebook loss")}
_VQ_COLUMNS = (
    Column("reconstruction −log p(y ∣ z_q) (nats)", number("recon_nll_nats")),
    Column("−log p(c) (nats)", number("prior_nll_nats")),
    Column("uniform-prior bound (nats)", number("uniform_bound_nats")),
    Column("perplexity", lambda r: f"{r['perplexity']:.1f} / {r['num_codes']}" if "perplexity" in r else ""),
)


MODELS: dict[str, ModelSpec] = {
    "realnvp": ModelSpec(
        family="normalizing flow",
        description="RealNVP: logit + 8 affine couplings, checkerboard masks, conv conditioners (lecture 02)",
        build=lambda d: flows.realnvp(d.shape, num_couplings=8, hidden=pick(128 if _mnist(d) else 64, 32),
                                      num_levels=d.num_levels),
        epochs=150, fast_epochs=15, lr=1e-3, batch_size=64,
        report=_dequantization_report, overrides={"mnist": _MNIST}, columns=_FLOW_COLUMNS,
    ),
    "glow": ModelSpec(
        family="normalizing flow",
        description="Glow: logit + 2 levels of (squeeze, actnorm, LU 1x1 conv, affine coupling) with a split; "
                    "variational dequantization (lectures 03-04)",
        build=lambda d, dequantization="variational": flows.glow(
            d.shape, num_levels=d.num_levels, levels=2, steps_per_level=pick(8, 2),
            hidden=pick(128 if _mnist(d) else 32, 32), dequantization=dequantization),
        epochs=150, fast_epochs=10, lr=1e-3, batch_size=64,
        report=_glow_report, overrides={"mnist": _MNIST},
        options={"dequantization": Option(("variational", "uniform"), "variational",
                                          "q(u|y) learned with the flow (Flow++), or uniform noise")},
        columns=_FLOW_COLUMNS + (Column("importance-weighted (nats)", number("iw_nll_nats")),
                                 Column("uniform bound (nats)", number("uniform_nll_nats"))),
    ),
    "nice": ModelSpec(
        family="normalizing flow",
        description="NICE: logit + 4 additive couplings + diagonal scaling (lecture 02)",
        build=lambda d: flows.nice(d.shape, num_couplings=4, hidden=pick(1000 if _mnist(d) else 256, 128),
                                   num_levels=d.num_levels),
        epochs=150, fast_epochs=15, lr=1e-3, batch_size=64,
        report=_dequantization_report, overrides={"mnist": _MNIST}, columns=_FLOW_COLUMNS,
    ),
    "vae": ModelSpec(
        family="VAE",
        description="VAE: MLP Gaussian encoder, conv decoder, a choice of prior and discrete decoder (lectures 05-06)",
        build=_build_vae, epochs=500, fast_epochs=30, lr=1e-3, batch_size=64, patience=50,
        options={"prior": Option(vae.PRIORS, "standard", "the prior p(z): N(0, I), a Gaussian mixture, the "
                                                          "VampPrior or a RealNVP flow"),
                 "decoder": Option(("categorical", "dlogistic"), "categorical",
                                   "p(y|z): a K-way softmax per pixel, or a discretized logistic")},
        report=_vae_report, overrides={"mnist": _MNIST}, columns=_VAE_COLUMNS,
    ),
    "hvae": ModelSpec(
        family="VAE",
        description="two-level hierarchical VAE, q(z1|y) q(z2|y), p(z2) p(z1|z2) p(y|z1) (lecture 05)",
        build=_build_hvae,
        epochs=500, fast_epochs=30, lr=1e-3, batch_size=64, patience=50,
        report=_vae_report, overrides={"mnist": _MNIST}, columns=_VAE_COLUMNS,
    ),
    "ffjord": ModelSpec(
        family="continuous flow",
        description="FFJORD: continuous flow, concat-MLP velocity, Hutchinson trace, adjoint gradients (lecture 09)",
        build=lambda d: cnf.ffjord(d.num_dims, hidden=64, num_layers=4, trace="rademacher", rtol=1e-4, atol=1e-4),
        epochs=30, fast_epochs=5, lr=1e-3, batch_size=512,
        report=_ffjord_report, figures=_density_samples, data=("toy2d",), columns=_FFJORD_COLUMNS,
    ),
    "ddpm": ModelSpec(
        family="diffusion",
        description="DDPM: T = 1000, eps-prediction, U-Net (images) or time MLP (2D toys), L_simple; the bound in "
                    "bits/dim, DDPM vs DDIM sampling (lecture 10); improved DDPM (Nichol & Dhariwal 2021): "
                    "--schedule cosine, --variance learned (L_hybrid), --t_sampling importance (L_vlb)",
        build=_build_ddpm, epochs=200, fast_epochs=3, lr=2e-3, batch_size=128, report=_ddpm_report,
        data=("images", "toy2d"),
        figures=samples_in_unit_interval,
        loss=lambda model: model.training_loss,
        loss_label="L_simple (MSE of ε); L_hybrid if --variance learned; L_vlb/p_t (nats) if --t_sampling importance",
        options={"schedule": Option(diffusion.SCHEDULES, "linear", "the noise schedule: linear (Ho et al.) or cosine "
                                                                   "(Nichol & Dhariwal Eq. 17)"),
                 "variance": Option(diffusion.VARIANCE_MODES, "fixed",
                                    "sigma_t^2 fixed (beta_t to sample), or learned between beta_t and beta~_t "
                                    "(Eq. 15), trained by L_hybrid = L_simple + 0.001 L_vlb (Eq. 16)"),
                 "t_sampling": Option(diffusion.T_SAMPLINGS, "uniform",
                                      "t uniform, or importance-sampled (p_t ~ sqrt(E[L_t^2]), Eq. 18) with L_vlb "
                                      "as the training loss")},
        overrides={"toy2d": {"epochs": (300, 3), "batch_size": (128, 512)},
                   "mnist": {**_MNIST, "lr": (2e-4, 2e-4)}},
        columns=_DDPM_COLUMNS,
    ),
    "made": ModelSpec(
        family="autoregressive",
        description="MADE: masked MLP (2 x 512 ReLU), 8 random orderings trained in turn (one per minibatch), "
                    "their exact ensemble at test; exact NLL (lecture 01)",
        build=_build_made, epochs=200, fast_epochs=2, lr=1e-3, batch_size=64,
        report=_ar_report, figures=_ar_figures, loss=_ar_loss,
        loss_label="-log P(y) (nats; -log P(y, c) if conditional)", overrides={"mnist": _MNIST},
        options={**_AR_OPTIONS,
                 "masks": Option(("1", "2", "4", "8", "16"), "8",
                                 "mask sets S: above 1, each minibatch trains the next and the test NLL is their "
                                 "exact ensemble"),
                 "ordering": Option(autoregressive.ORDERINGS, "random", "raster order, or a random one per mask set")},
        columns=_AR_COLUMNS,
    ),
    "pixelcnn": ModelSpec(
        family="autoregressive",
        description="PixelCNN: a mask-A 5x5 convolution, 6 residual mask-B 3x3 layers (it has the blind spot); "
                    "exact NLL (lecture 01)",
        build=_build_pixelcnn, epochs=300, fast_epochs=2, lr=1e-3, batch_size=64, patience=30,
        report=_ar_report, figures=_ar_figures, loss=_ar_loss,
        loss_label="-log P(y) (nats; -log P(y, c) if conditional)", overrides={"mnist": _MNIST},
        options=_AR_OPTIONS, columns=_AR_COLUMNS,
    ),
    "gated_pixelcnn": ModelSpec(
        family="autoregressive",
        description="gated PixelCNN: 8 layers of vertical and horizontal stacks, tanh x sigmoid gates, no blind "
                    "spot, optional class conditioning; exact NLL (lecture 01)",
        build=_build_gated_pixelcnn, epochs=150, fast_epochs=2, lr=1e-3, batch_size=64, patience=30,
        report=_ar_report, figures=_ar_figures, loss=_ar_loss,
        loss_label="-log P(y) (nats; -log P(y, c) if conditional)", overrides={"mnist": _MNIST},
        options=_AR_OPTIONS, columns=_AR_COLUMNS,
    ),
    "vqvae": ModelSpec(
        family="discrete latents",
        description="VQ-VAE: conv encoder to a 2x2 grid (7x7 on MNIST) of 16-d vectors, 64 codes (EMA, dead codes "
                    "restarted), categorical decoder; then a gated PixelCNN prior over the codes; the bound (lecture 07)",
        build=_build_vqvae, epochs=250, fast_epochs=3, lr=1e-3, batch_size=64, patience=50,
        report=_vqvae_report, figures=_vqvae_figures,
        loss=lambda model: model.training_loss,
        loss_label="-log p(y | z_q) + β ||z_e - sg[e]||² (nats + squared distance)", overrides={"mnist": _MNIST},
        options=_VQ_OPTIONS,
        after_fit=_vqvae_prior, columns=_VQ_COLUMNS,
    ),
    "vqvae2": ModelSpec(
        family="discrete latents",
        description="VQ-VAE-2: a 2x2 top and a 4x4 bottom code map (7x7 and 14x14 on MNIST), 64 codes each (EMA, "
                    "restarts); then a PixelCNN prior per level, the bottom one conditioned on the top codes (lecture 07)",
        build=lambda d, codebook="ema": vq.VQVAE2(d.shape, d.num_levels, num_codes=64, code_dim=16,
                                                  channels=pick(64, 32), ema=codebook == "ema",
                                                  prior_channels=pick(64, 32)),
        epochs=200, fast_epochs=3, lr=1e-3, batch_size=64, patience=50,
        report=_vqvae2_report, figures=_vqvae2_figures, loss=lambda model: model.training_loss,
        loss_label="-log p(y | e_top, e_bottom) + β (both commitments) (nats + squared distances)",
        overrides={"mnist": _MNIST},
        options=_VQ_OPTIONS,
        after_fit=functools.partial(_vqvae_prior, epochs=100), columns=_VQ_COLUMNS,
    ),
    "fqgan": ModelSpec(
        family="GAN",
        description="FQ-GAN: a small DCGAN whose discriminator's features are vector-quantized (EMA dictionary), or "
                    "the same GAN without (--quantize no); Fréchet distance to the digits (lecture 07)",
        build=lambda d, quantize="yes": vq.GAN(d.shape, d.num_levels, latent_dim=32, channels=pick(64, 32),
                                               quantize=quantize == "yes"),
        epochs=200, fast_epochs=3, lr=2e-4, batch_size=64,
        betas=(0.5, 0.999), validate=False, report=_fqgan_report,
        figures=_image_samples, loss=lambda model: model.training_loss,
        loss_label="L_D + L_G (nats; near 3 log 2 = 2.08 at the equilibrium)", overrides={"mnist": _MNIST},
        options={"quantize": Option(("yes", "no"), "yes", "quantize the discriminator's features (FQ-GAN) or not")},
        columns=_GAN_COLUMNS,
    ),
}


def register(name: str, spec: ModelSpec) -> None:
    """Add a model to ``MODELS`` from the module of its family (as ``dgmlib.score_models`` does), so that
    no file grows with the syllabus.

    Raises:
        ValueError: if the name is taken.
    """
    if name in MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    MODELS[name] = spec


from dgmlib import score_models  # noqa: E402, F401 - lecture 11's entries register themselves beside their family
from dgmlib import flow_matching_models  # noqa: E402, F401 - lecture 12's, likewise
