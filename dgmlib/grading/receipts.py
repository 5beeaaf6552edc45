"""Receipts: test-cell verdicts that nothing in the student's kernel can forge; and where the judge plugs in.

``ReceiptExecute`` (below) scores the test cells of a *judged* assignment by its judge alone
(``dgmlib.grading.judge``: expected values computed in the grader on secret inputs). The receipts
described here score the test cells of assignments that have no judge yet.

A submission's code runs in the same kernel as the tests. Whatever the kernel reports can be
forged from there: the shell can swallow exceptions (``set_custom_exc``), ``sys.modules`` can hand
the test cells a stand-in ``dgmlib.grading`` whose checks do nothing, the channel to the checker
can be replaced, and the cell's outputs can be rewritten. So under ``dgm grade`` the score of a test
cell rests on what the grader itself saw:

1. **The checker lives in the grader.** ``dgm grade`` runs ``nbgrader autograde`` through this
   module, which swaps nbgrader's ``Execute`` preprocessor for ``ReceiptExecute``. Before the kernel
   starts, ``ReceiptExecute`` opens a ``CheckerServer``: a Unix socket in a private folder of the
   submission that the sandbox mounts read-only (so the kernel cannot move the socket and relay the
   checks through one of its own), served by threads of the grader's own ``nbgrader`` process,
   outside the sandbox, one connection at a time. The kernel
   learns its path from ``DGM_CHECKER_SOCKET``; every ``dgmlib.grading.assert_*`` sends its arrays
   there and the verdict is computed by ``_checker.verdict`` in the grader.
2. **Each check leaves a receipt** in the grader's memory: which check (``assert_close``), the line
   of the test cell that made it, and the verdict. The kernel can only ask for checks; it cannot
   write, change or delete receipts, so no secret or MAC is needed: the receipts never leave the
   grader.
3. **A test cell earns its points only with a receipt for every check written in it.** After each
   autograded test cell has run, ``verify_cell`` reads the cell's source (restored from the
   gradebook by nbgrader, so the student cannot edit it) and finds every call of a ``grading.assert_*``
   function (``call_sites``). It requires, among the receipts made while that cell ran:

   - a passing receipt of the right check at each call site;
   - the first receipts of the call sites written at the cell's top level in the order of the source
     (call sites inside a function defined in the cell only need to be present);
   - no failing receipt at all.

   Otherwise an ``UnverifiedCheck`` error is put first among the cell's outputs, which is how
   nbgrader's ``SaveAutoGrades`` scores a test cell 0; nothing the kernel printed before it counts.
   A passing cell is then scored by nbgrader as usual (an error or ``stderr`` output still gives 0).

What this stops: a hidden exception (its check left a failing receipt, or none), a stand-in grading
module (no receipts), a forged channel or checker socket (no receipts reach the grader), a relay in
place of the socket (its folder is read-only), rewritten outputs. What it does not stop: code that
sends chosen, passing values to the genuine checker from the right line, or that rewrites the test
cells as IPython compiles them. That needs code that reaches into ``dgmlib.grading``'s internals,
``exec``, ``get_ipython``, the kernel's frames or ``sys.modules``, which the static review
(``dgmlib.grading.review``) flags, by name or by alias.

Run as ``python PATH/TO/dgmlib/grading/receipts.py autograde ASSIGNMENT --student ID ...`` (by path, so
that the grader does not import torch with ``dgmlib.grading``); the arguments are nbgrader's.
Source: the course's issue 12; the design is ours.
"""

from __future__ import annotations

import ast
import json
import os
import socketserver
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import Execute

if __package__:  # imported as dgmlib.grading.receipts
    from dgmlib.grading._checker import read_request, verdict, write_answer
else:  # run by path (``dgm grade``): importing the dgmlib.grading package would import torch, seconds per student
    from _checker import read_request, verdict, write_answer

__all__ = ["Receipt", "CallSite", "CheckerServer", "call_sites", "verify_cell", "ReceiptExecute", "CHECKS", "main"]

CHECKS = ("assert_close", "assert_not_close", "assert_equal", "assert_le", "assert_true", "assert_shape")
"""The checks of ``dgmlib.grading`` that leave receipts."""

_MAX_RECEIPTS = 1_000_000  # a kernel flooding the checker cannot exhaust the grader's memory


@dataclass(frozen=True)
class Receipt:
    """One check the grader's checker decided: the check's name, its line in the cell, the verdict."""

    api: str
    line: int
    passed: bool
    message: str


@dataclass(frozen=True)
class CallSite:
    """A call of a ``grading.assert_*`` function written in a test cell (lines 1-based, inclusive)."""

    api: str
    first_line: int
    last_line: int
    top_level: bool


