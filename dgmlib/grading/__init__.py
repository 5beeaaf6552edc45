"""Assertions for assignment tests, and the probe through which the grader's judge calls the student's code.

**Judged assignments** (those with ``solutions/ASSIGNMENT/judge.py``; ``dgmlib.grading.judge``): a test
cell's points are decided by its judge, in the grader, on secret inputs, against the reference; the cell
ends with ``probe("grade_id", name=obj, ...)`` (``dgmlib.grading.probing``), which exposes the student's
code to the judge. The ``assert_*`` checks below are then the student's own feedback (what ``nbgrader
validate`` shows): they earn nothing, so nothing in the student's kernel needs protecting for the score.

**Other assignments** score by receipts, as follows.

Student code runs in the same kernel as the tests, so it can redefine anything a test relies on:
``torch.allclose = lambda *a, **k: True``, ``train.evaluate = ...``, ``builtins.all = ...``, a
tensor subclass whose ``__torch_function__`` lies, ``dgmlib.grading`` itself, or the shell's handling
of exceptions. Test cells therefore compare only through these functions, and every check they make
is decided outside the kernel:

1. The comparison is done by a clean checker (numpy only, never student code). Under ``dgm grade``
   the checker runs in the grader's own process, outside the sandbox, and listens on a Unix socket
   (``DGM_CHECKER_SOCKET``); it records a *receipt* for every check: the function (``assert_close``),
   the line of the test cell that called it, and the verdict. A test cell earns its points only if
   the grader holds a passing receipt for every check written in the cell and no failing one
   (``dgmlib.grading.receipts``). A stand-in grading module, a forged channel or a hidden exception
   leaves no passing receipt, so it earns nothing. Without ``dgm grade`` (a student running the
   notebook, ``nbgrader validate``) the checker is a child process (``python -I _checker.py``): the
   verdicts are the same, but nothing outside the kernel keeps them.
2. Before a check is sent, the comparison machinery is checked to be the original: every protected
   callable (comparison and reduction functions of torch, numpy, math and builtins, every public
   function and method of dgmlib, and this module's own globals) is still the object captured when
   this module was first imported, and that object is genuine (implemented in C, or compiled from
   the file of the package it belongs to); otherwise ``TamperingError``. This gives an early, clear
   failure in the kernel; the receipts are what the score rests on.
3. Only exact ``torch.Tensor``, ``numpy.ndarray`` or built-in numbers (no subclasses) are accepted,
   copied with captured functions.

Every failure is an ``AssertionError``. The grading report also flags submissions whose code goes
beyond what the assignment allows (``dgmlib.grading.review``): a student who sends chosen values to
the genuine checker gets receipts, but not past that review. Source: the course's issues 6 and 12;
the design is ours.
"""

from __future__ import annotations

import atexit
import builtins
import math
import os
import socket
import struct
import subprocess
import sys
import types

import numpy
import torch

import dgmlib
import dgmlib.autoregressive
import dgmlib.cnf
import dgmlib.config
import dgmlib.data
import dgmlib.device
import dgmlib.dequantization
import dgmlib.diffusion
import dgmlib.flows
import dgmlib.ode
import dgmlib.revnet
import dgmlib.train
import dgmlib.units
import dgmlib.vae
import dgmlib.vq
from dgmlib.grading.probing import probe

__all__ = ["probe", "TamperingError", "verify_untampered", "trusted", "assert_close", "assert_not_close",
           "assert_equal", "assert_true", "assert_le", "assert_shape", "randomised"]


class TamperingError(AssertionError):
    """The comparison machinery was modified: the test fails."""


_BUILTIN_NAMES = ("abs", "all", "any", "bool", "callable", "float", "getattr", "hasattr", "int", "isinstance",
                  "issubclass", "iter", "len", "map", "max", "min", "next", "print", "range", "repr", "round",
                  "sorted", "str", "sum", "tuple", "type", "zip", "__import__")
_TORCH_NAMES = ("allclose", "equal", "isclose", "count_nonzero", "diag", "diagonal", "isfinite", "stack",
                "testing.assert_close", "func.jacrev", "linalg.slogdet", "no_grad", "as_tensor", "tensor")
