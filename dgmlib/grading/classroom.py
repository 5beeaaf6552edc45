"""Grade every submission of an assignment: ``dgm grade ASSIGNMENT``.

Each student is graded by their own ``nbgrader autograde ASSIGNMENT --student ID`` process, up to
``jobs`` at a time, with the notebook executed in the sandboxed kernel (``dgmlib.grading.sandbox``)
and private runtime folders, so one failure or attack never stops or changes another student's
grading. A submission that outlives its wall-clock limit has its whole process group killed, and one
whose folder holds anything but regular files of a bounded size is refused alone
(``dgmlib.grading.untrusted``); the grader reads no file the kernel wrote, and every notebook it reads
itself as a regular file of a bounded size. Each ``nbgrader autograde`` runs through
``dgmlib.grading.receipts``: a judged assignment's test cells (``solutions/ASSIGNMENT/judge.py``) score only
by their judge, in the grader, on secret inputs (``dgmlib.grading.judge``); an assignment without a judge
scores by the receipts of its checks. After grading, every
submission's code is reviewed against what the assignment allows (``dgmlib.grading.review``;
flagged submissions are zeroed pending review, with nbgrader's manual override), and near-copies
among submissions, of dgmlib and of the solutions are listed (``dgmlib.grading.similarity``; never
zeroed). At the end ``nbgrader export`` writes the CSV, and a report lists, per student, the score
and any cell that timed out, crashed, was scored 0 for want of receipts, or was flagged.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dgmlib
from dgmlib import colab
from dgmlib.grading import judge, limits, review, sandbox, similarity, strip, untrusted
from dgmlib.grading.untrusted import read_regular_file  # noqa: F401 - the grader's way to read a student's file


@dataclass
class StudentResult:
    """One student's outcome: score, and what went wrong or looked suspicious.

    ``score`` and ``max_score`` are nbgrader's totals. They split into the autograded cells (``auto_score`` of
    ``auto_max``) and the manually graded ones (``manual_score`` of ``manual_max`` given so far, and
    ``manual_pending`` points still to grade in formgrader). ``not_attempted``: no solution cell differs from the
    release, and the student added no code.
    """

    student: str
    score: float = 0.0
    max_score: float = 0.0
    seconds: float = 0.0
    timed_out: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    autograded_before_review: float | None = None
    similar: list[str] = field(default_factory=list)
    failure: str = ""
    not_attempted: bool = False
    auto_score: float = 0.0
    auto_max: float = 0.0
    manual_score: float = 0.0
    manual_max: float = 0.0
    manual_pending: float = 0.0


def grade_assignment(assignment: str, course: Path = Path("."), jobs: int | None = None,
                     cell_timeout: int = 300, students: Sequence[str] | None = None, submission_timeout: int | None = None,
                     memory_mb: int = sandbox.DEFAULT_MEMORY_MB, output_kb: int = sandbox.DEFAULT_OUTPUT_KB,
                     fast: bool = True, use_sandbox: bool = True, zero_flagged: bool = True,
                     similarity_threshold: float = similarity.DEFAULT_THRESHOLD) -> list[StudentResult]:
    """Autograde every ``submitted/*/ASSIGNMENT`` in ``course``; export ``grades.csv``; write the report.

    A submission whose folder holds anything but regular files (a FIFO, a symbolic link, a device, a
    folder) or a file over ``untrusted.MAX_FILE_BYTES`` fails alone, ungraded
    (``untrusted.check_submission``). Each kernel works in a fresh folder of its own
    (``DGM_KERNEL_CWD``, a tmpfs in the sandbox that the grader never reads), in a cgroup of its own
    where cgroup v2 can be written (``limits.submission_cgroup``), and, when the assignment is judged
    (``solutions/ASSIGNMENT/judge.py``), with the copy of dgmlib whose answers are withheld
    (``strip.stripped_copy``, ``DGM_STRIPPED_LIBRARY``).

    With ``students``, only those submissions are (re)graded, e.g. a late or corrected one: the others keep the
    results of the last report (``reports/ASSIGNMENT.json``), the near-copies are compared again across the whole
    class, and the export and the report cover everyone.

    Args:
        assignment: the assignment name (a folder of ``solutions/``).
        course: the nbgrader course root (holding ``nbgrader_config.py``).
        jobs: parallel graders (default: the number of cores).
        students: the student ids to grade (default: every ``submitted/*/ASSIGNMENT``).
        cell_timeout: nbgrader's per-cell timeout in seconds.
        submission_timeout: wall-clock limit for one whole submission (default: 4 x cell_timeout + 120).
        memory_mb, output_kb: the kernel's memory limit and output budget per stream.
        fast: grade with ``DGM_FAST=1`` (the thresholds of the tests assume it).
        use_sandbox: run kernels in bubblewrap (off only for debugging).
        zero_flagged: give every autograded cell of a flagged submission a manual score of 0 with a
            comment naming the flags (nbgrader's own override; review and clear it in formgrader).
        similarity_threshold: the share of code at which two submissions, or a submission and dgmlib or the
            solutions, are reported as near-copies (reported only, never zeroed).

    Returns:
        one ``StudentResult`` per student, sorted by student id. The report is written to
        ``reports/ASSIGNMENT.json`` and ``reports/ASSIGNMENT.txt`` under ``course``.

    Raises:
        CourseNotFoundError (a ``FileNotFoundError``): if the course, assignment or submissions are missing, or a
            student named in ``students`` has no submission; raised before anything is graded.
        RuntimeError: if nbgrader cannot generate the assignment (its log is named), or if the sandbox has
            no seccomp filter for this machine.
    """
    course = Path(course).resolve()
    if not (course / "nbgrader_config.py").exists():
        raise CourseNotFoundError(f"{course} is not an nbgrader course (no nbgrader_config.py)")
    if not (course / "solutions" / assignment).is_dir():
        raise CourseNotFoundError(f"no source assignment solutions/{assignment} in {course}")
    # every entry, folder or not: check_submission says why one that is not a folder is not graded
    submitted = sorted({p.parent.name for p in (course / "submitted").glob(f"*/{assignment}")})
    if not submitted:
        raise CourseNotFoundError(f"no submissions found in {course}/submitted/*/{assignment}")
    if students is not None:
        missing = sorted(set(students) - set(submitted))
        if missing:
            raise CourseNotFoundError(f"no submission of {assignment} in {course}/submitted for "
                                    f"{', '.join(missing)}")
    # a regrade: the others keep the last report's results; a submission that no report has graded yet (a late
    # one) is graded with it, never dropped
    previous = _previous_results(course, assignment) if students is not None else {}
    students = submitted if students is None else sorted(set(students) | {s for s in submitted if s not in previous})
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
    sources = {p.stem: json.loads(p.read_text()) for p in (course / "solutions" / assignment).glob("*.ipynb")}
    policies = {name: review.Policy.from_notebook(nb) for name, nb in sources.items()}
    instructor_cells = {name: _instructor_cells(nb) for name, nb in sources.items()}
    # A judged assignment is scored in the grader: its kernels get dgmlib without the answers (strip.py).
    # The others' hidden tests still call dgmlib's reference in the kernel: they get the library whole.
    library = None
    if (course / "solutions" / assignment / "judge.py").is_file():
        library = work / "library"
        strip.stripped_copy(sorted({n for p in policies.values() for names in p.answers.values() for n in names}),
                            library)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    tmpfs_mb = sandbox.DEFAULT_TMPFS_MB
    sandboxed = use_sandbox and sandbox.bwrap_path() is not None
    if sandboxed:
        sandbox.seccomp_program()  # an architecture without a filter stops here, not in every kernel
    refused: set[str] = set()

    def grade_one(student: str) -> StudentResult:
        # a FIFO, a link, a device, a folder or a huge file in the submission: this student fails alone
        reason = untrusted.check_submission(course / "submitted" / student / assignment,
                                            label=f"submitted/{student}/{assignment}")
        if reason:
            refused.add(student)
            return StudentResult(student, failure=reason)
        private = work / student
        (private / "runtime").mkdir(parents=True)
        (private / "sockets").mkdir()
        (private / "checker").mkdir()  # read-only in the sandbox
        (private / "scratch").mkdir()  # the kernel's working folder: a fresh tmpfs in the sandbox, never read back
        env = {
            "JUPYTER_PATH": os.pathsep.join(filter(None, [str(work), os.environ.get("JUPYTER_PATH")])),
            "JUPYTER_RUNTIME_DIR": str(private / "runtime"),
            "DGM_COURSE_ROOT": str(course),
            "DGM_FAST": "1" if fast else "0",
            "DGM_FAST_LOCKED": "1",  # the notebook's fast switch keeps the class's mode (config.set_fast_mode)
            "DGM_SANDBOX_MEMORY_MB": str(memory_mb),
            "DGM_SANDBOX_OUTPUT_KB": str(output_kb),
            "DGM_SANDBOX_CPU_SECONDS": str(submission_timeout * 2),
            "DGM_SANDBOX_PROCESSES": str(sandbox.DEFAULT_PROCESSES),
            "DGM_SANDBOX_FILE_MB": str(sandbox.DEFAULT_FILE_MB),
            "DGM_SANDBOX_TMPFS_MB": str(tmpfs_mb),
            "DGM_CHECKER_SOCKET": str(private / "checker" / "socket"),  # the grader's checker (receipts)
            "DGM_KERNEL_CWD": str(private / "scratch"),
            # under a root grader, a host uid of its own: the process limit counts per host uid
            "DGM_SANDBOX_HOST_UID": str(_HOST_UID_BASE + students.index(student)),
            "OMP_NUM_THREADS": str(threads),  # no oversubscription
        }
        if library is not None:
            env["DGM_STRIPPED_LIBRARY"] = str(library)
        # its own cgroup where cgroup v2 can be written (memory with the tmpfs pages, tasks, CPU share)
        cgroup = limits.submission_cgroup(f"{work.name}-{student}", (memory_mb + 3 * tmpfs_mb + 256) * 2**20,
                                          sandbox.DEFAULT_PROCESSES + 64, threads) if sandboxed else None
        if cgroup is not None:
            env["DGM_SANDBOX_CGROUP"] = str(cgroup)
        # the kernel is killed once its notebook has run (nbclient's graceful shutdown waits about 1.5 s for it)
        args = ["autograde", assignment, "--student", student, "--force", f"--Execute.timeout={cell_timeout}",
                "--Execute.shutdown_kernel=immediate",
                "--KernelManager.transport=ipc", f"--KernelManager.ip={private / 'sockets' / 'kernel'}"]
        if use_sandbox:
            args.append(f"--Execute.kernel_name={sandbox.KERNEL_NAME}")
        start = time.perf_counter()
        result = StudentResult(student)
        # no cgroup, a root grader: the submission's processes are those of its own host uid, watched together
        watchdog = limits.UidWatchdog(int(env["DGM_SANDBOX_HOST_UID"]), (memory_mb + 512) * 2**20,
                                      2 * submission_timeout) if sandboxed and cgroup is None and os.geteuid() == 0 \
            else None
        try:
            code = _run_nbgrader(args, course, private / "autograde.log", env, submission_timeout,
                                 command=_AUTOGRADER)
        finally:
            limits.remove_cgroup(cgroup)
            if watchdog is not None:
                watchdog.stop()
        result.seconds = time.perf_counter() - start
        log = (private / "autograde.log").read_text(errors="replace")
        if watchdog is not None and watchdog.reason:
            result.failure = f"the submission was stopped: {watchdog.reason}"
        elif code == "timeout":
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

    release = {p.stem: untrusted.read_notebook(p) for p in (course / "assignments" / assignment).glob("*.ipynb")}
    for result in results:
        if result.student in refused:
            continue
        try:
            _review_student(course, assignment, result, policies, instructor_cells, zero_flagged)
            result.not_attempted = _not_attempted(course / "submitted" / result.student / assignment, release,
                                                  instructor_cells)
        except (OSError, ValueError) as err:  # a notebook that is not a regular file, too large, not JSON
            result.failure = result.failure or f"its notebooks could not be reviewed: {err}"
    if students != submitted:  # a regrade: the others keep their last results
        results += [previous[s] for s in submitted if s not in students]
        results.sort(key=lambda r: r.student)
        refused |= {r.student for r in results if r.failure.endswith("not graded")}
    for result in results:
        result.similar = []
    _report_similar(course, assignment, [r for r in results if r.student not in refused], similarity_threshold,
                    set().union(*instructor_cells.values()))
    _run_nbgrader(["export", "--to", str(course / "grades.csv")], course, work / "export.log", None, 600)
    scores = _read_scores(course / "grades.csv", assignment)
    split = _score_split(course, assignment)
    for result in results:
        result.score, result.max_score = scores.get(result.student, (0.0, 0.0))
        (result.auto_score, result.auto_max, result.manual_score, result.manual_max,
         result.manual_pending) = split.get(result.student, (0.0, 0.0, 0.0, 0.0, 0.0))
        # whatever the notebooks look like, a submission with points or answers to grade was attempted
        result.not_attempted = result.not_attempted and result.score == 0 and result.manual_pending == 0
    _write_report(course, assignment, results)
    return results


def _previous_results(course: Path, assignment: str) -> dict[str, StudentResult]:
    """The last report's results (``reports/ASSIGNMENT.json``, written by the grader), by student; {} if none."""
    path = course / "reports" / f"{assignment}.json"
    if not path.is_file():
        return {}
    known = set(StudentResult.__dataclass_fields__)
    return {r["student"]: StudentResult(**{k: v for k, v in r.items() if k in known})
            for r in json.loads(path.read_text())}


def _answers(nb: dict) -> list[str]:
    """The sources of a notebook's written answers (markdown solution cells), whitespace normalised."""
    found = []
    for cell in nb.get("cells", []):
        if isinstance(cell, dict) and cell.get("cell_type") == "markdown" and \
                cell.get("metadata", {}).get("nbgrader", {}).get("solution"):
            source = cell.get("source", "")
            found.append(" ".join(("".join(source) if isinstance(source, list) else str(source)).split()))
    return sorted(found)


def _not_attempted(folder: Path, release: dict[str, dict], instructor_cells: dict[str, set[str]]) -> bool:
    """Whether every notebook in ``folder`` holds only what its release gave: no solution cell changed, no code
    added (the fast switch, set either way, aside: ``colab.is_fast_switch``), no written answer changed. Read with
    ``untrusted.read_notebook``. ``grade_assignment`` also requires a score of 0 and no answer pending.

    Raises:
        UntrustedFileError, OSError, ValueError: if a notebook cannot be read safely or is not JSON.
    """
    def code(nb: dict, cells: set[str]) -> list[str]:
        return sorted(" ".join(src.split()) for grade_id, _, src in review.split_cells(nb, cells)[0]
                      if src.strip() and not colab.is_fast_switch(src)) + _answers(nb)

    notebooks = sorted(folder.glob("*.ipynb"))
    return bool(notebooks) and all(
        p.stem in release and code(untrusted.read_notebook(p), instructor_cells.get(p.stem, set()))
        == code(release[p.stem], instructor_cells.get(p.stem, set())) for p in notebooks)


def _score_split(course: Path, assignment: str) -> dict[str, tuple[float, float, float, float, float]]:
    """Per student, from the gradebook: (auto score, auto max, manual score given, manual max, manual points pending).

    A cell is manual when it is a graded answer cell (a solution cell with points: the written answers), and
    autograded otherwise (the test cells); a manual override of an autograded cell (a zeroed, flagged submission)
    counts as that cell's auto score. A written answer left as the release gave it is scored 0 by nbgrader when it
    autogrades; it counts as given (0), not pending.
    """
    from nbgrader.api import Gradebook, MissingEntry

    split = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        try:
            submissions = gb.find_assignment(assignment).submissions
        except MissingEntry:
            return {}
        for submission in submissions:
            auto = auto_max = manual = manual_max = pending = 0.0
            for notebook in submission.notebooks:
                answers = {cell.name for cell in notebook.notebook.solution_cells}
                for grade in notebook.grades:
                    if grade.name not in answers:
                        auto, auto_max = auto + grade.score, auto_max + grade.max_score
                        continue
                    manual_max += grade.max_score
                    if grade.manual_score is None and grade.auto_score is None:
                        pending += grade.max_score
                    else:
                        manual += grade.score
            split[submission.student.id] = (auto, auto_max, manual, manual_max, pending)
    return split


class CourseNotFoundError(FileNotFoundError):
    """The course, the assignment, the submissions or a named student's submission is missing: nothing was graded."""


_HOST_UID_BASE = 3_000_000_000
"""The kernels of one ``dgm grade`` run take host uids from here (one per submission; no user has them)."""


def _review_student(course: Path, assignment: str, result: StudentResult, policies: dict[str, review.Policy],
                    instructor_cells: dict[str, set[str]], zero_flagged: bool) -> None:
    """Review one student's notebooks, zero the flagged ones, and note the cells that timed out, crashed or
    lacked receipts (every notebook read by ``untrusted.read_regular_file``).

    Raises:
        UntrustedFileError, OSError, ValueError: if a notebook cannot be read safely or is not JSON.
    """
    for nb_path in sorted((course / "submitted" / result.student / assignment).glob("*.ipynb")):
        flags = review.review_notebook(nb_path, policies.get(nb_path.stem, review.Policy()),
                                       instructor_cells.get(nb_path.stem, set()))
        result.flagged += flags
        if flags and zero_flagged:
            auto = _zero_autograded(course, assignment, result.student, nb_path.stem, flags)
            result.autograded_before_review = (result.autograded_before_review or 0.0) + auto
        graded = course / "autograded" / result.student / assignment / nb_path.name
        if os.path.lexists(graded):
            timed_out, crashed, unverified = _cell_errors(graded)
            result.timed_out += timed_out
            result.crashed += crashed
            result.unverified += unverified


def _instructor_cells(source_notebook: dict) -> set[str]:
    """grade_ids of the source notebook's cells that are not solution cells (nbgrader restores them)."""
    return {meta["grade_id"] for cell in source_notebook.get("cells", [])
            if "grade_id" in (meta := cell.get("metadata", {}).get("nbgrader", {})) and not meta.get("solution")}


# nbgrader with the checker and the receipts in the grader; run by path (see its docstring)
_AUTOGRADER = [str(Path(__file__).with_name("receipts.py"))]


def _run_nbgrader(args: list[str], course: Path, log: Path, extra_env: dict | None, timeout: float,
                  command: list[str] | None = None) -> int | str:
    """Run ``python -m nbgrader ARGS`` (or ``python COMMAND ARGS``) in its own process group; kill the
    group on timeout."""
    env = {**os.environ, **(extra_env or {})}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, *(command or ["-m", "nbgrader"]), *args], cwd=course, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"


