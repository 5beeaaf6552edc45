"""The registry of trainable models: what ``dgm train NAME`` and ``dgm list`` know.

Each topic adds its models to ``MODELS``. A registered model has ``nll(y) -> (B,)`` (nats per
image, for integer levels ``y``) and ``sample(n) -> (n, C, H, W)`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dgmlib import flows
from dgmlib.config import pick
from dgmlib.data import ImageData


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one model.

    Attributes:
        description: one line for ``dgm list``.
        build: ``ImageData -> nn.Module`` (sized to the data and, in fast mode, shrunk).
        epochs, lr, batch_size: training defaults; ``time_budget`` caps wall-clock seconds.
        fast_epochs, fast_time_budget: the same under ``DGM_FAST=1``.
    """

    description: str
    build: Callable[[ImageData], nn.Module]
    epochs: int
    fast_epochs: int
    lr: float = 1e-3
    batch_size: int = 64
    time_budget: float | None = None
    fast_time_budget: float | None = None

    def train_settings(self) -> dict:
        """Keyword arguments for ``dgmlib.train.fit``, honouring fast mode."""
        return {"epochs": pick(self.epochs, self.fast_epochs), "lr": self.lr, "batch_size": self.batch_size,
                "time_budget": pick(self.time_budget, self.fast_time_budget)}


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
}