_TENSOR_METHODS = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__float__",
                   "__neg__", "__getitem__", "abs", "all", "any", "min", "max", "sum", "item", "numpy", "detach",
                   "cpu", "clone", "size", "tolist", "flatten", "reshape", "double", "float")
_NUMPY_NAMES = ("allclose", "array_equal", "isclose", "ascontiguousarray", "testing.assert_allclose")
_MATH_NAMES = ("isclose", "isfinite", "log", "exp")
_DGMLIB_MODULES = (dgmlib.autoregressive, dgmlib.cnf, dgmlib.config, dgmlib.data, dgmlib.dequantization, dgmlib.device, dgmlib.diffusion,
                   dgmlib.flows, dgmlib.ode, dgmlib.revnet, dgmlib.train, dgmlib.units, dgmlib.vae, dgmlib.vq)
_C_TYPES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
            types.ClassMethodDescriptorType, types.MethodWrapperType, types.GetSetDescriptorType)


def _resolve(root: object, dotted: str) -> object:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _protected_objects() -> dict[str, tuple[object, str]]:
    """Name -> (current object, package directory it must come from)."""
    import os

    def pkg_dir(module: types.ModuleType) -> str:
        return os.path.dirname(os.path.abspath(module.__file__))

    table: dict[str, tuple[object, str]] = {}
    stdlib = os.path.dirname(os.path.abspath(types.__file__))
    for name in _BUILTIN_NAMES:
        table[f"builtins.{name}"] = (getattr(builtins, name), stdlib)
    for name in _TORCH_NAMES:
        table[f"torch.{name}"] = (_resolve(torch, name), pkg_dir(torch))
    for name in _TENSOR_METHODS:
        table[f"torch.Tensor.{name}"] = (getattr(torch.Tensor, name), pkg_dir(torch))
    for name in _NUMPY_NAMES:
        table[f"numpy.{name}"] = (_resolve(numpy, name), pkg_dir(numpy))
    for name in _MATH_NAMES:
        table[f"math.{name}"] = (getattr(math, name), stdlib)
    for module in _DGMLIB_MODULES:
        home = pkg_dir(dgmlib)
        for name, obj in vars(module).items():
            if (name.startswith("_") or not isinstance(obj, (types.FunctionType, type))
                    or obj.__module__ != module.__name__):
                continue
            table[f"{module.__name__}.{name}"] = (obj, home)
            if isinstance(obj, type):  # the methods of dgmlib's classes, e.g. Flow.log_prob
                for attr, member in vars(obj).items():  # (not the methods a NamedTuple gets from collections)
                    if (isinstance(member, types.FunctionType) and not attr.startswith("__")
                            and member.__module__ == module.__name__):
                        table[f"{module.__name__}.{name}.{attr}"] = (member, home)
    for name in ("torch", "numpy", "math", "builtins", "subprocess", *(m.__name__ for m in _DGMLIB_MODULES)):
        table[f"sys.modules[{name}]"] = (sys.modules[name], "")
    return table


def _genuine(obj: object, home: str) -> bool:
    """True if ``obj`` is implemented in C or compiled from a file under ``home``."""
    if isinstance(obj, (_C_TYPES, type, types.ModuleType)) or callable(obj) and type(obj).__module__ == "torch._C":
        return True
    func = getattr(obj, "__func__", obj)
    func = getattr(func, "__wrapped__", func)
    code = getattr(func, "__code__", None)
    if code is None:
        return False  # e.g. functools.partial(lambda ...) or an object with __call__: not genuine
    return bool(home) and code.co_filename.startswith(home)