def _zero_autograded(course: Path, assignment: str, student: str, notebook: str, flags: list[str]) -> float:
    """Override every autograded cell of one submitted notebook with a manual score of 0, and say why.

    Returns:
        the autograded points the override took away (what the receipts alone would have given).
    """
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        try:
            submission = gb.find_submission_notebook(notebook, assignment, student)
        except MissingEntry:
            return 0.0  # never autograded (e.g. the kernel died): nothing was scored
        taken = 0.0
        for grade in submission.grades:
            if grade.auto_score is not None:
                taken += grade.auto_score
                grade.manual_score = 0.0
        for comment in submission.comments:
            comment.manual_comment = "Autograded score set to 0: possible tampering, review before restoring. " + \
                "; ".join(flags)
        gb.db.commit()
    return taken


def _read_scores(csv_path: Path, assignment: str) -> dict[str, tuple[float, float]]:
    if not csv_path.exists():
        return {}
    with open(csv_path, newline="") as fh:
        return {row["student_id"]: (float(row["score"] or 0), float(row["max_score"] or 0))
                for row in csv.DictReader(fh) if row["assignment"] == assignment}


def _report_similar(course: Path, assignment: str, results: list[StudentResult], threshold: float,
                    instructor_cells: set[str]) -> None:
    """Note near-copies on each student's result: of another student, of the solutions, of dgmlib (the code of
    the release and of the lectures left out, and the solutions' code left out of the comparison with dgmlib:
    ``similarity.similar_pairs``)."""
    def cells(folder: Path) -> list[str]:
        found = []
        for path in sorted(folder.glob("*.ipynb")):
            try:
                found += similarity.student_cells(path, instructor_cells)
            except (OSError, ValueError):  # not a regular file, too large, not JSON: nothing to compare
                pass
        return found

    code = {r.student: cells(course / "submitted" / r.student / assignment) for r in results}
    solutions = {f"solutions/{assignment}": cells(course / "solutions" / assignment)}
    package = Path(dgmlib.__file__).parent
    references = {f"dgmlib/{p.relative_to(package)}": p.read_text() for p in sorted(package.rglob("*.py"))}
    # what every student was given (the release's cells) or shown (the lectures' code cells) is never copied;
    # the lectures are the course's own, or those beside the dgmlib that grades
    lectures = next((d for d in (course / "lectures", package.parent / "lectures") if d.is_dir()), None)
    shown = []
    for path in sorted(lectures.glob("*.ipynb")) if lectures is not None else []:
        try:
            shown += similarity.code_cells(path)
        except (OSError, ValueError):  # not a regular file, too large, not JSON: nothing shown
            pass
    boilerplate = cells(course / "assignments" / assignment) + shown
    by_student = {r.student: r for r in results}
    for pair in similarity.similar_pairs(code, references, boilerplate, threshold, solutions):
        for one, other, mine, theirs in ((pair.first, pair.second, pair.first_share, pair.second_share),
                                         (pair.second, pair.first, pair.second_share, pair.first_share)):
            if one in by_student:
                by_student[one].similar.append(f"{other} ({mine:.0%} of this code, {theirs:.0%} of theirs)")


