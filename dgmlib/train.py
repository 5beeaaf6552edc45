"""The course's one training loop, evaluation, and checkpoints.

A model trains here if it has a method ``nll(y) -> (B,)`` giving a per-example negative
log-likelihood (or bound) in nats, or if a ``loss_fn`` of that form is passed to ``fit``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dgmlib.device import DeviceLike, inputs_checked, module_device, place_data, resolve_device, value_checks
from dgmlib.units import check_levels

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
        epochs: the number of epochs asked for.
        stopped_by: what ended training: ``"epochs"`` (all of them ran), ``"early stopping"`` (``patience``
            epochs without a better validation loss) or ``"time budget"`` (the safety cap, reported loudly).
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0
    epochs: int = 0
    stopped_by: str = "epochs"

    @property
    def stopped_early(self) -> bool:
        """True if training ended before ``epochs``, by early stopping or by the time budget."""
        return self.stopped_by != "epochs"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view, for JSON."""
        return asdict(self)


def check_data(model: nn.Module, data: Tensor, name: str = "data") -> None:
    """Check a whole dataset once, before ``fit`` or ``evaluate`` skip the per-batch value checks.

    The data must be a non-empty tensor ``(N, ...)`` without NaN or inf; if ``model`` has an integer
    ``num_levels`` attribute ``K`` (the discrete image models), the data must hold integer levels in
    ``{0..K-1}``. Reading the values here costs one host round trip per dataset instead of one per batch.

    Raises:
        TypeError: if ``data`` is not a tensor. ValueError: for empty data, NaN/inf, or invalid levels.
    """
    if not isinstance(data, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(data).__name__}")
    if data.dim() < 2 or len(data) == 0:
        raise ValueError(f"{name} must be a non-empty tensor of shape (N, ...), got {tuple(data.shape)}")
    if not value_checks(data):
        return
    if data.is_floating_point() and not torch.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or inf")
    num_levels = getattr(model, "num_levels", None)
    if isinstance(num_levels, int):
        check_levels(data, num_levels)


