"""The course's single fast-mode switch.

Setting the environment variable ``DGM_FAST=1``, or ``FAST = True`` in a notebook's fast switch (the cell
after the setup cell, which calls ``set_fast_mode``), shrinks every training run (epochs, widths)
so that CI, nbgrader autograding and ``dgm train --fast`` finish in seconds on a CPU, and every
figure drawn meanwhile says "fast mode" (``dgmlib.plots.stamp_fast_mode``). Full-size runs take
minutes per model on a laptop CPU and less on a GPU (Colab); both are bounded by epochs, so they
give the same numbers on any machine.
"""

from __future__ import annotations

import os
import warnings
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


def set_fast_mode(fast: bool) -> bool:
    """Turn fast mode on or off for this process and the processes it starts (sets ``DGM_FAST``); return it.

    A notebook's fast switch runs ``FAST = set_fast_mode(FAST)``. Under ``dgm grade`` (``DGM_FAST_LOCKED=1`` in the
    kernel's environment) the grader's mode is kept, returned, and a different request only warns: a class is
    graded in one mode, whatever each notebook asks. The lock keeps honest notebooks in step; it is no defence (a
    kernel can set ``DGM_FAST`` itself, which changes only how long its own training takes: the judges measure in
    the grader).

    Raises:
        TypeError: if ``fast`` is not a bool (``FAST = "no"`` would otherwise read as true).
    """
    if not isinstance(fast, bool):
        raise TypeError(f"FAST must be True or False, got {fast!r}")
    if os.environ.get("DGM_FAST_LOCKED", "").strip() == "1":
        if fast != fast_mode():
            warnings.warn(f"FAST = {fast} is ignored: this notebook is being graded, in "
                          f"{'fast' if fast_mode() else 'full'} mode", RuntimeWarning, stacklevel=2)
        return fast_mode()
    os.environ["DGM_FAST"] = "1" if fast else "0"
    return fast


def pick(full: T, fast: T) -> T:
    """Return ``fast`` in fast mode and ``full`` otherwise (e.g. ``pick(full=60, fast=3)``)."""
    return fast if fast_mode() else full