def _cell_errors(graded_notebook: Path) -> tuple[list[str], list[str], list[str]]:
    """Cells of the autograded notebook that timed out, that raised (with the exception), and that were
    scored 0 for want of receipts (``UnverifiedCheck``) or by their judge (``JudgeFailed``), with the reason."""
    nb = untrusted.read_notebook(graded_notebook)
    timed_out, crashed, unverified = [], [], []
    for i, cell in enumerate(nb.get("cells", [])):
        name = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", f"#{i + 1}")
        for out in cell.get("outputs", []):
            if out.get("output_type") != "error":
                continue
            if out.get("ename") == "CellTimeoutError":
                timed_out.append(name)
            elif out.get("ename") == "UnverifiedCheck":
                unverified.append(f"{name} ({out.get('evalue')})")
            elif out.get("ename") == "JudgeFailed":
                unverified.append(f"{name} (judge: {out.get('evalue')})")
            else:
                crashed.append(f"{name} ({out.get('ename')})")
    return timed_out, crashed, unverified


def _write_report(course: Path, assignment: str, results: list[StudentResult]) -> None:
    out = course / "reports"
    out.mkdir(exist_ok=True)
    (out / f"{assignment}.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (out / f"{assignment}.txt").write_text(format_report(assignment, results))


def _plural(count: int, noun: str) -> str:
    """``"1 submission"``, ``"2 submissions"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _points(x: float) -> str:
    return f"{x:g}"


def score_line(r: StudentResult) -> str:
    """One student's score at a glance: ``"auto 25/25, manual 2 pending"``, ``"18.5/27 (auto 17/25, manual 1.5/2)"``
    once the manual points are given, ``"not attempted"``, or ``"failed: 0/27"`` (the reason is on the next line)."""
    if r.failure:
        return f"failed: {_points(r.score)}/{_points(r.max_score)}" if r.max_score else "failed"
    if r.not_attempted:
        return "not attempted"
    auto = f"auto {_points(r.auto_score)}/{_points(r.auto_max)}" if r.auto_max else ""
    if not r.manual_max:
        return auto or f"{_points(r.score)}/{_points(r.max_score)}"
    if r.manual_pending:
        given = r.manual_max - r.manual_pending
        manual = (f"manual {_points(r.manual_pending)} pending" if not given else
                  f"manual {_points(r.manual_score)}/{_points(given)}, {_points(r.manual_pending)} pending")
        return ", ".join(filter(None, [auto, manual]))
    return f"{_points(r.score)}/{_points(r.max_score)} ({', '.join(filter(None, [auto, f'manual {_points(r.manual_score)}/{_points(r.manual_max)}']))})"


def _crash_notes(r: StudentResult) -> list[str]:
    """The cells that crashed, grouped by exception, the stubs left unsolved (``NotImplementedError``) first; then
    the cells scored 0 by their judge or for want of receipts, less the test cells whose crash already says why
    (their probe never ran)."""
    by_error: dict[str, list[str]] = {}
    for entry in r.crashed:  # "test_bound (NotImplementedError)"
        cell, _, error = entry.partition(" (")
        by_error.setdefault(error.rstrip(")") or "error", []).append(cell)
    notes = [f"unsolved (NotImplementedError): {', '.join(by_error.pop('NotImplementedError'))}"] \
        if "NotImplementedError" in by_error else []
    notes += [f"crashed ({error}): {', '.join(cells)}" for error, cells in by_error.items()]
    crashed = {entry.partition(" (")[0] for entry in r.crashed}
    for u in r.unverified:
        if u.partition(" (")[0] in crashed and u.endswith(f"(judge: {judge.NEVER_REACHED})"):
            continue
        notes.append(f"scored 0 by the judge: {u}" if "(judge: " in u else f"scored 0 without receipts: {u}")
    return notes


def format_report(assignment: str, results: list[StudentResult]) -> str:
    """The class at a glance: a summary line, then one line per student (score, time) and, indented under it, only
    what needs the instructor: a failure, cells that timed out, stubs left unsolved, cells that crashed (grouped by
    exception) or were scored 0 by their judge for another reason (with it), review flags, a zeroed score and
    near-copies. A submission that changed nothing of the release is one
    line, "not attempted"."""
    failed = sum(bool(r.failure) for r in results)
    blank = sum(r.not_attempted and not r.failure for r in results)
    flagged = sum(bool(r.flagged) for r in results)
    copies = sum(bool(r.similar) for r in results)
    pending = sum(r.manual_pending > 0 and not r.failure and not r.not_attempted for r in results)
    summary = [_plural(len(results), "submission")] + \
        [f"{n} {what}" for n, what in ((failed, "failed"), (blank, "not attempted"), (flagged, "flagged for review"),
                                       (copies, "with near-copies to review")) if n] + \
        ([f"manual grading pending for {_plural(pending, 'student')}"] if pending else [])
    lines = [f"{assignment}: {', '.join(summary)}", ""]
    width = max([len(r.student) for r in results] + [7])
    glance = max([len(score_line(r)) for r in results] + [5])
    lines.append(f"{'student':<{width}}  {'score':<{glance}}  {'time':>7}")
    for r in results:
        lines.append(f"{r.student:<{width}}  {score_line(r):<{glance}}  {r.seconds:6.1f} s")
        auto = r.autograded_before_review
        quiet = r.not_attempted and not r.failure  # nothing to say cell by cell about a blank submission
        notes = ([f"FAILED: {r.failure}"] if r.failure else []) + \
            ([f"timed out: {', '.join(r.timed_out)}"] * bool(r.timed_out) + _crash_notes(r)) * (not quiet) + \
            [f"FLAG {f}" for f in r.flagged] + \
            ([f"zeroed pending review (autograded {auto:g} before)"] if auto is not None else []) + \
            [f"similar to {s} (review; not zeroed)" for s in r.similar]
        lines += [f"{'':<{width}}    {note}" for note in notes]
    return "\n".join(lines) + "\n"
