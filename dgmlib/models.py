"""The registry of trainable models: what ``dgm train NAME`` and ``dgm list`` know.

Each topic adds its models to ``MODELS``. An image model (``"images"`` in ``data``) has
``nll(y) -> (B,)`` (nats per image, for integer levels ``y``) and ``sample(n) -> (n, C, H, W)`` in
[0, 1] (a DDPM samples in [-1, 1]; the CLI rescales). A 2D model (``"toy2d"``) has ``sample(n) -> (n, 2)``
and, if it is a density model, ``nll(x)`` and ``log_prob`` in nats per point. The training loss is
``training_loss(batch)`` where a model defines it (DDPM's L_simple), otherwise ``nll``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

import math
import time

import torch

from dgmlib import cnf, diffusion, flows, vae
from dgmlib.config import pick
from dgmlib.data import TOY_DENSITIES, ImageData, ToyData, toy_entropy


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one model.

    Attributes:
        description: one line for ``dgm list``.
        build: ``(ImageData, **options) -> nn.Module`` (sized to the data and, in fast mode, shrunk);
            for a 2D toy it receives a ``ToyData``.
        epochs, lr, batch_size: training defaults; ``time_budget`` caps wall-clock seconds.
        fast_epochs, fast_time_budget: the same under ``DGM_FAST=1``.
        options: the keyword options ``build`` accepts, each with its allowed values and default
            (``dgm train vae --prior flow``).
        report: ``(model, data, seed) -> dict`` of test metrics; None means the default
            ``test_nll_nats`` from ``model.nll`` (for flows, the dequantization bound).
        toy_settings: overrides of the training settings on 2D toys, each a ``(full, fast)`` pair.
        data: the kinds of data it trains on: ``"images"`` (digits, MNIST) and/or ``"toy2d"`` (the 2D
            toys of ``dgmlib.data.TOY_NAMES``); the first is the default.
    """

    description: str
    build: Callable[[ImageData], nn.Module]
    epochs: int
    fast_epochs: int
    lr: float = 1e-3
    batch_size: int = 64
    time_budget: float | None = None
    fast_time_budget: float | None = None
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    report: Callable[[nn.Module, ImageData, int], dict] | None = None
    data: tuple[str, ...] = ("images",)
    toy_settings: dict = field(default_factory=dict)

    def check_options(self, options: dict[str, str]) -> None:
        """Check builder options such as ``{"prior": "flow"}`` against ``self.options``.

        Raises:
            ValueError: naming the option that does not apply to this model or its allowed values.
        """
        for key, value in options.items():
            if key not in self.options:
                raise ValueError(f"--{key} does not apply to this model")
            if value not in self.options[key]:
                raise ValueError(f"--{key} must be one of {', '.join(self.options[key])}, got {value!r}")

    def train_settings(self, toy: bool = False) -> dict:
        """Keyword arguments for ``dgmlib.train.fit``, honouring fast mode (and ``toy_settings`` for 2D data)."""
        settings = {"epochs": pick(self.epochs, self.fast_epochs), "lr": self.lr, "batch_size": self.batch_size,
                    "time_budget": pick(self.time_budget, self.fast_time_budget)}
        if toy:
            settings.update({k: pick(*v) for k, v in self.toy_settings.items()})
        return settings


def _vae_report(model: nn.Module, data: ImageData, seed: int) -> dict:
    """Test metrics of a VAE: IWAE NLL with k = 1000 (100 in fast mode), the ELBO split, surgery, active units."""
    k = pick(1000, 100)
    metrics = vae.vae_metrics(model, data.test, data.train, k=k, seed=seed)
    metrics["likelihood"] = (f"importance-sampled -log P(y) with k = {k} samples of q(z|y) (IWAE bound); the "
                             "decoder is discrete over the levels, so no dequantization term enters")
    metrics["iwae_k"] = k
    return metrics


def _build_vae(d: ImageData, prior: str = "standard", decoder: str = "categorical") -> nn.Module:
    return vae.build_vae(d.shape, d.num_levels, latent_dim=16, prior=prior, decoder=decoder,
                         hidden=pick(256, 128), channels=pick(64, 32), pseudo_init=d.train)