_SNAPSHOT = _protected_objects()
_CODES = {name: getattr(obj, "__code__", None) for name, (obj, _) in _SNAPSHOT.items()}  # catches __code__ swaps
_FORGED = sorted(name for name, (obj, home) in _SNAPSHOT.items() if home and not _genuine(obj, home))
_Tensor = torch.Tensor
_ndarray = numpy.ndarray
_type, _len, _tuple, _int, _float, _bool = type, len, tuple, int, float, bool
_detach, _cpu, _to_numpy, _size = torch.Tensor.detach, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.size
_ascontiguous = numpy.ascontiguousarray
_Popen, _PIPE, _pack, _unpack = subprocess.Popen, subprocess.PIPE, struct.pack, struct.unpack
_checker_process: subprocess.Popen | None = None
_connection: socket.socket | None = None
_SOCKET_PATH = os.environ.get("DGM_CHECKER_SOCKET", "")  # the grader's checker, read once at import
_socket_type, _AF_UNIX, _SOCK_STREAM = socket.socket, socket.AF_UNIX, socket.SOCK_STREAM
_getframe, _THIS_FILE = sys._getframe, __file__
_CHECKER_SCRIPT = __file__.rsplit("__init__.py", 1)[0] + "_checker.py"


def verify_untampered() -> None:
    """Raise ``TamperingError`` if any protected callable was replaced or was not genuine at import.

    Also checks this module's own globals, so that replacing one of its helpers is caught.
    """
    if _FORGED:
        raise TamperingError(f"replaced before the tests were imported: {', '.join(_FORGED[:5])}")
    current = _protected_objects()
    changed = [name for name, (obj, _) in _SNAPSHOT.items()
               if current.get(name, (None,))[0] is not obj or getattr(obj, "__code__", None) is not _CODES.get(name)]
    own = [name for name, obj in _OWN_GLOBALS.items() if globals().get(name) is not obj]
    if changed or own:
        raise TamperingError(f"the test machinery was modified: {', '.join((changed + own)[:5])}")


def trusted(x: object) -> torch.Tensor:
    """A detached CPU copy of ``x`` after checking it is an exact ``torch.Tensor`` (no subclass).

    Raises:
        TamperingError: if the machinery was modified. AssertionError: if ``x`` is not a plain tensor.
    """
    verify_untampered()
    if _type(x) is not _Tensor:
        raise AssertionError(f"expected a torch.Tensor, got {_type(x).__name__}")
    return torch.Tensor.clone(_cpu(_detach(x)))


def assert_close(actual: object, expected: object, *, atol: float = 1e-6, rtol: float = 1e-5, msg: str = "") -> None:
    """Assert ``|actual - expected| <= atol + rtol |expected|`` elementwise, same shape, no NaN."""
    _check("assert_close", "close", actual, expected, atol, rtol, msg)


def assert_not_close(actual: object, other: object, *, atol: float = 1e-6, rtol: float = 1e-5, msg: str = "") -> None:
    """Assert that ``actual`` is NOT elementwise close to ``other`` (same shape required)."""
    _check("assert_not_close", "not_close", actual, other, atol, rtol, msg)


def assert_equal(actual: object, expected: object, msg: str = "") -> None:
    """Assert exact equality of shape and every value."""
    _check("assert_equal", "equal", actual, expected, 0.0, 0.0, msg)


def assert_le(value: object, bound: float, msg: str = "") -> None:
    """Assert that a number (or a 1-element tensor) is finite and ``<= bound``."""
    _check("assert_le", "le", value, bound, 0.0, 0.0, msg)


def assert_true(condition: object, msg: str = "") -> None:
    """Assert a condition that must be a genuine ``bool`` (or ``numpy.bool_``) and True."""
    verify_untampered()
    if _type(condition) not in (_bool, numpy.bool_):
        raise AssertionError(f"condition must be a bool, got {_type(condition).__name__}")
    _check("assert_true", "true", _float(_bool(condition)), 1.0, 0.0, 0.0, msg)


def assert_shape(x: object, shape: tuple[int, ...], msg: str = "") -> None:
    """Assert that ``x`` is an exact ``torch.Tensor`` of shape ``shape``."""
    t = trusted(x)
    got = numpy.array([_int(d) for d in _size(t)], dtype=numpy.int64)
    want = numpy.array([_int(d) for d in shape], dtype=numpy.int64)
    _check("assert_shape", "shape", got, want, 0.0, 0.0, msg)


