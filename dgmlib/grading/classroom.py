"""Grade every submission of an assignment: ``dgm grade ASSIGNMENT``.

Each student is graded by their own ``nbgrader autograde ASSIGNMENT --student ID`` process, up to
``jobs`` at a time, with the notebook executed in the sandboxed kernel (``dgmlib.grading.sandbox``)
and private runtime folders, so one failure or attack never stops or changes another student's
grading. A submission that outlives its wall-clock limit has its whole process group killed.
At the end ``nbgrader export`` writes the CSV, and a report lists, per student, the score and any
cell that timed out, crashed or was flagged (assignments to attributes of imported modules and
similar tampering found by reading the submitted code).
"""

from __future__ import annotations

import ast
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dgmlib.grading import sandbox

_SUSPICIOUS_NAMES = {"__builtins__", "__import__", "builtins", "sys.modules", "ctypes", "gc.get_referrers",
                     "gc.get_objects", "sys._getframe", "inspect.currentframe", "exec", "eval", "compile"}
_SUSPICIOUS_ATTRS = {"__code__", "__closure__", "__globals__", "__dict__", "__class__", "__torch_function__"}


@dataclass
class StudentResult:
    """One student's outcome: score, and what went wrong or looked suspicious."""

    student: str
    score: float = 0.0
    max_score: float = 0.0
    seconds: float = 0.0
    timed_out: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    failure: str = ""


