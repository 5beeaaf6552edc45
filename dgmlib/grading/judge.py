"""The judge: test cells scored in the grader, on secret inputs, against the reference, with no student code.

Three rounds of attacks on ``dgm grade`` taught one lesson: a check that runs in the student's
interpreter belongs to the student (hooks that rewrite test cells, forged channels, lying methods).
So a judged test cell runs no check in the student's kernel that counts. It ends with a *probe*,
``grading.probe("test_round_trip", coupling=AffineCoupling)`` (``dgmlib.grading.probing``), and its
points are decided here, by the *judge* of the same name, a function in the instructor's
``solutions/ASSIGNMENT/judge.py`` that never enters the kernel::

    @judge("test_round_trip")
    def round_trip(k: Kernel, rng: torch.Generator) -> None:
        ref = randomise(REF.AffineCoupling(mask, net), rng)       # the reference, here in the grader
        layer = k.coupling(mask, net_handle)                       # the student's, in the kernel
        layer.load_state_dict(parameters(ref), strict=False)      # the same parameters
        x = torch.randn(7, 2, 4, 4, generator=rng, dtype=torch.float64)
        z, log_det = layer.double()(x)                             # the student's outputs (data)
        expect_close(z, ref(x)[0], msg="forward")                  # compared here

- **Inputs** are drawn from ``rng``, seeded from a secret drawn per submission (``JudgeServer``), so
  no precomputed answer fits.
- **The kernel only computes the student's outputs.** ``k.NAME(...)`` calls what the probe exposed,
  on inputs the judge sends; results come back as data (``dgmlib.grading.wire``: tensors, numbers,
  strings, containers; never code), and objects that are not data (a module) stay in the kernel as
  ``Remote`` handles the judge can call again (``layer.inverse(z)``, ``layer.attr("mask")``).
- **Every expected value, threshold and comparison is computed here**, by the judge, with the full
  reference library and the solution's own code (``solution_cells``). Thresholds on trained models are
  measured by loading the student's parameters into the assignment's trusted architecture, never by
  the student's methods.
- **A cell earns its points only if its judge ran while that cell ran and passed**
  (``JudgeServer.verdict``); ``dgmlib.grading.receipts.ReceiptExecute`` writes a failing verdict into
  the graded notebook as the cell's first output, which is how nbgrader scores a cell 0.

What the kernel can still do is send wrong outputs, or none: that earns nothing. Hidden tests live
only in ``judge.py``; visible checks in the cell promise that the judge checks at least those
properties, on inputs of its own. Source: the course's issue 26; the design is ours.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
import types
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from dgmlib.grading.probing import serve as _serve_probe
from dgmlib.grading import wire

__all__ = ["JudgeFailure", "KernelError", "Kernel", "Remote", "judge", "load_judges", "solution_cells",
           "expect", "expect_close", "expect_equal", "expect_le", "expect_shape", "as_tensor", "randomise",
           "secret_int", "secret_float", "secret_seed",
           "parameters", "Verdict", "JudgeServer", "judge_locally"]

Judge = Callable[["Kernel", torch.Generator], None]


class JudgeFailure(AssertionError):
    """A check of the judge failed: the test cell scores 0. The message is shown to the student."""


class KernelError(JudgeFailure):
    """The student's code raised, or answered with something that is not a value, when the judge called it."""


# ------------------------------------------------------------------ the kernel, seen from the judge


class Kernel:
    """The student's kernel, seen from a judge: ``k.NAME(*args)`` calls what the probe exposed as ``NAME``.

    Arguments are sent as data (tensors, numbers, strings, containers, ``Remote``); results come back
    as data, with every object that is not data as a ``Remote``.
    """

    def __init__(self, sock: socket.socket, exposed: Iterable[str]) -> None:
        self._sock = sock
        self._exposed = frozenset(exposed)

    def __getattr__(self, name: str) -> "Remote":
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._exposed:
            raise JudgeFailure(f"the test cell's probe does not expose {name!r} (restore the test cell)")
        return Remote(self, name)

    def _request(self, request: dict, what: str) -> Any:
        try:
            wire.send(self._sock, wire.encode(_to_wire(request)))
            reply = wire.decode(wire.receive(self._sock))
        except socket.timeout:
            raise KernelError(f"{what} did not answer in time") from None
        except (EOFError, OSError, wire.WireError) as err:
            raise KernelError(f"{what}: the kernel stopped answering ({err})") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise KernelError(f"{what}: the kernel's answer is not a reply")
        if not reply["ok"]:
            raise KernelError(f"{what} raised {str(reply.get('error'))[:500]}")
        return _from_wire(reply.get("value"), self)

    def done(self) -> None:
        """Tell the probe that the judge is finished (the test cell then goes on)."""
        try:
            wire.send(self._sock, wire.encode({"op": "done"}))
        except OSError:
            pass


