"""Figures used throughout the course: image grids, 2D densities, training curves.

Each function draws on a given ``ax`` (or a new figure) and returns the ``Figure``.

**Fast mode is written on every figure.** Importing this module registers ``stamp_fast_mode`` in matplotlib's
``figure.hooks``, so every figure made through pyplot while ``DGM_FAST=1`` (the lectures' own ``plt.subplots``,
``dgm train --fast``'s ``samples.png``) carries the words "fast mode" in red at its top: a figure of a small model
trained for seconds is never mistaken for the course's result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor

from dgmlib.config import fast_mode

FAST_MODE_LABEL = "fast mode (DGM_FAST=1): a small model, briefly trained"
"""The words ``stamp_fast_mode`` writes on a figure made in fast mode."""


def stamp_fast_mode(fig: Figure) -> None:
    """Write ``FAST_MODE_LABEL`` in red at the top right of ``fig`` if fast mode is on; nothing otherwise.

    Registered in matplotlib's ``figure.hooks`` when this module is imported, so pyplot calls it on every new
    figure; call it yourself on a ``Figure`` built without pyplot. Raises nothing.
    """
    if fast_mode():
        fig.text(0.995, 0.995, FAST_MODE_LABEL, ha="right", va="top", fontsize=7, color="#c0392b",
                 gid="dgm-fast-mode")


_HOOK = f"{__name__}:stamp_fast_mode"
if _HOOK not in plt.rcParams["figure.hooks"]:
    plt.rcParams["figure.hooks"] = [*plt.rcParams["figure.hooks"], _HOOK]


def image_grid(images: Tensor, nrow: int = 8, title: str | None = None, ax: plt.Axes | None = None,
               vmax: float | None = None) -> Figure:
    """Show ``(N, C, H, W)`` images (C = 1 or 3) as one grid, ``nrow`` images per row.

    Values are shown on ``[0, vmax]`` with ``vmax`` the batch maximum unless given
    (use ``vmax=16`` for digit levels, ``1`` for data in [0, 1]).

    Raises:
        ValueError: for a shape other than ``(N, 1|3, H, W)`` or ``nrow < 1``.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    images = images.detach().float().cpu()
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    canvas = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), float("nan"))
    for k in range(n):
        r, q = divmod(k, nrow)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = images[k]
    vmax = float(images.max()) if vmax is None else vmax
    fig, ax = _fig_ax(ax, (nrow * 0.6, rows * 0.6))
    if c == 1:
        ax.imshow(canvas[0].numpy(), cmap="gray", vmin=0, vmax=vmax)
    else:
        ax.imshow((canvas.permute(1, 2, 0) / vmax).clamp(0, 1).nan_to_num(1.0).numpy())
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def density_2d(log_prob: Callable[[Tensor], Tensor], samples: Tensor | None = None,
               bounds: Sequence[float] = (-4.0, 4.0, -4.0, 4.0), resolution: int = 200,
               title: str | None = None, ax: plt.Axes | None = None) -> Figure:
    """Heat map of ``exp(log_prob)`` on a grid over ``bounds = (xmin, xmax, ymin, ymax)``.

    Args:
        log_prob: maps ``(M, 2)`` points to ``(M,)`` log-densities in nats.
        samples: optional ``(N, 2)`` points drawn on top.

    Raises:
        ValueError: if ``log_prob`` returns the wrong shape.
    """
    xmin, xmax, ymin, ymax = bounds
    xs, ys = torch.linspace(xmin, xmax, resolution), torch.linspace(ymin, ymax, resolution)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)  # (R*R, 2)
    with torch.no_grad():
        logp = log_prob(grid)
    if logp.shape != (grid.shape[0],):
        raise ValueError(f"log_prob must return shape ({grid.shape[0]},), got {tuple(logp.shape)}")
    fig, ax = _fig_ax(ax, (4, 4))
    ax.imshow(logp.exp().reshape(resolution, resolution).numpy(), origin="lower", extent=(xmin, xmax, ymin, ymax),
              cmap="viridis", aspect="auto")
    if samples is not None:
        s = samples.detach().cpu()
        ax.scatter(s[:, 0], s[:, 1], s=2, c="white", alpha=0.5)
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)
    if title:
        ax.set_title(title)
    return fig


def samples_2d(samples: Tensor, reference: Tensor | None = None, bounds: Sequence[float] = (-4.0, 4.0, -4.0, 4.0),
               title: str | None = None, ax: plt.Axes | None = None) -> Figure:
    """Scatter ``(N, 2)`` samples (blue) over optional ``(M, 2)`` reference points (grey)."""
    fig, ax = _fig_ax(ax, (4, 4))
    if reference is not None:
        r = reference.detach().cpu()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="grey", alpha=0.4)
    s = samples.detach().cpu()
    ax.scatter(s[:, 0], s[:, 1], s=2, c="C0", alpha=0.6)
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return fig


def training_curves(history, title: str | None = None, ax: plt.Axes | None = None,
                    ylabel: str = "NLL bound (nats / image)") -> Figure:
    """Plot per-epoch training and validation losses of a ``dgmlib.train.History``."""
    fig, ax = _fig_ax(ax, (5, 3.5))
    epochs = range(1, len(history.train_loss) + 1)
    ax.plot(epochs, history.train_loss, label="train")
    if history.val_loss:
        ax.plot(epochs, history.val_loss, label="validation")
        if history.best_epoch >= 0:
            ax.axvline(history.best_epoch + 1, color="grey", ls=":", label="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend()
    if title:
        ax.set_title(title)
    return fig


def _fig_ax(ax: plt.Axes | None, size: tuple[float, float]) -> tuple[Figure, plt.Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=size)
        return fig, ax
    return ax.figure, ax
