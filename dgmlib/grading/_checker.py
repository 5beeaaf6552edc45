"""The clean comparison process behind ``dgmlib.grading`` (run as ``python -I path/to/_checker.py``).

It imports numpy only, never runs student code, and answers each request of
``[op, (atol, rtol), dtype_a, shape_a, bytes_a, dtype_b, shape_b, bytes_b, api, line]`` with ``ok`` or
a reason. The same ``verdict`` decides the checks in the grader's process under ``dgm grade``
(``dgmlib.grading.receipts``).
"""

from __future__ import annotations

import struct
import sys

import numpy as np


_MAX_PARTS, _MAX_MESSAGE = 16, 1 << 26  # a request larger than 64 MiB is refused


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def read_request(stream) -> list[bytes]:
    """Read one request of length-prefixed parts from a binary stream.

    Raises:
        EOFError: at the end of the input. ValueError: if the request has too many parts or bytes.
    """
    (count,) = struct.unpack("<q", _read(stream, 8))
    if not 0 < count <= _MAX_PARTS:
        raise ValueError(f"a request has 1 to {_MAX_PARTS} parts, got {count}")
    parts, total = [], 0
    for _ in range(count):
        (size,) = struct.unpack("<q", _read(stream, 8))
        total += size
        if size < 0 or total > _MAX_MESSAGE:
            raise ValueError(f"a request holds at most {_MAX_MESSAGE} bytes")
        parts.append(_read(stream, size))
    return parts


def write_answer(stream, answer: bytes) -> None:
    """Write one length-prefixed answer and flush."""
    stream.write(struct.pack("<q", len(answer)) + answer)
    stream.flush()


_MAX_ELEMENTS = 1 << 24  # 128 MiB in float64: far above what a test compares


def _array(dtype: bytes, shape: bytes, raw: bytes) -> np.ndarray:
    ndim = struct.unpack("<q", shape[:8])[0]
    dims = struct.unpack(f"<{ndim}q", shape[8:]) if ndim else ()
    if len(raw) // max(np.dtype(dtype.decode()).itemsize, 1) > _MAX_ELEMENTS:
        raise ValueError(f"more than {_MAX_ELEMENTS} values to compare")
    return np.frombuffer(raw, dtype=np.dtype(dtype.decode())).reshape(dims).astype(np.float64)


def verdict(parts: list[bytes]) -> str:
    """Compare the two arrays in ``parts`` as ``op`` asks; return ``"ok"`` or why not."""
    op = parts[0].decode()
    atol, rtol = struct.unpack("<dd", parts[1])
    a, b = _array(*parts[2:5]), _array(*parts[5:8])
    if op == "true":
        return "ok" if a.size == 1 and a.item() == 1.0 else "condition is False"
    if op == "shape":
        got, want = tuple(int(d) for d in a.ravel()), tuple(int(d) for d in b.ravel())
        return "ok" if got == want else f"shape {got} != expected {want}"
    if op == "le":
        if a.size != 1 or not np.isfinite(a).all():
            return f"expected one finite number, got shape {a.shape}"
        return "ok" if a.item() <= b.item() else f"{a.item():.6g} is not <= {b.item():.6g}"
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    if np.isnan(a).any() or np.isnan(b).any():
        return "NaN in the values compared"
    if op == "equal":
        bad = int((a != b).sum())
        return "ok" if bad == 0 else f"{bad} of {a.size} values differ"
    close = np.abs(a - b) <= atol + rtol * np.abs(b)
    if op == "close":
        return "ok" if close.all() else (f"{int((~close).sum())} of {a.size} values differ; "
                                         f"largest difference {np.abs(a - b).max():.3g}")
    if op == "not_close":
        return "ok" if not close.all() else "values are unexpectedly close (nothing was transformed)"
    return f"unknown comparison {op!r}"


def main() -> None:
    """Serve requests on stdin/stdout until stdin closes."""
    while True:
        try:
            parts = read_request(sys.stdin.buffer)
        except (EOFError, ValueError):
            return
        try:
            answer = verdict(parts).encode()
        except Exception as err:  # noqa: BLE001 - any malformed request is a failed check
            answer = f"malformed check: {err}".encode()
        write_answer(sys.stdout.buffer, answer)


if __name__ == "__main__":
    main()