class Remote:
    """An object in the student's kernel: an exposed name or a handle. Call it, call its methods
    (``remote.inverse(z)``), read its attributes as data (``remote.attr("mask")``)."""

    def __init__(self, kernel: Kernel, target: str | wire.Handle, label: str | None = None) -> None:
        self._kernel, self._target = kernel, target
        self._label = label or (target if isinstance(target, str) else f"object #{target.number}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._kernel._request({"op": "call", "target": self._target, "method": None, "args": list(args),
                                      "kwargs": kwargs}, f"{self._label}(...)")

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args: Any, **kwargs: Any) -> Any:
            return self._kernel._request({"op": "call", "target": self._target, "method": name, "args": list(args),
                                          "kwargs": kwargs}, f"{self._label}.{name}(...)")

        return method

    def attr(self, name: str) -> Any:
        """The attribute ``name`` of the object, as data (or a ``Remote``)."""
        return self._kernel._request({"op": "get", "target": self._target, "attr": name}, f"{self._label}.{name}")

    def __repr__(self) -> str:
        return f"Remote({self._label})"


def _to_wire(value: Any) -> Any:
    if isinstance(value, Remote):
        return value._target if isinstance(value._target, wire.Handle) else {"$exposed": value._target}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_wire(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(value: Any, kernel: Kernel) -> Any:
    if isinstance(value, wire.Handle):
        return Remote(kernel, value)
    if isinstance(value, list):
        return [_from_wire(v, kernel) for v in value]
    if isinstance(value, tuple):
        return tuple(_from_wire(v, kernel) for v in value)
    if isinstance(value, dict):
        return {k: _from_wire(v, kernel) for k, v in value.items()}
    return value


# ------------------------------------------------------------------ writing judges


def judge(grade_id: str) -> Callable[[Judge], Judge]:
    """Mark ``fn(k: Kernel, rng: torch.Generator) -> None`` as the judge of the test cell ``grade_id``.

    The judge passes by returning; it fails by raising (``JudgeFailure`` from the ``expect_*`` checks;
    any other exception fails the cell too).
    """
    def mark(fn: Judge) -> Judge:
        fn.__dgm_judge__ = grade_id  # type: ignore[attr-defined]
        return fn

    return mark


def load_judges(path: str | os.PathLike) -> dict[str, Judge]:
    """The judges defined in ``path`` (``solutions/ASSIGNMENT/judge.py``), by the grade_id they judge.

    Raises:
        FileNotFoundError: if ``path`` does not exist. ValueError: if two judges claim one grade_id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no judge file {path}")
    spec = importlib.util.spec_from_file_location(f"dgm_judge_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the instructor's file: trusted
    judges: dict[str, Judge] = {}
    for obj in vars(module).values():
        grade_id = getattr(obj, "__dgm_judge__", None)
        if callable(obj) and isinstance(grade_id, str):
            if grade_id in judges:
                raise ValueError(f"two judges for {grade_id!r} in {path}")
            judges[grade_id] = obj
    return judges


def solution_cells(notebook: str | os.PathLike, *grade_ids: str, setup: Iterable[str] = ("setup",)) -> types.SimpleNamespace:
    """Run the named cells of the instructor's source notebook here, in a fresh namespace, and return it.

    The reference a judge compares with is the solution's own code: ``REF = solution_cells(
    Path(__file__).with_name("hw1_autoregressive.ipynb"), "made", "conv")`` then ``REF.made_masks``.
    The ``setup`` cells run first (imports, constants), then ``grade_ids`` in the notebook's order.

    Raises:
        KeyError: if a named cell is missing from the notebook.
    """
    cells = json.loads(Path(notebook).read_text())["cells"]
    by_id = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id"): c for c in cells}
    wanted = list(setup) + list(grade_ids)
    missing = [g for g in wanted if g not in by_id]
    if missing:
        raise KeyError(f"{notebook} has no cells {missing}")
    namespace: dict[str, Any] = {"__name__": "dgm_reference"}
    for cell in cells:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") in wanted:
            source = "".join(cell["source"])
            exec(compile(source, f"<{Path(notebook).name}:{cell['metadata']['nbgrader']['grade_id']}>", "exec"),
                 namespace)
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if not k.startswith("__")})


def as_tensor(value: Any, what: str = "the value") -> torch.Tensor:
    """``value`` if it is a tensor from the kernel, else ``JudgeFailure`` naming what came instead."""
    if not isinstance(value, torch.Tensor):
        raise JudgeFailure(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    return value


def expect(condition: bool, msg: str) -> None:
    """Fail with ``msg`` unless ``condition`` (computed here, in the judge) holds."""
    if not condition:
        raise JudgeFailure(msg)


def expect_shape(value: Any, shape: tuple[int, ...], msg: str = "") -> torch.Tensor:
    """``value`` as a tensor of exactly ``shape``; ``JudgeFailure`` otherwise."""
    t = as_tensor(value, msg or "the value")
    if tuple(t.shape) != tuple(shape):
        raise JudgeFailure(f"{msg + ': ' if msg else ''}shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def expect_close(actual: Any, expected: torch.Tensor | float, *, atol: float = 1e-6, rtol: float = 1e-5,
                 msg: str = "") -> None:
    """Fail unless ``|actual - expected| <= atol + rtol |expected|`` elementwise, with equal shapes and no NaN.

    ``actual`` comes from the kernel; ``expected`` is computed by the judge. Both are compared in float64.
    """
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    t = as_tensor(actual, msg or "the value").detach()
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.bool, torch.uint8,
                                                                     torch.int16, torch.int8)):
        raise JudgeFailure(f"{msg + ': ' if msg else ''}a real tensor was expected, got {t.dtype}")
    a = t.to(torch.float64)
    prefix = f"{msg}: " if msg else ""
    if a.shape != expected.shape:
        raise JudgeFailure(f"{prefix}shape {tuple(a.shape)}, expected {tuple(expected.shape)}")
    if torch.isnan(a).any():
        raise JudgeFailure(f"{prefix}NaN in the values")
    bad = ~((a - expected).abs() <= atol + rtol * expected.abs())
    if bad.any():
        raise JudgeFailure(f"{prefix}{int(bad.sum())} of {a.numel()} values are wrong; largest difference "
                           f"{float((a - expected).abs().max()):.3g}")


def expect_equal(actual: Any, expected: Any, msg: str = "") -> None:
    """Fail unless ``actual`` equals ``expected`` exactly: tensors by shape and every value, other data by ``==``."""
    prefix = f"{msg}: " if msg else ""
    if isinstance(expected, torch.Tensor):
        a = as_tensor(actual, msg or "the value")
        if a.shape != expected.shape:
            raise JudgeFailure(f"{prefix}shape {tuple(a.shape)}, expected {tuple(expected.shape)}")
        if (a.dtype == torch.bool) != (expected.dtype == torch.bool):
            raise JudgeFailure(f"{prefix}dtype {a.dtype}, expected {expected.dtype}")
        if a.dtype == torch.bool:
            same = a == expected
        else:
            same = a.to(torch.float64) == expected.to(torch.float64)
        if not bool(same.all()):
            raise JudgeFailure(f"{prefix}{int((~same).sum())} of {a.numel()} values differ")
        return
    if type(actual) is not type(expected) or actual != expected:
        raise JudgeFailure(f"{prefix}got {actual!r:.80}, expected {expected!r:.80}")


def expect_le(value: Any, bound: float, msg: str = "") -> float:
    """Fail unless ``value`` (a number the judge computed) is finite and at most ``bound``; return it."""
    v = float(value)
    if not v <= bound:  # NaN fails too
        raise JudgeFailure(f"{msg + ': ' if msg else ''}{v:.4g} is not at most {bound:.4g}")
    return v


def secret_int(rng: torch.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high]`` drawn from the judge's secret ``rng``."""
    return int(torch.randint(low, high + 1, (1,), generator=rng))


