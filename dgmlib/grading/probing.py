"""The student's side of a judged test cell: expose the student's code to the grader's judge.

A judged test cell ends with ``grading.probe("test_round_trip", coupling=AffineCoupling)``. Outside
``dgm grade`` (a student running the notebook, ``nbgrader validate``) it does nothing: the cell's
visible checks are the student's own feedback. Under ``dgm grade`` it connects to the judge in the
grader (``DGM_JUDGE_SOCKET``) and serves the judge's requests until the judge is done. Each request
calls one exposed object, or an object an earlier call returned (a *handle*), on inputs the judge
drew from a secret seed:

- ``{"op": "call", "target": "coupling" | {"$h": n}, "method": None | "inverse", "args": [...], "kwargs": {...}}``
- ``{"op": "get", "target": ..., "attr": "mask"}``

where an argument may also name an exposed object (``{"$exposed": "model"}``) or a handle (``{"$h": n}``)

and gets back ``{"ok": true, "value": ...}``, or ``{"ok": false, "error": "TypeError: ..."}`` when the
student's code raised. Results that are not data (a module, say) stay here and are sent as handles.

Nothing here decides a score. The judge computes every expected value in the grader, where no
student code runs, and compares; whatever this kernel sends only earns points if it equals what the
reference computes on the same secret inputs (``dgmlib.grading.judge``). So this module needs no
protection from the student's code: replacing it can only withhold or change the student's own
answers. Source: the course's issue 26; the design is ours.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from dgmlib.grading import wire

__all__ = ["probe", "serve"]


def probe(name: str, **exposed: Any) -> None:
    """Let the grader's judge ``name`` call ``exposed`` objects on inputs of its own; a no-op outside ``dgm grade``.

    Args:
        name: the test cell's ``grade_id``: the judge of that name, in ``solutions/ASSIGNMENT/judge.py``,
            decides the cell's points.
        exposed: the objects the judge may call, by name (functions, classes, trained models).

    Raises:
        TypeError: if ``name`` is not a string. Never raises for the judge's verdict: the grader writes
        it into the graded notebook itself.
    """
    if not isinstance(name, str):
        raise TypeError(f"probe name must be a str, got {type(name).__name__}")
    path = os.environ.get("DGM_JUDGE_SOCKET", "")
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return  # no judge listening: the grader scores the cell 0 and says so
        serve(sock, name, exposed)


def serve(sock: socket.socket, name: str, exposed: dict[str, Any]) -> None:
    """Announce the probe ``name`` on a connected socket, then answer the judge's requests until it is done."""
    handles: dict[int, Any] = {}

    def to_handle(obj: Any) -> int:
        number = len(handles) + 1
        handles[number] = obj
        return number

    wire.send(sock, wire.encode({"op": "probe", "name": name, "exposed": sorted(exposed)}))
    while True:
        try:
            request = wire.decode(wire.receive(sock))
        except (EOFError, OSError, wire.WireError):
            return
        if not isinstance(request, dict) or request.get("op") == "done":
            return
        try:
            body = wire.encode({"ok": True, "value": _serve(request, exposed, handles)}, to_handle)
        except Exception as err:  # noqa: BLE001 - the student's code raised: the judge decides what it means
            body = wire.encode({"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]})
        wire.send(sock, body)


def _serve(request: dict, exposed: dict[str, Any], handles: dict[int, Any]) -> Any:
    """Carry out one request of the judge (see the module's docstring)."""
    def resolve(value: Any) -> Any:
        if isinstance(value, wire.Handle):
            if value.number not in handles:
                raise KeyError(f"no object with handle {value.number}")
            return handles[value.number]
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, tuple):
            return tuple(resolve(v) for v in value)
        if isinstance(value, dict):
            if set(value) == {"$exposed"}:  # an exposed object passed as an argument (``k.model``)
                return exposed[value["$exposed"]]
            return {k: resolve(v) for k, v in value.items()}
        return value

    target = request.get("target")
    obj = exposed[target] if isinstance(target, str) else resolve(target)
    if request.get("op") == "get":
        return getattr(obj, request["attr"])
    if request.get("op") == "call":
        if request.get("method"):
            obj = getattr(obj, request["method"])
        return obj(*resolve(request.get("args", [])), **resolve(request.get("kwargs", {})))
    raise ValueError(f"unknown request {request.get('op')!r}")