def flag_tampering(notebook_path: Path) -> list[str]:
    """Read the student's code cells (solution cells and cells they added) and list tampering.

    Flags: assigning to or deleting an attribute of an imported module (``torch.allclose = ...``),
    ``setattr``/``delattr``/``vars`` on one, running code from strings (``exec``, ``eval``,
    ``compile``), and reaching for interpreter internals (``builtins``, ``sys.modules``, ``__code__``,
    ``__torch_function__``, ...). Cells that do not parse are flagged too.

    Returns:
        human-readable flags such as ``"cell coupling: assigns torch.allclose"``.
    """
    nb = json.loads(Path(notebook_path).read_text())
    cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    modules: set[str] = set()
    parsed = []
    for i, cell in enumerate(cells):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        source = "".join(cell.get("source", ""))
        source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
        name = meta.get("grade_id", f"#{i + 1} (added by the student)")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            tree = None
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.Import):
                modules.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                modules.update(a.asname or a.name for a in node.names)
        student_code = meta.get("solution", False) or not meta
        parsed.append((name, tree, student_code))
    flags: list[str] = []
    for name, tree, student_code in parsed:
        if not student_code:
            continue
        if tree is None:
            flags.append(f"cell {name}: does not parse")
            continue
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                for t in ast.walk(target) if isinstance(target, (ast.Tuple, ast.List)) else [target]:
                    if isinstance(t, ast.Attribute) and _root_name(t) in modules:
                        flags.append(f"cell {name}: assigns {ast.unparse(t)}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
                if node.args and _root_name(node.args[0]) not in ("self", "cls"):
                    flags.append(f"cell {name}: {node.func.id} on {ast.unparse(node.args[0])}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "vars" and node.args:
                if _root_name(node.args[0]) in modules:
                    flags.append(f"cell {name}: vars() of module {ast.unparse(node.args[0])}")
            if isinstance(node, (ast.Name, ast.Attribute)):
                text = ast.unparse(node)
                if text in _SUSPICIOUS_NAMES or (isinstance(node, ast.Attribute) and node.attr in _SUSPICIOUS_ATTRS):
                    flags.append(f"cell {name}: uses {text}")
    return sorted(set(flags))


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def grade_assignment(assignment: str, course: Path = Path("."), jobs: int | None = None,
                     cell_timeout: int = 300, submission_timeout: int | None = None,
                     memory_mb: int = sandbox.DEFAULT_MEMORY_MB, output_kb: int = sandbox.DEFAULT_OUTPUT_KB,
                     fast: bool = True, use_sandbox: bool = True, zero_flagged: bool = True) -> list[StudentResult]:
    """Autograde every ``submitted/*/ASSIGNMENT`` in ``course``; export ``grades.csv``; write the report.

    Args:
        assignment: the assignment name (a folder of ``solutions/``).
        course: the nbgrader course root (holding ``nbgrader_config.py``).
        jobs: parallel graders (default: the number of cores).
        cell_timeout: nbgrader's per-cell timeout in seconds.
        submission_timeout: wall-clock limit for one whole submission (default: 4 x cell_timeout + 120).
        memory_mb, output_kb: the kernel's memory limit and output budget per stream.
        fast: grade with ``DGM_FAST=1`` (the thresholds of the tests assume it).
        use_sandbox: run kernels in bubblewrap (off only for debugging).
        zero_flagged: give every autograded cell of a flagged submission a manual score of 0 with a
            comment naming the flags (nbgrader's own override; review and clear it in formgrader).

    Returns:
        one ``StudentResult`` per student, sorted by student id. The report is written to
        ``reports/ASSIGNMENT.json`` and ``reports/ASSIGNMENT.txt`` under ``course``.

    Raises:
        FileNotFoundError: if the course, assignment or submissions are missing.
        RuntimeError: if nbgrader cannot generate the assignment (its log is named).
    """
    course = Path(course).resolve()
    if not (course / "nbgrader_config.py").exists():
        raise FileNotFoundError(f"{course} is not an nbgrader course (no nbgrader_config.py)")
    if not (course / "solutions" / assignment).is_dir():
        raise FileNotFoundError(f"no source assignment solutions/{assignment} in {course}")
    students = sorted(p.parent.name for p in (course / "submitted").glob(f"*/{assignment}") if p.is_dir())
    if not students:
        raise FileNotFoundError(f"no submissions found in {course}/submitted/*/{assignment}")
    if use_sandbox and sandbox.bwrap_path() is None:
        warnings.warn("bubblewrap (bwrap) is not installed: submissions will run WITHOUT a sandbox and can "
                      "change or delete any file you can, the gradebook included. Grade on Linux with "
                      "bubblewrap (apt-get install bubblewrap) or on JupyterHub.", sandbox.UnsandboxedWarning,
                      stacklevel=2)
    jobs = jobs or os.cpu_count() or 1
    submission_timeout = submission_timeout or 4 * cell_timeout + 120
    work = Path(tempfile.mkdtemp(prefix="dgm-grade-"))
    sandbox.write_kernelspec(work)
    if _run_nbgrader(["generate_assignment", assignment, "--force"], course, work / "generate.log", None, 600) != 0:
        raise RuntimeError(f"nbgrader generate_assignment {assignment} failed; see {work / 'generate.log'}")

    def grade_one(student: str) -> StudentResult:
        private = work / student
        (private / "runtime").mkdir(parents=True)
        (private / "sockets").mkdir()
        env = {
            "JUPYTER_PATH": os.pathsep.join(filter(None, [str(work), os.environ.get("JUPYTER_PATH")])),
            "JUPYTER_RUNTIME_DIR": str(private / "runtime"),
            "DGM_COURSE_ROOT": str(course),
            "DGM_FAST": "1" if fast else "0",
            "DGM_SANDBOX_MEMORY_MB": str(memory_mb),
            "DGM_SANDBOX_OUTPUT_KB": str(output_kb),
            "DGM_SANDBOX_CPU_SECONDS": str(submission_timeout * 2),
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs)),  # no oversubscription
        }
        args = ["autograde", assignment, "--student", student, "--force", f"--Execute.timeout={cell_timeout}",
                "--KernelManager.transport=ipc", f"--KernelManager.ip={private / 'sockets' / 'kernel'}"]
        if use_sandbox:
            args.append(f"--Execute.kernel_name={sandbox.KERNEL_NAME}")
        start = time.perf_counter()
        result = StudentResult(student)
        code = _run_nbgrader(args, course, private / "autograde.log", env, submission_timeout)
        result.seconds = time.perf_counter() - start
        log = (private / "autograde.log").read_text(errors="replace")
        if code == "timeout":
            result.failure = f"the whole submission ran over {submission_timeout} s and was stopped"
        elif code != 0:
            died = "DeadKernelError" in log or "Kernel died" in log or "kernel died" in log.lower()
            stuck = "Timeout waiting for execute reply" in log
            result.failure = ("the kernel died (killed itself or ran out of memory)" if died else
                              f"a cell ran over the {cell_timeout} s timeout and ignored the interrupt" if stuck else
                              f"nbgrader failed (exit {code}); see {private / 'autograde.log'}")
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(grade_one, students))

    for result in results:
        for nb_path in sorted((course / "submitted" / result.student / assignment).glob("*.ipynb")):
            flags = flag_tampering(nb_path)
            result.flagged += flags
            if flags and zero_flagged:
                _zero_autograded(course, assignment, result.student, nb_path.stem, flags)
            graded = course / "autograded" / result.student / assignment / nb_path.name
            if graded.exists():
                timed_out, crashed = _cell_errors(graded)
                result.timed_out += timed_out
                result.crashed += crashed
    _run_nbgrader(["export", "--to", str(course / "grades.csv")], course, work / "export.log", None, 600)
    scores = _read_scores(course / "grades.csv", assignment)
    for result in results:
        result.score, result.max_score = scores.get(result.student, (0.0, 0.0))
    _write_report(course, assignment, results)
    return results