def _ffjord_report(model: cnf.CNF, data: ToyData, seed: int) -> dict:
    """Test NLL with the exact trace, the true entropy where it is known, and the solver's NFE."""
    model.eval()
    with torch.no_grad():
        nll = torch.cat([model.nll(batch) for batch in data.test.split(1000)])
    metrics = {"test_nll_nats": nll.mean().item(), "test_nll_se_nats": (nll.std() / math.sqrt(len(nll))).item(),
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


def _build_ddpm(d: ImageData | ToyData) -> diffusion.DDPM:
    T = pick(1000, 100)
    if isinstance(d, ToyData):
        return diffusion.DDPM(diffusion.TimeMLP(d.num_dims, hidden=pick(128, 64), num_layers=3),
                              diffusion.NoiseSchedule.linear(T), (d.num_dims,))
    return diffusion.DDPM(diffusion.UNet(d.shape[0], base=pick(64, 16)), diffusion.NoiseSchedule.linear(T), d.shape,
                          num_levels=d.num_levels)


def _ddpm_report(model: diffusion.DDPM, data: ImageData | ToyData, seed: int) -> dict:
    """The bound in nats (images), and DDPM (T steps) against DDIM (50 steps): time and sample distance."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    metrics: dict = {"diffusion_steps": model.schedule.T, "ddim_steps": 50}
    images = isinstance(data, ImageData)
    if images:
        terms = [model.bound_terms(batch, g) for batch in data.test.split(500)]
        total = torch.cat([t["total"] for t in terms])
        metrics.update(
            test_nll_nats=total.mean().item(), test_nll_se_nats=(total.std() / math.sqrt(len(total))).item(),
            bound_prior_nats=torch.cat([t["prior"] for t in terms]).mean().item(),
            bound_diffusion_nats=torch.cat([t["diffusion"].sum(1) for t in terms]).mean().item(),
            bound_decoder_nats=torch.cat([t["decoder"] for t in terms]).mean().item(),
            likelihood="variational bound L_T + sum_t L_{t-1} + L_0 on -log P(y) (Ho et al. Eq. 5), all T terms, "
                       "one x_t per term, discretized Gaussian decoder over the levels; no dequantization term")
    n = 64 if images else min(2000, len(data.test), len(data.val))
    flat = (lambda x: model.to_unit(x).flatten(1)) if images else (lambda x: x)
    test, held_out = flat(data.test[:n]), flat(data.val[:n])
    start = time.perf_counter()
    ddpm = model.sample(n, generator=g)
    metrics["sample_seconds_ddpm"] = time.perf_counter() - start
    start = time.perf_counter()
    ddim = model.ddim_sample(n, 50, generator=g)
    metrics["sample_seconds_ddim"] = time.perf_counter() - start
    metrics.update(sample_count=n,
                   sample_distance=diffusion.sliced_wasserstein(ddpm.flatten(1), test),
                   sample_distance_ddim=diffusion.sliced_wasserstein(ddim.flatten(1), test),
                   data_distance=diffusion.sliced_wasserstein(held_out, test),
                   distance=f"sliced 2-Wasserstein (512 directions) between {n} samples and {n} test points"
                            + (" in [-1, 1] pixel units" if images else "")
                            + "; data_distance: held-out data against the same test points, the floor")
    return metrics


MODELS: dict[str, ModelSpec] = {
    "realnvp": ModelSpec(
        description="RealNVP: logit + 8 affine couplings, checkerboard masks, conv conditioners (lecture 02)",
        build=lambda d: flows.realnvp(d.shape, num_couplings=8, hidden=pick(64, 32), num_levels=d.num_levels),
        epochs=150, fast_epochs=15, lr=1e-3, batch_size=64, time_budget=240.0, fast_time_budget=30.0,
    ),
    "nice": ModelSpec(
        description="NICE: logit + 4 additive couplings + diagonal scaling (lecture 02)",
        build=lambda d: flows.nice(d.shape, num_couplings=4, hidden=pick(256, 128), num_levels=d.num_levels),
        epochs=150, fast_epochs=15, lr=1e-3, batch_size=64, time_budget=240.0, fast_time_budget=30.0,
    ),
    "vae": ModelSpec(
        description="VAE: MLP Gaussian encoder, conv decoder, --prior {standard,mog,vamp,flow}, "
                    "--decoder {categorical,dlogistic} (lectures 05-06)",
        build=_build_vae, epochs=2000, fast_epochs=30, lr=1e-3, batch_size=64,
        time_budget=150.0, fast_time_budget=20.0,
        options={"prior": vae.PRIORS, "decoder": ("categorical", "dlogistic")},
        report=_vae_report,
    ),
    "hvae": ModelSpec(
        description="two-level hierarchical VAE, q(z1|y) q(z2|y), p(z2) p(z1|z2) p(y|z1) (lecture 05)",
        build=lambda d: vae.HierarchicalVAE(d.shape, d.num_levels, (16, 8), hidden=pick(256, 128),
                                            channels=pick(64, 32)),
        epochs=2000, fast_epochs=30, lr=1e-3, batch_size=64, time_budget=150.0, fast_time_budget=20.0,
        report=_vae_report,
    ),
    "ffjord": ModelSpec(
        description="FFJORD: continuous flow, concat-MLP velocity, Hutchinson trace, adjoint gradients, "
                    "--data 8gaussians|checkerboard|2spirals|... (lecture 09)",
        build=lambda d: cnf.ffjord(d.num_dims, hidden=64, num_layers=4, trace="rademacher", rtol=1e-4, atol=1e-4),
        epochs=1000, fast_epochs=20, lr=1e-3, batch_size=512, time_budget=200.0, fast_time_budget=15.0,
        report=_ffjord_report, data=("toy2d",),
    ),
    "ddpm": ModelSpec(
        description="DDPM: linear schedule, T = 1000, eps-prediction, U-Net (digits) or time MLP "
                    "(--data swissroll|...), L_simple; bound in bits/dim, DDPM vs DDIM sampling (lecture 10)",
        build=_build_ddpm, epochs=5000, fast_epochs=3, lr=2e-3, batch_size=128, time_budget=360.0,
        fast_time_budget=20.0, report=_ddpm_report, data=("images", "toy2d"),
        toy_settings={"epochs": (300, 3), "batch_size": (128, 512)},
    ),
}
