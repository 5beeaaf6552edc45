"""Where the course computes: one place picks the device, and small helpers keep tensors on it.

* ``default_device()`` is CUDA when available, then Apple's MPS, else the CPU. The environment
  variable ``DGM_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``meta``) overrides it, and so does
  ``dgm train --device``. ``dgmlib.train.fit`` and ``evaluate`` use it, so a notebook run on a Colab
  GPU runtime trains on the GPU without edits.
* ``randn``, ``rand`` and ``randint`` draw noise on the device a model computes on. With a seeded
  ``torch.Generator`` the numbers come from that generator (drawn on the generator's own device,
  then moved), so a CPU generator gives the same noise wherever the model lives.
* ``value_checks(x)`` says whether an input check may read the values of ``x``. Reading them
  (NaN, integer levels, range) costs a host round trip on a GPU and is impossible on PyTorch's
  ``meta`` device. ``fit`` and ``evaluate`` check their whole data once, then run every batch inside
  ``inputs_checked()``, where the models check only shapes and dtypes. A direct call such as
  ``model.nll(y)`` outside that block checks everything.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

DeviceLike = str | torch.device

_INPUTS_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("dgm_inputs_checked", default=False)


def resolve_device(device: DeviceLike | None = None) -> torch.device:
    """Turn ``"cuda"``, ``"cpu"``, ``torch.device(...)`` or None (``default_device()``) into a ``torch.device``.

    Raises:
        TypeError: if ``device`` is neither a string nor a ``torch.device``.
        ValueError: for an unknown device name, or CUDA / MPS asked for where they are not available.
    """
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cuda' or a torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or meta") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch.cuda.is_available() is False "
                         "(on Colab: Runtime > Change runtime type > GPU)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but torch.backends.mps.is_available() is False")
    if dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda, cuda:N, mps or meta")
    return dev


def default_device() -> torch.device:
    """The course's device: ``$DGM_DEVICE`` if set, else CUDA if available, then MPS, else the CPU.

    Read at every call, so ``os.environ["DGM_DEVICE"] = "cpu"`` takes effect at once.

    Raises:
        ValueError: if ``DGM_DEVICE`` names a device that is unknown or not available here.
    """
    name = os.environ.get("DGM_DEVICE", "").strip()
    if name:
        try:
            return resolve_device(name)
        except ValueError as err:
            raise ValueError(f"DGM_DEVICE={name!r}: {err}") from err
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating parameter; ``torch.get_default_dtype()`` without one."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def place_data(data: Tensor, device: DeviceLike, fraction: float = 0.25) -> Tensor:
    """Move a whole dataset ``(N, ...)`` to ``device`` if it takes under ``fraction`` of the free memory there.

    Data that do not fit stay where they are, and ``fit`` moves each minibatch instead. The CPU
    and ``meta`` always take the data.

    Raises:
        TypeError: if ``data`` is not a tensor. ValueError: for a bad device or fraction.
    """
    if not isinstance(data, Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    device = resolve_device(device)
    if data.device == device:
        return data
    size = data.numel() * data.element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = size < fraction * free
    elif device.type == "mps":
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        fits = size < fraction * free
    else:
        fits = True
    return data.to(device) if fits else data


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return device if generator is None else generator.device


def randn(shape: Sequence[int], *, device: DeviceLike, dtype: torch.dtype | None = None,
          generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    Without a generator it is drawn on ``device`` from PyTorch's global (seeded) stream; with one,
    from that generator on the generator's device and then moved, so a seeded CPU generator gives
    the same numbers on every device.
    """
    device = torch.device(device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype,
                       device=_draw_device(generator, device)).to(device)


def rand(shape: Sequence[int], *, device: DeviceLike, dtype: torch.dtype | None = None,
         generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise on [0, 1) of ``shape`` on ``device``; a generator works as in ``randn``."""
    device = torch.device(device)
    return torch.rand(tuple(shape), generator=generator, dtype=dtype,
                      device=_draw_device(generator, device)).to(device)


def randint(low: int, high: int, shape: Sequence[int], *, device: DeviceLike,
            generator: torch.Generator | None = None) -> Tensor:
    """Integers in ``[low, high)`` (int64) of ``shape`` on ``device``; a generator works as in ``randn``."""
    device = torch.device(device)
    return torch.randint(low, high, tuple(shape), generator=generator,
                         device=_draw_device(generator, device)).to(device)


def value_checks(x: Tensor) -> bool:
    """Whether an input check may read the values of ``x`` (NaN, integer levels, range).

    False on the ``meta`` device (no values exist) and inside ``inputs_checked()``, where the data
    were checked as a whole beforehand; True otherwise. Shape and dtype checks never need this.
    """
    return x.device.type != "meta" and not _INPUTS_CHECKED.get()


@contextlib.contextmanager
def inputs_checked() -> Iterator[None]:
    """Within this block the models skip the value checks of their inputs (no host round trip per batch).

    ``fit`` and ``evaluate`` enter it after checking their whole data once (``train.check_data``).
    """
    token = _INPUTS_CHECKED.set(True)
    try:
        yield
    finally:
        _INPUTS_CHECKED.reset(token)


def multinomial(probs: Tensor, num_samples: int, *, replacement: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
    """``torch.multinomial`` on the rows of ``probs`` ``(..., K)``, with the result on ``probs``' device.

    A generator on another device (a seeded CPU generator for a model on a GPU) draws where it
    lives, so the draws are the same on every device.
    """
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, num_samples, replacement=replacement, generator=generator)
    return torch.multinomial(probs.to(generator.device), num_samples, replacement=replacement,
                             generator=generator).to(probs.device)


def bernoulli(probs: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """``torch.bernoulli(probs)`` on ``probs``' device; a generator works as in ``multinomial``."""
    if generator is None or generator.device == probs.device:
        return torch.bernoulli(probs, generator=generator)
    return torch.bernoulli(probs.to(generator.device), generator=generator).to(probs.device)