def _restore(model: nn.Module, state: dict[str, Tensor] | None) -> None:
    if state is not None:
        model.load_state_dict(state)


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
    betas: tuple[float, float] = (0.9, 0.999),
    clip_grad: float | None = None,
    patience: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    progress: bool = True,
    device: DeviceLike | None = None,
) -> History:
    """Train ``model`` with Adam on minibatches of ``train``, keeping the best weights on ``val``.

    Training runs on ``device`` (default ``dgmlib.device.default_device()``: ``$DGM_DEVICE``, else
    CUDA, then MPS, else the CPU). The model moves there for training and back to where it was
    afterwards, so the notebook code around ``fit`` never sees another device. The data move there
    whole if they fit (``place_data``), else one minibatch at a time. The data are checked once
    (``check_data``); the batches then skip the models' per-batch value checks.

    Args:
        model: the model; its ``nll`` is the loss unless ``loss_fn`` is given.
        train: training data ``(N, ...)``; minibatches are ``(batch_size, ...)``.
        val: validation data, evaluated after every epoch (with fixed noise); the weights of the
            best epoch are restored at the end. Without it the last weights are kept.
        loss_fn: maps a batch to per-example losses ``(B,)`` in nats; defaults to ``model.nll``.
        epochs: maximum number of passes over ``train``.
        batch_size, lr, weight_decay, betas: minibatch size and Adam's settings (GANs train with
            ``betas=(0.5, 0.999)``, Radford et al. 2016).
        clip_grad: if set, clip the gradient norm to this value.
        patience: with ``val``, stop after this many epochs without a better validation loss (early
            stopping); the best weights are kept either way. Deterministic, like ``epochs``.
        time_budget: a safety cap in seconds, checked every step. Training is meant to be bounded by
            ``epochs`` (and ``patience``), which give the same model on any machine; a run cut by the
            clock depends on the machine's speed, so hitting the cap emits a ``RuntimeWarning`` and
            sets ``History.stopped_by = "time budget"``.
        seed: seeds the shuffling and any noise the loss draws.
        progress: show a tqdm bar with the running loss.
        device: where to train (``"cpu"``, ``"cuda"``, ``"mps"``, a ``torch.device``).

    Returns:
        the ``History``.

    Raises:
        ValueError: for bad settings or data; TypeError if no loss is available.
        FloatingPointError: if the loss or the gradient becomes NaN or inf, naming the epoch and
            step; the best weights so far are restored first (none are applied from that step).
    """
    if loss_fn is None:
        if not callable(getattr(model, "nll", None)):
            raise TypeError(f"{type(model).__name__} has no nll(); pass loss_fn=...")
        loss_fn = model.nll
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"time_budget must be positive seconds, got {time_budget}")
    if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 1):
        raise ValueError(f"patience must be a positive integer of epochs, got {patience!r}")
    if patience is not None and val is None:
        raise ValueError("patience (early stopping) needs validation data: pass val")
    check_data(model, train, "train")
    if val is not None:
        check_data(model, val, "val")
    device = resolve_device(device)
    home = module_device(model)

    torch.manual_seed(seed)
    model.to(device)
    train = place_data(train, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    max_norm = math.inf if clip_grad is None else clip_grad
    history = History(epochs=epochs)
    best_val, best_state = math.inf, None
    start = time.perf_counter()
    bar = tqdm(range(epochs), disable=not progress, desc="fit", leave=True)
    try:
        for epoch in bar:
            model.train()
            order = torch.randperm(len(train))  # on the CPU: the same order on every device
            total, count = 0.0, 0
            for step, idx in enumerate(order.split(batch_size)):
                with inputs_checked():
                    loss = loss_fn(train[idx.to(train.device)].to(device, non_blocking=True)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # the norm before clipping
                # One host round trip per step reads both numbers; nothing is applied before they are checked.
                loss_value, norm_value = torch.stack([loss.detach(), grad_norm.to(loss.dtype)]).tolist()
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    _restore(model, best_state)
                    what = "training loss" if not math.isfinite(loss_value) else "gradient norm"
                    raise FloatingPointError(
                        f"{what} became {loss_value if what == 'training loss' else norm_value} at epoch "
                        f"{epoch}, step {step}"
                        + (f" (the weights of epoch {history.best_epoch} were restored)" if best_state else "")
                        + ": lower the learning rate, set clip_grad, or check the model's log-det")
                optimizer.step()
                history.step_loss.append(loss_value)
                total, count = total + loss_value * len(idx), count + len(idx)
                bar.set_postfix({"loss": f"{total / count:.2f}"}, refresh=False)  # running mean this epoch
                if time_budget is not None and time.perf_counter() - start > time_budget:
                    history.stopped_by = "time budget"
                    break
            history.train_loss.append(total / count)
            postfix = {"train": f"{history.train_loss[-1]:.2f}"}
            if val is not None:
                val_loss = evaluate(model, val, loss_fn=loss_fn, seed=seed, device=device, checked=True)
                history.val_loss.append(val_loss)
                postfix["val"] = f"{val_loss:.2f}"
                if val_loss < best_val:
                    best_val, history.best_epoch = val_loss, epoch
                    best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(postfix)
            if history.stopped_by == "time budget":
                warnings.warn(f"training stopped by the time budget of {time_budget:g} s after {epoch + 1} of "
                              f"{epochs} epochs: the result depends on this machine's speed; lower the epochs "
                              "instead to bound the run reproducibly", RuntimeWarning, stacklevel=2)
                break
            if patience is not None and epoch - history.best_epoch >= patience and epoch + 1 < epochs:
                history.stopped_by = "early stopping"
                break
        _restore(model, best_state)
    finally:
        bar.close()
        model.to(home)
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate(model: nn.Module, data: Tensor, *, loss_fn: LossFn | None = None,
             batch_size: int = 500, seed: int = 0, num_samples: int = 1,
             device: DeviceLike | None = None, checked: bool = False) -> float:
    """Mean per-example loss of ``model`` on ``data`` (nats per example for an ``nll``).

    Noise drawn by the loss (e.g. dequantization) comes from a fixed ``seed`` without touching
    the global random state, so repeated evaluations agree; ``num_samples`` averages that many
    noise draws per example. It computes on ``device`` (default ``default_device()``) and returns
    the model to where it was; the sum stays on the device until one final read.

    Args:
        checked: the data were already checked (``fit`` passes True for its validation data).

    Raises:
        ValueError: for empty or invalid data or ``num_samples < 1``.
        FloatingPointError: if the result is not finite.
    """
    if loss_fn is None:
        loss_fn = model.nll
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not checked:
        check_data(model, data)
    device = resolve_device(device)
    home, was_training = module_device(model), model.training
    model.to(device)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.random.fork_rng():  # the CPU stream and the accelerator's
            torch.manual_seed(seed)
            with inputs_checked():
                for _ in range(num_samples):
                    for batch in data.split(batch_size):
                        total += loss_fn(batch.to(device, non_blocking=True)).sum().double()
    finally:
        model.train(was_training)
        model.to(home)
    result = total.item() / (len(data) * num_samples)
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
    ckpt = torch.load(Path(path), map_location=module_device(model), weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    return ckpt["meta"]