class _Handler(socketserver.StreamRequestHandler):
    """Serve one kernel connection: read requests until it closes, answer each with a verdict."""

    def handle(self) -> None:
        server: CheckerServer = self.server.owner  # type: ignore[attr-defined]
        # One connection at a time (a kernel that reconnects waits for its old one to close): a kernel
        # cannot open many and make the grader hold many large requests at once.
        if not server.one_at_a_time.acquire(timeout=10):
            return
        try:
            while True:
                write_answer(self.wfile, server.decide(read_request(self.rfile)))
        except (EOFError, ValueError, OSError, struct.error):
            return  # the kernel closed the connection, or sent what is not a request
        finally:
            server.one_at_a_time.release()


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # closing the server never waits for a kernel that keeps its connection open


class CheckerServer:
    """The grader's checker on a Unix socket at ``path``, keeping a receipt of every check.

    Requests are ``[op, tolerances, array a, array b, api, line]`` as sent by
    ``dgmlib.grading._check``; the verdict is ``_checker.verdict``'s.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.receipts: list[Receipt] = []
        self._lock = threading.Lock()
        self.one_at_a_time = threading.Semaphore(1)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._server = _UnixServer(self.path, _Handler)
        self._server.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dgm-checker", daemon=True)
        self._thread.start()

    def decide(self, parts: list[bytes]) -> bytes:
        """Decide one request and keep its receipt; return ``ok`` or the reason it failed."""
        try:
            answer = verdict(parts[:8])
            api = parts[8].decode() if len(parts) > 8 else "?"
            (line,) = struct.unpack("<q", parts[9]) if len(parts) > 9 else (0,)
        except Exception as err:  # noqa: BLE001 - any malformed request is a failed check
            answer, api, line = f"malformed check: {err}", "?", 0
        with self._lock:
            if len(self.receipts) < _MAX_RECEIPTS:
                self.receipts.append(Receipt(api if api in CHECKS else "?", int(line), answer == "ok", answer))
        return answer.encode()

    def mark(self) -> int:
        """How many receipts there are now: pass it to ``since`` after a cell has run."""
        with self._lock:
            return len(self.receipts)

    def since(self, mark: int) -> list[Receipt]:
        """The receipts made after ``mark``."""
        with self._lock:
            return self.receipts[mark:]

    def close(self) -> None:
        """Stop serving and remove the socket."""
        self._server.shutdown()
        self._server.server_close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _as_executed(source: str) -> str:
    """The cell's source as IPython compiles it (magics rewritten, leading blank lines dropped)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def call_sites(source: str) -> list[CallSite]:
    """Every call of a ``dgmlib.grading`` check in a test cell's ``source``, in source order.

    A call counts whatever it is called through (``grading.assert_close(...)``,
    ``assert_close(...)`` after ``from dgmlib.grading import assert_close``). Line numbers are those
    of the code that the kernel runs.

    Raises:
        SyntaxError: if the cell does not parse.
    """
    tree = ast.parse(_as_executed(source))
    sites: list[CallSite] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if name in CHECKS:
                    sites.append(CallSite(name, child.lineno, child.end_lineno or child.lineno, top_level))
            visit(child, nested)

    visit(tree, True)
    return sorted(sites, key=lambda s: (s.first_line, s.last_line))


def verify_cell(source: str, receipts: list[Receipt]) -> str | None:
    """Check the receipts made while a test cell ran against the checks written in it.

    Returns:
        None if every call site has a passing receipt (top-level ones first seen in source order) and
        no receipt failed; otherwise the reason, e.g. ``"line 4: no receipt for assert_close"``.
    """
    try:
        sites = call_sites(source)
    except SyntaxError as err:
        return f"the test cell does not parse ({err.msg})"
    if not sites:
        return "the test cell makes no dgmlib.grading check, so nothing can vouch for it"
    for receipt in receipts:
        if not receipt.passed:
            return f"line {receipt.line}: {receipt.api} failed: {receipt.message}"
    previous, used = -1, set()
    for site in sites:  # each call site takes its own receipt: two checks on one line need two receipts
        first = next((i for i, r in enumerate(receipts)
                      if i not in used and r.api == site.api and site.first_line <= r.line <= site.last_line), None)
        used.add(first)
        if first is None:
            return f"line {site.first_line}: no receipt for {site.api} from the grader's checker"
        if site.top_level:
            if first < previous:
                return f"line {site.first_line}: {site.api} ran out of order"
            previous = first
    return None


