"""The judge's wire format: tensors, numbers, strings and containers, with no pickle and no code.

Both ends of a probe (``dgmlib.grading.probing`` in the student's kernel, ``dgmlib.grading.judge`` in
the grader) exchange messages framed as ``<u64 length><u32 header length><JSON header><raw bytes>``.
The JSON header holds the structure; every tensor in it is ``{"$t": [offset, nbytes], "dtype": "<f8",
"shape": [...]}`` and points into the raw bytes that follow. Other values are JSON's own: ``None``,
``bool``, ``int``, ``float`` (``NaN`` and infinities included), ``str``, lists, and dicts with string
keys; ``{"$tuple": [...]}`` is a tuple and ``{"$h": n}`` a *handle*, the number of an object that
stays in the kernel (a module, say) and that the judge can call again.

Decoding builds only these values: a malicious kernel can send wrong data, never code. A message
is refused (``WireError``) past ``MAX_MESSAGE`` bytes, past ``MAX_DEPTH`` levels of nesting, or with a
tensor whose dtype, shape or byte range is not consistent. Source: the course's issue 26; the
design is ours.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["WireError", "Handle", "encode", "decode", "send", "receive", "MAX_MESSAGE"]

MAX_MESSAGE = 1 << 27
"""The largest message either side accepts: 128 MiB (a trained model's state dict is far smaller)."""

MAX_DEPTH = 32
_DTYPES = {np.dtype(t).str: t for t in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                                        "float64", "complex64", "complex128")}


class WireError(ValueError):
    """A message that is not a well-formed value of the wire format."""


class Handle:
    """An object that stays in the kernel, named by its number (``{"$h": n}`` on the wire)."""

    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        self.number = int(number)

    def __repr__(self) -> str:
        return f"Handle({self.number})"


def encode(value: Any, to_handle: Callable[[Any], int] | None = None) -> bytes:
    """Serialise ``value`` (tensors, numbers, strings, lists, tuples, dicts, ``Handle``) into one message body.

    Args:
        value: what to send. Tensors are detached, moved to the CPU and made contiguous; numpy arrays
            and numpy scalars are accepted; ``bfloat16`` is sent as ``float32``.
        to_handle: called with any other object, it returns the handle number to send in its place
            (the kernel's side). Without it such an object raises ``WireError`` (the judge's side).

    Returns:
        the body (without the 8-byte length that ``send`` adds).

    Raises:
        WireError: for an object that cannot be sent, nesting deeper than ``MAX_DEPTH``, or a body
            over ``MAX_MESSAGE`` bytes.
    """
    blobs: list[bytes] = []
    size = [0]

    def tensor(array: np.ndarray) -> dict:
        raw = np.ascontiguousarray(array).tobytes()
        entry = {"$t": [size[0], len(raw)], "dtype": array.dtype.str, "shape": list(array.shape)}
        blobs.append(raw)
        size[0] += len(raw)
        if size[0] > MAX_MESSAGE:
            raise WireError(f"a message holds at most {MAX_MESSAGE} bytes")
        return entry

    def walk(obj: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"values nest at most {MAX_DEPTH} levels deep")
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu")
            if t.dtype == torch.bfloat16:
                t = t.float()
            return tensor(t.contiguous().numpy() if not t.is_conj() else t.resolve_conj().numpy())
        if isinstance(obj, np.ndarray):
            if obj.dtype.str not in _DTYPES:
                raise WireError(f"arrays of dtype {obj.dtype} cannot be sent")
            return tensor(obj)
        if isinstance(obj, np.generic):
            return walk(obj.item(), depth)
        if isinstance(obj, Handle):
            return {"$h": obj.number}
        if isinstance(obj, tuple):
            return {"$tuple": [walk(v, depth + 1) for v in obj]}
        if isinstance(obj, list):
            return [walk(v, depth + 1) for v in obj]
        if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
            return {str(k): walk(v, depth + 1) for k, v in obj.items()}
        if to_handle is None:
            raise WireError(f"a {type(obj).__name__} cannot be sent")
        return {"$h": to_handle(obj)}

    header = json.dumps(walk(value, 0), allow_nan=True).encode()
    body = struct.pack("<I", len(header)) + header + b"".join(blobs)
    if len(body) > MAX_MESSAGE:
        raise WireError(f"a message holds at most {MAX_MESSAGE} bytes")
    return body


def decode(body: bytes) -> Any:
    """The value of one message body: tensors come back as new ``torch.Tensor`` objects (CPU), handles as
    ``Handle``.

    Raises:
        WireError: if the body is not well formed (see the module's docstring).
    """
    if len(body) < 4:
        raise WireError("a message is shorter than its header")
    (n,) = struct.unpack("<I", body[:4])
    if n > len(body) - 4:
        raise WireError("the header runs past the message")
    try:
        tree = json.loads(body[4:4 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"the header is not JSON ({err})") from None
    raw = memoryview(body)[4 + n:]

    def walk(obj: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"values nest at most {MAX_DEPTH} levels deep")
        if isinstance(obj, list):
            return [walk(v, depth + 1) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if "$t" in obj:
            return tensor(obj)
        if "$h" in obj:
            if type(obj["$h"]) is not int:
                raise WireError("a handle is an integer")
            return Handle(obj["$h"])
        if "$tuple" in obj:
            if not isinstance(obj["$tuple"], list):
                raise WireError("a tuple holds a list")
            return tuple(walk(v, depth + 1) for v in obj["$tuple"])
        return {k: walk(v, depth + 1) for k, v in obj.items()}

    def tensor(entry: dict) -> torch.Tensor:
        try:
            (start, nbytes), dtype, shape = entry["$t"], np.dtype(_DTYPES[entry["dtype"]]), entry["shape"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as err:
            raise WireError(f"a malformed tensor entry ({err!r})") from None
        if any(d < 0 for d in shape) or not (0 <= start and start + nbytes <= len(raw)):
            raise WireError("a tensor's bytes lie outside the message")
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise WireError(f"a tensor of shape {shape} and dtype {dtype} cannot hold {nbytes} bytes")
        array = np.frombuffer(raw[start:start + nbytes], dtype=dtype).reshape(shape).copy()
        return torch.from_numpy(array)

    return walk(tree, 0)


def send(sock: socket.socket, body: bytes) -> None:
    """Write one framed message (``<u64 length>`` then ``body``)."""
    sock.sendall(struct.pack("<Q", len(body)) + body)


def receive(sock: socket.socket) -> bytes:
    """Read one framed message body.

    Raises:
        EOFError: if the other side closed the connection. WireError: if the message is too large.
    """
    (size,) = struct.unpack("<Q", _exactly(sock, 8))
    if size > MAX_MESSAGE + 8:
        raise WireError(f"a message holds at most {MAX_MESSAGE} bytes")
    return _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
