"""The course's single fast-mode switch.

Setting the environment variable ``DGM_FAST=1`` shrinks every training run (epochs, widths)
so that CI, nbgrader autograding and ``dgm train --fast`` finish in seconds on a CPU, and every
figure drawn meanwhile says "fast mode" (``dgmlib.plots.stamp_fast_mode``). Full-size runs take
minutes per model on a laptop CPU and less on a GPU (Colab); both are bounded by epochs, so they
give the same numbers on any machine.
"""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def fast_mode() -> bool:
    """Return whether fast mode is on, read from ``DGM_FAST`` at every call.

    Raises:
        ValueError: if ``DGM_FAST`` holds something other than 1/0/true/false/yes/no/on/off.
    """
    raw = os.environ.get("DGM_FAST", "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"DGM_FAST must be 1 or 0 (or true/false), got {raw!r}")


def pick(full: T, fast: T) -> T:
    """Return ``fast`` in fast mode and ``full`` otherwise (e.g. ``pick(full=60, fast=3)``)."""
    return fast if fast_mode() else full