class ReceiptExecute(Execute):
    """nbgrader's ``Execute`` with the judge and the checker in the grader, and every test cell scored by them.

    Configured like ``Execute`` (``--Execute.timeout``, ``--Execute.kernel_name``).

    - **Judged cells.** When the assignment has a judge file (``solutions/ASSIGNMENT/judge.py`` under
      ``DGM_COURSE_ROOT``, else the working folder), a ``JudgeServer`` serves the probes on a socket beside
      the checker's (``DGM_JUDGE_SOCKET``) with a secret seed drawn for this submission, and a test cell
      that has a judge scores only if that judge passed while the cell ran (``dgmlib.grading.judge``).
    - **Other test cells** (assignments not yet judged) score with the receipts of their checks, as above.
    - **The kernel's working folder** is ``DGM_KERNEL_CWD`` when set (a throw-away folder that the grader
      never reads), not the folder nbgrader writes the graded notebook to.
    - **Outputs of every kind** (streams, displays, results, errors) are capped at ``DGM_OUTPUT_CAP_KB``
      (default 2048 KiB) for the whole notebook as they arrive; past it, one notice replaces the rest.
    """

    def preprocess(self, nb: NotebookNode, resources: dict, km=None) -> tuple[NotebookNode, dict]:  # noqa: D102
        path = os.environ.get("DGM_CHECKER_SOCKET") or str(Path(tempfile.mkdtemp(prefix="dgm-checker-")) / "checker")
        os.environ["DGM_CHECKER_SOCKET"] = path  # the kernel inherits it
        self.checker = CheckerServer(path)
        self.judge = None
        self._output_budget = int(os.environ.get("DGM_OUTPUT_CAP_KB", "2048")) * 1024
        self._output_cut = False
        assignment = (resources or {}).get("nbgrader", {}).get("assignment")
        course = Path(os.environ.get("DGM_COURSE_ROOT") or os.getcwd())
        judge_file = course / "solutions" / str(assignment) / "judge.py"
        if assignment and judge_file.is_file():
            import secrets

            from dgmlib.grading.judge import JudgeServer, load_judges  # torch: only for judged assignments

            judge_path = str(Path(path).with_name("judge"))
            os.environ["DGM_JUDGE_SOCKET"] = judge_path
            self.judge = JudgeServer(judge_path, load_judges(judge_file), secrets.randbits(62),
                                     timeout=float(self.timeout or 300))
        cwd = os.environ.get("DGM_KERNEL_CWD")
        if cwd:
            resources = dict(resources or {})
            resources["metadata"] = {**resources.get("metadata", {}), "path": cwd}
        try:
            return super().preprocess(nb, resources, km)
        finally:
            self.checker.close()
            if self.judge is not None:
                self.judge.close()

    def output(self, outs, msg, display_id, cell_index):  # noqa: D102 - nbclient's hook for every output
        size = len(json.dumps(msg.get("content", {}), default=str))
        if self._output_budget - size < 0:
            if not self._output_cut:
                self._output_cut = True
                outs.append(NotebookNode(output_type="stream", name="stdout",
                                         text="\n[outputs cut by the grader: the notebook's output limit was reached]\n"))
            return None
        self._output_budget -= size
        return super().output(outs, msg, display_id, cell_index)

    def preprocess_cell(self, cell: NotebookNode, resources: dict, index: int) -> tuple[NotebookNode, dict]:  # noqa: D102
        meta = cell.get("metadata", {}).get("nbgrader", {})
        is_test = cell.cell_type == "code" and meta.get("grade", False) and not meta.get("solution", False)
        grade_id = meta.get("grade_id")
        judged = is_test and self.judge is not None and grade_id in self.judge.judges
        mark = self.checker.mark()
        if judged:
            self.judge.begin_cell(grade_id)
        try:
            cell, resources = super().preprocess_cell(cell, resources, index)
        finally:
            if judged:
                self.judge.end_cell()
        if judged:
            verdict = self.judge.verdict(grade_id)
            if not verdict.passed:
                self.log.warning("test cell %s scores 0: the judge: %s", grade_id, verdict.message)
                cell.outputs.insert(0, NotebookNode(
                    output_type="error", ename="JudgeFailed", evalue=verdict.message,
                    traceback=[f"JudgeFailed: {verdict.message} (dgm grade scores this cell by the grader's "
                               "judge, on inputs of its own)"]))
        elif is_test:
            reason = verify_cell(cell.source, self.checker.since(mark))
            if reason is not None:
                self.log.warning("test cell %s scores 0: %s", grade_id, reason)
                cell.outputs.insert(0, NotebookNode(
                    output_type="error", ename="UnverifiedCheck", evalue=reason,
                    traceback=[f"UnverifiedCheck: {reason} (dgm grade scores a test cell by the receipts of "
                               "its checks in the grader, not by what the kernel reports)"]))
        return cell, resources


def main(argv: list[str] | None = None) -> None:
    """``nbgrader`` with ``ReceiptExecute`` in place of ``Execute`` in the autograde step."""
    from nbgrader.apps.nbgraderapp import NbGraderApp
    from nbgrader.converters import Autograde
    from traitlets.config import Config

    default = Autograde.class_traits()["autograde_preprocessors"].make_dynamic_default()
    config = Config()
    config.Autograde.autograde_preprocessors = [ReceiptExecute if p is Execute else p for p in default]
    NbGraderApp.launch_instance(argv=list(sys.argv[1:] if argv is None else argv), config=config)


if __name__ == "__main__":
    main()
