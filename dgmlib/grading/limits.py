"""Limits of the grading kernel beyond its rlimits (see ``dgmlib.grading.sandbox``): its output per stream
(``LimitedOutStream``, in the kernel) and, per submission, where cgroup v2 can be written, a cgroup
(``submission_cgroup``, made by the grader), else, under a root grader, a watchdog over the processes of the
submission's own host uid (``UidWatchdog``)."""

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


class UidWatchdog:
    """Per-submission limits without cgroups: the memory and CPU time of every process of one host uid, together.

    Under a root grader ``dgm grade`` runs each submission's kernel as a host uid of its own
    (``sandbox.host_uid``), so the processes of that uid are exactly the submission's, however many it forks.
    A thread reads ``/proc`` every ``interval`` seconds, adds up their resident memory and their CPU time (their
    own and that of the children they reaped), and kills them all (``SIGKILL``) the first time either total
    passes its limit; ``reason`` then says which. tmpfs pages are not resident memory: each tmpfs of the sandbox
    has a size of its own. Where cgroup v2 can be written, ``submission_cgroup`` does the same in the kernel
    (and exactly); this is the fallback. Source: the course's issue 26 ("limits per submission, not per
    process"); the design is ours.

    Args:
        uid: the host uid whose processes are the submission's (never 0 or the grader's own).
        memory_bytes: the most resident memory of all its processes together.
        cpu_seconds: the most CPU time of all its processes together.
        interval: seconds between two readings.

    Raises:
        ValueError: if ``uid`` is 0 or the grader's own uid.
    """

    def __init__(self, uid: int, memory_bytes: int, cpu_seconds: float, interval: float = 0.5) -> None:
        import threading

        if uid in (0, os.getuid()):
            raise ValueError(f"the watchdog kills every process of uid {uid}: not root's nor the grader's")
        self.uid, self.memory_bytes, self.cpu_seconds, self.interval = int(uid), int(memory_bytes), float(cpu_seconds), interval
        self.reason = ""
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"dgm-watchdog-{uid}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the submission is done)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def processes(self) -> list[int]:
        """The pids of the uid's processes now."""
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat(f"/proc/{name}").st_uid == self.uid:
                        pids.append(int(name))
                except OSError:
                    pass  # it just ended
        return pids

    def usage(self) -> tuple[int, float]:
        """(resident bytes, CPU seconds) of the uid's processes together, now."""
        page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
        rss, cpu = 0, 0.0
        for pid in self.processes():
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields after the name: state is [0]; utime, stime, cutime, cstime are [11:15]; rss (pages) is [21]
            cpu += sum(int(v) for v in fields[11:15]) / tick
            rss += int(fields[21]) * page
        return rss, cpu

    def _kill_all(self) -> None:
        import signal

        for _ in range(3):  # a process forked between the listing and the kill is caught by the next round
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            rss, cpu = self.usage()
            self.peak_bytes = max(self.peak_bytes, rss)
            if rss > self.memory_bytes:
                self.reason = (f"its processes together used {rss / 2**20:.0f} MiB of memory, over the limit of "
                               f"{self.memory_bytes / 2**20:.0f} MiB: stopped")
            elif cpu > self.cpu_seconds:
                self.reason = (f"its processes together used {cpu:.0f} s of CPU time, over the limit of "
                               f"{self.cpu_seconds:.0f} s: stopped")
            if self.reason:
                self._kill_all()
                return