def randomised(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter of ``module`` i.i.d. ``N(0, scale^2)`` values (seeded) and return it in float64.

    Fresh couplings start at the identity; tests randomise them so that a wrong layer cannot pass.
    """
    verify_untampered()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator))
    return module.double()


def _as_array(x: object) -> numpy.ndarray:
    if _type(x) is _Tensor:
        return _ascontiguous(_to_numpy(_cpu(_detach(x))))
    if _type(x) is _ndarray:
        return _ascontiguous(x)
    if _type(x) in (_int, _float, _bool):
        return numpy.array(x, dtype=numpy.float64)
    raise AssertionError(f"tests compare plain tensors, arrays or numbers, got {_type(x).__name__}")


def _call_site() -> int:
    """The line, in the test cell, of the code that called the public check (first frame outside this file)."""
    frame = _getframe(1)
    while frame is not None and frame.f_code.co_filename == _THIS_FILE:
        frame = frame.f_back
    return frame.f_lineno if frame is not None else 0


def _check(api: str, op: str, a: object, b: object, atol: float, rtol: float, msg: str) -> None:
    """Send one check to the checker: ``[op, tolerances, array a, array b, api, line]``; raise unless ok."""
    verify_untampered()
    arrays = [_as_array(a), _as_array(b)]
    payload = [op.encode(), _pack("<dd", _float(atol), _float(rtol))]
    for arr in arrays:
        payload += [arr.dtype.str.encode(), _pack(f"<{_len(arr.shape) + 1}q", _len(arr.shape), *arr.shape),
                    arr.tobytes()]
    payload += [api.encode(), _pack("<q", _call_site())]
    verdict = _ask_checker(payload)
    if verdict != b"ok":
        raise AssertionError(f"{msg}: {verdict.decode()}" if msg else verdict.decode())


def _ask_checker(parts: list[bytes]) -> bytes:
    """Send length-prefixed parts to the clean checker; return its one-message verdict.

    The grader's checker (``DGM_CHECKER_SOCKET``, set by ``dgm grade``) when there is one, else a
    child process of this kernel.
    """
    global _checker_process, _connection
    message = _pack("<q", _len(parts)) + b"".join(_pack("<q", _len(p)) + p for p in parts)
    if _SOCKET_PATH:
        try:
            if _connection is None:
                _connection = _socket_type(_AF_UNIX, _SOCK_STREAM)
                _connection.connect(_SOCKET_PATH)
            _connection.sendall(message)
            (size,) = _unpack("<q", _receive(_connection, 8))
            return _receive(_connection, size)
        except BaseException as err:  # an interrupt mid-message too: never reuse a half-used connection
            if _connection is not None:
                _connection.close()
            _connection = None
            if isinstance(err, OSError):
                raise AssertionError(f"the grader's checker cannot be reached ({err})") from None
            raise
    if _checker_process is None or _checker_process.poll() is not None:
        # Run by path, not with -m: importing this package would import torch (and take seconds).
        _checker_process = _Popen([sys.executable, "-I", _CHECKER_SCRIPT], stdin=_PIPE, stdout=_PIPE)
    try:
        _checker_process.stdin.write(message)
        _checker_process.stdin.flush()
        (size,) = _unpack("<q", _checker_process.stdout.read(8))
        return _checker_process.stdout.read(size)
    except BaseException:  # an interrupt mid-message: start a fresh checker for the next check
        _checker_process.kill()
        _checker_process = None
        raise


def _receive(connection: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 20))
        if not chunk:
            raise OSError("the checker closed the connection")
        chunks.append(chunk)
        left -= _len(chunk)
    return b"".join(chunks)


def _close_checker() -> None:
    if _checker_process is not None and _checker_process.poll() is None:
        _checker_process.stdin.close()  # the checker exits at end of input
        _checker_process.wait(timeout=5)
        _checker_process.stdout.close()


atexit.register(_close_checker)
_OWN_GLOBALS = {name: obj for name, obj in globals().items()
                if not name.startswith("__") and name not in ("_checker_process", "_connection")}
