"""The registry of trainable models: what ``dgm train NAME`` and ``dgm list`` know.

Each topic adds its models to ``MODELS``. A registered model has ``nll(y) -> (B,)`` (nats per
image, for integer levels ``y``; the training loss) and ``sample(n) -> (n, C, H, W)`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from dgmlib import flows, vae
from dgmlib.config import pick
from dgmlib.data import ImageData


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one model.

    Attributes:
        description: one line for ``dgm list``.
        build: ``(ImageData, **options) -> nn.Module`` (sized to the data and, in fast mode, shrunk).
        epochs, lr, batch_size: training defaults; ``time_budget`` caps wall-clock seconds.
        fast_epochs, fast_time_budget: the same under ``DGM_FAST=1``.
        options: the keyword options ``build`` accepts, each with its allowed values and default
            (``dgm train vae --prior flow``).
        report: ``(model, ImageData, seed) -> dict`` of test metrics; None means the default
            ``test_nll_nats`` from ``model.nll`` (for flows, the dequantization bound).
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

    def train_settings(self) -> dict:
        """Keyword arguments for ``dgmlib.train.fit``, honouring fast mode."""
        return {"epochs": pick(self.epochs, self.fast_epochs), "lr": self.lr, "batch_size": self.batch_size,
                "time_budget": pick(self.time_budget, self.fast_time_budget)}


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
}