def secret_float(rng: torch.Generator, low: float, high: float) -> float:
    """A float in ``[low, high)`` drawn from the judge's secret ``rng``."""
    return low + (high - low) * float(torch.rand((), generator=rng, dtype=torch.float64))


def secret_seed(rng: torch.Generator) -> int:
    """A seed in ``[0, 2^31)`` drawn from the judge's secret ``rng``, for a generator the kernel is asked to use."""
    return secret_int(rng, 0, 2**31 - 1)


def randomise(module: torch.nn.Module, rng: torch.Generator, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter of ``module`` i.i.d. ``N(0, scale^2)`` values from ``rng`` and return it in float64."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=rng, dtype=torch.float64))
    return module.double()


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` by name, detached (no buffers: a mask stays the student's own)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ------------------------------------------------------------------ the grader's server


NEVER_REACHED = "the test cell's probe never reached the grader's judge"
"""The reason of a test cell whose probe never reached its judge while it ran (it crashed first, or never probed)."""


@dataclass(frozen=True)
class Verdict:
    """A judge's decision for one test cell."""

    grade_id: str
    passed: bool
    message: str


class JudgeServer:
    """The judges of one assignment, serving probes on a Unix socket at ``path``, in the grader's process.

    A probe is judged only while the test cell of the same grade_id runs (``begin_cell``/``end_cell``),
    at most once per cell, one connection at a time; its ``Verdict`` is kept here, never in the kernel.

    Args:
        path: the socket's path (the sandbox shows its folder to the kernel read-only).
        judges: grade_id -> judge (``load_judges``).
        seed: the submission's secret seed; each judge draws from ``seed`` and its grade_id.
        timeout: seconds the judge waits for one answer of the kernel.
    """

    def __init__(self, path: str | os.PathLike, judges: dict[str, Judge], seed: int, timeout: float = 300.0) -> None:
        self.path, self.judges, self.timeout = str(path), dict(judges), float(timeout)
        self._seed = int(seed)
        self._lock = threading.Lock()
        self._current: str | None = None
        self._verdicts: dict[str, Verdict] = {}
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(4)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="dgm-judge", daemon=True)
        self._thread.start()

    def begin_cell(self, grade_id: str | None) -> None:
        """The test cell ``grade_id`` starts: its probe may now be judged (once)."""
        with self._lock:
            self._current = grade_id
            if grade_id is not None:
                self._verdicts.pop(grade_id, None)

    def end_cell(self) -> None:
        """The cell has finished: no probe is judged until the next ``begin_cell``."""
        with self._lock:
            self._current = None

    def verdict(self, grade_id: str) -> Verdict:
        """The verdict of the cell's judge, or a failing one if no probe reached it while the cell ran."""
        with self._lock:
            return self._verdicts.get(grade_id) or Verdict(
                grade_id, False, NEVER_REACHED)

    def close(self) -> None:
        """Stop serving and remove the socket."""
        self._closed = True
        try:
            self._sock.close()
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:  # one connection at a time: a kernel cannot make the grader hold many
                try:
                    self._handle(conn)
                except Exception:  # noqa: BLE001 - a broken connection fails the probe, never the grader
                    pass

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        try:
            hello = wire.decode(wire.receive(conn))
        except (EOFError, OSError, wire.WireError):
            return
        if not isinstance(hello, dict) or hello.get("op") != "probe" or not isinstance(hello.get("name"), str):
            return
        name = hello["name"]
        exposed = hello.get("exposed") if isinstance(hello.get("exposed"), list) else []
        with self._lock:
            allowed = name == self._current and name in self.judges and name not in self._verdicts
            if allowed:  # claimed now: a second probe in the same cell is refused
                self._verdicts[name] = Verdict(name, False, "the judge did not finish")
        if not allowed:
            Kernel(conn, ()).done()
            return
        kernel = Kernel(conn, [e for e in exposed if isinstance(e, str)])
        rng = torch.Generator().manual_seed((self._seed + zlib.crc32(name.encode())) % (1 << 63))
        passed, message = run_judge(self.judges[name], kernel, rng)
        with self._lock:
            self._verdicts[name] = Verdict(name, passed, message)
        kernel.done()


def run_judge(fn: Judge, kernel: Kernel, rng: torch.Generator) -> tuple[bool, str]:
    """Run one judge; return ``(passed, message)``. Any exception fails it, with its message."""
    try:
        fn(kernel, rng)
    except JudgeFailure as err:
        return False, str(err) or type(err).__name__
    except Exception as err:  # noqa: BLE001 - e.g. a wrong shape that torch refused while the judge computed
        return False, f"the grader could not check your output ({type(err).__name__}: {str(err)[:300]})"
    return True, "passed"


def judge_locally(fn: Judge, exposed: dict[str, Any], seed: int = 0) -> tuple[bool, str]:
    """Run the judge ``fn`` against objects of this process, through the real wire format and probe loop.

    For tests and for instructors writing judges: ``judge_locally(judges["test_x"], {"made_masks": made_masks})``.

    Returns:
        ``(passed, message)`` as ``dgm grade`` would record them.
    """
    judge_end, kernel_end = socket.socketpair()
    thread = threading.Thread(target=_serve_probe, args=(kernel_end, "local", exposed), daemon=True)
    thread.start()
    try:
        hello = wire.decode(wire.receive(judge_end))
        kernel = Kernel(judge_end, hello["exposed"])
        rng = torch.Generator().manual_seed((int(seed) + zlib.crc32(b"local")) % (1 << 63))
        result = run_judge(fn, kernel, rng)
        kernel.done()
    finally:
        thread.join(timeout=30)
        judge_end.close()
        kernel_end.close()
    return result
