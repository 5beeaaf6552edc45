"""The course's one training loop, evaluation, and checkpoints.

A model trains here if it has a method ``nll(y) -> (B,)`` giving a per-example negative
log-likelihood (or bound) in nats, or if a ``loss_fn`` of that form is passed to ``fit``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

LossFn = Callable[[Tensor], Tensor]


@dataclass
class History:
    """What ``fit`` measured.

    Attributes:
        train_loss: mean training loss of each epoch (nats per example).
        val_loss: validation loss after each epoch (nats per example), empty without validation data.
        step_loss: training loss of every optimisation step.
        best_epoch: epoch (0-based) whose weights were kept; -1 without validation data.
        seconds: wall-clock training time.
        stopped_early: True if the time budget ended training before ``epochs``.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view, for JSON."""
        return asdict(self)


def fit(
    model: nn.Module,
    train: Tensor,
    val: Tensor | None = None,
    *,
    loss_fn: LossFn | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    clip_grad: float | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> History:
    """Train ``model`` with Adam on minibatches of ``train``, keeping the best weights on ``val``.

    Args:
        model: the model; its ``nll`` is the loss unless ``loss_fn`` is given.
        train: training data ``(N, ...)``; minibatches are ``(batch_size, ...)``.
        val: validation data, evaluated after every epoch (with fixed noise); the weights of the
            best epoch are restored at the end. Without it the last weights are kept.
        loss_fn: maps a batch to per-example losses ``(B,)`` in nats; defaults to ``model.nll``.
        epochs: maximum number of passes over ``train``.
        batch_size, lr, weight_decay: minibatch size and Adam's settings.
        clip_grad: if set, clip the gradient norm to this value.
        time_budget: if set, stop after this many seconds of training (checked every step).
        seed: seeds the shuffling and any noise the loss draws.
        progress: show a tqdm bar with the running loss.

    Returns:
        the ``History``.

    Raises:
        ValueError: for bad settings or empty data; TypeError if no loss is available.
        FloatingPointError: if the loss becomes NaN or inf, naming the epoch and step.
    """
    if loss_fn is None:
        if not callable(getattr(model, "nll", None)):
            raise TypeError(f"{type(model).__name__} has no nll(); pass loss_fn=...")
        loss_fn = model.nll
    if not isinstance(train, Tensor) or train.dim() < 2 or len(train) == 0:
        raise ValueError("train must be a non-empty tensor of shape (N, ...)")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"time_budget must be positive seconds, got {time_budget}")

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = History()
    best_val, best_state = math.inf, None
    start = time.perf_counter()
    bar = tqdm(range(epochs), disable=not progress, desc="fit", leave=True)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train))
        total, count = 0.0, 0
        for step, idx in enumerate(order.split(batch_size)):
            loss = loss_fn(train[idx]).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}, step {step}: "
                    "lower the learning rate, set clip_grad, or check the model's log-det")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            history.step_loss.append(loss.item())
            total, count = total + loss.item() * len(idx), count + len(idx)
            bar.set_postfix({"loss": f"{total / count:.2f}"}, refresh=False)  # running mean this epoch
            if time_budget is not None and time.perf_counter() - start > time_budget:
                history.stopped_early = True
                break
        history.train_loss.append(total / count)
        postfix = {"train": f"{history.train_loss[-1]:.2f}"}
        if val is not None:
            val_loss = evaluate(model, val, loss_fn=loss_fn, seed=seed)
            history.val_loss.append(val_loss)
            postfix["val"] = f"{val_loss:.2f}"
            if val_loss < best_val:
                best_val, history.best_epoch = val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(postfix)
        if history.stopped_early:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate(model: nn.Module, data: Tensor, *, loss_fn: LossFn | None = None,
             batch_size: int = 500, seed: int = 0, num_samples: int = 1) -> float:
    """Mean per-example loss of ``model`` on ``data`` (nats per example for an ``nll``).

    Noise drawn by the loss (e.g. dequantization) comes from a fixed ``seed`` without touching
    the global random state, so repeated evaluations agree; ``num_samples`` averages that many
    noise draws per example.

    Raises:
        ValueError: for empty data or ``num_samples < 1``. FloatingPointError: if the result is not finite.
    """
    if loss_fn is None:
        loss_fn = model.nll
    if len(data) == 0 or num_samples < 1:
        raise ValueError("evaluate needs non-empty data and num_samples >= 1")
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(num_samples):
            for batch in data.split(batch_size):
                total += loss_fn(batch).sum().item()
    model.train(was_training)
    result = total / (len(data) * num_samples)
    if not math.isfinite(result):
        raise FloatingPointError(f"evaluation loss is {result}")
    return result


def save_checkpoint(path: str | Path, model: nn.Module, **meta: Any) -> None:
    """Save ``model.state_dict()`` (buffers included) and JSON-like ``meta`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load weights saved by ``save_checkpoint`` into ``model``; return the saved ``meta``.

    Raises:
        FileNotFoundError: if ``path`` does not exist. RuntimeError: if the weights do not fit ``model``.
    """
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    return ckpt["meta"]
