"""Limits of the grading kernel beyond its rlimits (see ``dgmlib.grading.sandbox``): its output per stream
(``LimitedOutStream``, in the kernel) and, where cgroup v2 can be written, a cgroup per submission
(``submission_cgroup``, made by the grader)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ipykernel.iostream import OutStream


class LimitedOutStream(OutStream):
    """ipykernel's stdout/stderr stream that drops everything past ``DGM_SANDBOX_OUTPUT_KB`` per stream.

    A flood of prints then costs the grader a bounded amount of memory and time; one notice says
    where the output was cut.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._budget = int(os.environ.get("DGM_SANDBOX_OUTPUT_KB", "512")) * 1024
        self._truncated = False

    def write(self, string: str) -> int:  # noqa: D102 - the stream protocol
        if self._budget <= 0:
            if not self._truncated:
                self._truncated = True
                super().write("\n[output truncated by the grader: limit reached]\n")
            return len(string)
        piece = string[: self._budget]
        self._budget -= len(piece)
        super().write(piece)
        return len(string)


# ---------------------------------------------------------------- a cgroup per submission (cgroup v2)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "dgm-grading"
"""``dgm grade``'s cgroups live in ``CGROUP_ROOT/CGROUP_PARENT/``, one per submission."""
_CONTROLLERS = ("memory", "pids", "cpu")


def submission_cgroup(name: str, memory_bytes: int, tasks: int, cpus: float,
                      root: Path = CGROUP_ROOT) -> Path | None:
    """Make the cgroup v2 ``root/dgm-grading/name`` for one submission's kernel, or return None.

    Its limits: ``memory.max`` (the kernel's memory and its tmpfs pages), no swap, ``pids.max`` (tasks,
    threads included) and ``cpu.max`` (``cpus`` cores' worth of time). The launcher joins it
    (``sandbox.join_cgroup``) before it execs bubblewrap; ``remove_cgroup`` ends it.

    Where cgroup v2 is not mounted at ``root`` with the memory and pids controllers (a hybrid or v1
    host, a container that cannot delegate them) or cannot be written (not root), this returns None and
    the kernel is held by its rlimits alone (``dgmlib.grading.sandbox``): a per-process data limit rather
    than one on the whole kernel, and no cap on tmpfs pages but the tmpfs sizes.

    Args:
        name: the cgroup's name (unique per submission and grading run).
        memory_bytes, tasks, cpus: the limits.
        root: where cgroup v2 is mounted.
    """
    group = None
    try:
        available = (root / "cgroup.controllers").read_text().split()
        if not {"memory", "pids"} <= set(available):
            return None
        wanted = [c for c in _CONTROLLERS if c in available]
        parent = root / CGROUP_PARENT
        for folder in (root, parent):
            folder.mkdir(exist_ok=True)
            for controller in list(wanted):
                try:
                    _enable(folder, controller)
                except OSError:
                    if controller != "cpu":  # memory and pids are needed; the CPU share is a plus
                        raise
                    wanted.remove(controller)
        group = parent / name
        group.mkdir()
        (group / "memory.max").write_text(f"{int(memory_bytes)}\n")
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0\n")
        (group / "pids.max").write_text(f"{int(tasks)}\n")
        if "cpu" in wanted:
            period = 100_000
            (group / "cpu.max").write_text(f"{max(1000, int(cpus * period))} {period}\n")
        return group
    except (OSError, ValueError):
        if group is not None:
            remove_cgroup(group, wait=0.0)
        return None


def _enable(folder: Path, controller: str) -> None:
    """Enable ``controller`` for the children of the cgroup ``folder`` (nothing to do if it is already)."""
    control = folder / "cgroup.subtree_control"
    if controller not in (control.read_text().split() if control.exists() else []):
        with open(control, "a") as fh:  # a control file: each write is one request
            fh.write(f"+{controller}\n")


def remove_cgroup(group: Path | None, wait: float = 5.0) -> None:
    """Kill whatever is left in ``group`` (``cgroup.kill``) and remove it; never raises."""
    if group is None:
        return
    try:
        if (group / "cgroup.kill").exists():
            (group / "cgroup.kill").write_text("1\n")
    except OSError:
        pass
    deadline = time.monotonic() + wait
    while True:
        try:
            group.rmdir()
            return
        except OSError:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)