def _run_nbgrader(args: list[str], course: Path, log: Path, extra_env: dict | None, timeout: float) -> int | str:
    """Run ``python -m nbgrader ARGS`` in its own process group; kill the group on timeout."""
    env = {**os.environ, **(extra_env or {})}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"


def _zero_autograded(course: Path, assignment: str, student: str, notebook: str, flags: list[str]) -> None:
    """Override every autograded cell of one submitted notebook with a manual score of 0, and say why."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        try:
            submission = gb.find_submission_notebook(notebook, assignment, student)
        except MissingEntry:
            return  # never autograded (e.g. the kernel died): nothing was scored
        for grade in submission.grades:
            if grade.auto_score is not None:
                grade.manual_score = 0.0
        for comment in submission.comments:
            comment.manual_comment = "Autograded score set to 0: possible tampering, review before restoring. " + \
                "; ".join(flags)
        gb.db.commit()


def _read_scores(csv_path: Path, assignment: str) -> dict[str, tuple[float, float]]:
    if not csv_path.exists():
        return {}
    with open(csv_path, newline="") as fh:
        return {row["student_id"]: (float(row["score"] or 0), float(row["max_score"] or 0))
                for row in csv.DictReader(fh) if row["assignment"] == assignment}


def _cell_errors(graded_notebook: Path) -> tuple[list[str], list[str]]:
    """Cells of the autograded notebook that timed out, and those that raised (with the exception)."""
    nb = json.loads(graded_notebook.read_text())
    timed_out, crashed = [], []
    for i, cell in enumerate(nb.get("cells", [])):
        name = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", f"#{i + 1}")
        for out in cell.get("outputs", []):
            if out.get("output_type") != "error":
                continue
            if out.get("ename") == "CellTimeoutError":
                timed_out.append(name)
            else:
                crashed.append(f"{name} ({out.get('ename')})")
    return timed_out, crashed


def _write_report(course: Path, assignment: str, results: list[StudentResult]) -> None:
    out = course / "reports"
    out.mkdir(exist_ok=True)
    (out / f"{assignment}.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (out / f"{assignment}.txt").write_text(format_report(assignment, results))


def format_report(assignment: str, results: list[StudentResult]) -> str:
    """A plain-text table: student, score, time, and what timed out, crashed or was flagged."""
    lines = [f"{assignment}: {len(results)} submissions", ""]
    width = max(len(r.student) for r in results)
    for r in results:
        lines.append(f"{r.student:<{width}}  {r.score:5.1f} / {r.max_score:<5.1f} {r.seconds:6.1f} s")
        notes = ([f"FAILED: {r.failure}"] if r.failure else []) + \
            [f"timed out: {', '.join(r.timed_out)}"] * bool(r.timed_out) + \
            [f"crashed: {', '.join(r.crashed)}"] * bool(r.crashed) + [f"FLAG {f}" for f in r.flagged]
        lines += [f"{'':<{width}}    {note}" for note in notes]
    return "\n".join(lines) + "\n"

