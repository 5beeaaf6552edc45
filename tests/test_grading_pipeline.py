"""The whole nbgrader pipeline, for every assignment in solutions/.

1. Regenerating assignments/ from solutions/ reproduces the committed release notebooks.
2. Grading a simulated class with ``dgm grade``, in one pass per assignment, gives exactly the
   expected scores, per test cell, in the exported CSV and in the report, and no attacker earns a
   point (the class is in ``classroom_cases``). The "honest" submission is the release with every
   solution cell filled in; autograding restores the hidden tests, so its full score also shows that
   the solution notebook runs and passes every test.
3. No solution or hidden-test text appears in assignments/.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from classroom_cases import (CACHED_CELLS, EXPECTED, GRADER_ATTACKS, RECEIPT_ATTACKS, attack_submission, attacks_for,
                             pipeline_submission)
from dgmlib.cli import main
from dgmlib.grading import classroom, sandbox
from nbhelpers import ASSIGNMENTS, ROOT, SOLUTION_MARKERS, autograded_points, make_course, max_points, secret_lines

HAS_BWRAP = sandbox.bwrap_path() is not None
JUDGED = {name for name in ASSIGNMENTS if (ROOT / "solutions" / name / "judge.py").exists()}

pytestmark = pytest.mark.notebook


def _env() -> dict[str, str]:
    return {**os.environ, "DGM_FAST": "1"}


def nbgrader(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a plain nbgrader command in ``cwd``; fail the test with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    """A throw-away copy of the course: config + solutions, with the release regenerated."""
    root = make_course(tmp_path_factory.mktemp("course"))
    for name in ASSIGNMENTS:
        nbgrader("generate_assignment", name, "--force", cwd=root)
    return root


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_release_is_regenerated_exactly(course, name):
    for committed in sorted((ROOT / "assignments" / name).glob("*.ipynb")):
        fresh = course / "assignments" / name / committed.name
        assert json.loads(fresh.read_text()) == json.loads(committed.read_text()), (
            f"{committed.relative_to(ROOT)} is stale: run `nbgrader generate_assignment {name} --force`")
    assert sorted(p.name for p in (ROOT / "assignments" / name).glob("*.ipynb")) == \
        sorted(p.name for p in (ROOT / "solutions" / name).glob("*.ipynb"))


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_release_leaks_no_solution(name):
    for src_path in sorted((ROOT / "solutions" / name).glob("*.ipynb")):
        source = nbformat.read(src_path, as_version=4)
        released = (ROOT / "assignments" / name / src_path.name).read_text()
        for marker in SOLUTION_MARKERS:
            assert marker not in released
        for line in secret_lines(source):  # a line also public elsewhere in the notebook is no leak
            assert json.dumps(line)[1:-1] not in released, f"solution text leaked: {line!r}"


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed")
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_grading_a_class(tmp_path, name):
    """One ``dgm grade`` pass over a class: exact per-cell scores, and no attacker earns a point.

    The class (``classroom_cases``): the honest solution (for the first assignment also the same in a
    student's own words), the blank release, a partial submission, one whose cell raises, and one
    submission per attack on the assignment's tests (a wrapped reference answer, patched torch, edited
    tests); for the first assignment also the attacks on the receipts (hidden errors, a swapped grading
    module, a forged checker channel: they leave no passing receipt whatever the assignment), on the
    judge (test cells rewritten by a shell hook, forged probes, the instructor's files read from inside,
    a root escape, a model that lies about its NLL) and on the grader (deleting the course, an endless
    loop, killing the kernel, flooding the output of every kind, a relay in front of the checker, links
    and FIFOs planted where the grader writes, and submissions that are a FIFO or a link). They are
    graded together, 2 at a time, with the instructor's command as the README gives it.
    """
    course = make_course(tmp_path / "course")
    spec = EXPECTED[name]
    (notebook_file,) = sorted((ROOT / "solutions" / name).glob("*.ipynb"))
    source = nbformat.read(notebook_file, as_version=4)
    release = nbformat.read(ROOT / "assignments" / name / notebook_file.name, as_version=4)
    submissions = {kind: pipeline_submission(kind, release, source, spec) for kind in spec["scores"]}
    submissions["blank"] = copy.deepcopy(release)
    grader_attacks = name == ASSIGNMENTS[0]
    attacks = attacks_for(name)
    for attack in attacks:
        submissions[attack] = attack_submission(release, source, name, attack)
    for student, nb in submissions.items():
        folder = course / "submitted" / student / name
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / notebook_file.name)
    broken = {}  # submissions that are not a regular file: each fails alone, the class is graded
    if grader_attacks:
        for student in ("fifo", "symlink"):
            folder = course / "submitted" / student / name
            folder.mkdir(parents=True)
            broken[student] = folder / notebook_file.name
        os.mkfifo(broken["fifo"])
        broken["symlink"].symlink_to(course / "submitted" / "honest" / name / notebook_file.name)

    # The cell timeout bounds the endless loop (the first assignment, hw1); its slowest cell needs under 10 s on a
    # quiet machine.
    timeout = "30" if grader_attacks else "300"
    assert main(["grade", name, "--course", str(course), "--jobs", "2", "--timeout", timeout]) == 0
    reported = json.loads((course / "reports" / f"{name}.json").read_text())
    results = {r["student"]: classroom.StudentResult(**r) for r in reported}
    report = classroom.format_report(name, list(results.values()))
    for student in broken:
        assert "not a regular file" in results.pop(student).failure, report

    # exact per-cell scores in the gradebook (a flagged submission's manual override of 0 included)
    from nbgrader.api import Gradebook

    auto_cells = list(autograded_points(source))
    max_score = max_points(source)
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student in submissions:
            want = {cell: spec["scores"].get(student, {}).get(cell, 0) for cell in auto_cells}
            got = {cell: gb.find_grade(cell, notebook_file.stem, name, student).score for cell in auto_cells} \
                if student not in ("kill_kernel",) else dict.fromkeys(auto_cells, 0)  # a dead kernel is never scored
            assert got == want, f"{student}: per-cell scores {got} != expected {want}\n{report}"
            if student != "kill_kernel":
                assert gb.find_submission_notebook(notebook_file.stem, name, student).max_score == max_score
    # ... the same in the CSV and the report
    with open(course / "grades.csv", newline="") as fh:
        rows = {row["student_id"]: row for row in csv.DictReader(fh) if row["assignment"] == name}
    assert set(rows) == set(submissions)
    for student in submissions:
        total = sum(spec["scores"].get(student, {}).values())
        assert float(rows[student]["score"]) == total and results[student].score == total, f"{student}\n{report}"
        assert float(rows[student]["max_score"]) == max_score or student == "kill_kernel"
    for student in {"honest", "innocent"} & set(submissions):
        assert not results[student].flagged and not results[student].failure, report
        assert not results[student].unverified, report

    # what stopped each attack is visible in the report. The receipts alone: no test cell of these
    # earned its points before the review zeroed the submission (auto_score is nbgrader's own score).
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for attack in set(RECEIPT_ATTACKS) & set(attacks):
            autos = {cell: gb.find_grade(cell, notebook_file.stem, name, attack).auto_score for cell in auto_cells}
            assert set(autos.values()) == {0}, f"{attack}: {autos}\n{report}"
            assert sorted(u.split(" (")[0] for u in results[attack].unverified) == sorted(auto_cells), report
    # ... and the review flags every attacker, the reference answer by its name
    for attack in attacks:
        if attack not in GRADER_ATTACKS and attack not in ("edited_tests", "lying_model"):
            assert results[attack].flagged, f"{attack} was not flagged\n{report}"
    assert any("an answer of this assignment" in f for f in results["reference"].flagged), report
    if name in JUDGED:
        # the kernel's dgmlib is stripped of the answers: the wrapped reference raises, the judge gives nothing
        assert results["reference"].autograded_before_review == 0, report
        assert any("RuntimeError" in c for c in results["reference"].crashed), report
    else:
        # the wrapped reference passes the tests of its own cell with genuine receipts: the review stops it
        assert results["reference"].autograded_before_review > 0, report
    # copies are reported, never zeroed: the solution itself, and the blank release copies nothing
    assert any(s.startswith(f"solutions/{name} ") for s in results["honest"].similar), report
    assert not results["blank"].similar, report
    # the blank release is one line, "not attempted"; whoever wrote code is attempted
    assert results["blank"].not_attempted and not results["blank"].failure, report
    assert re.search(r"^blank +not attempted +[\d.]+ s$", report, flags=re.M), report
    assert not any(results[s].not_attempted for s in ("honest", "innocent", "partial") if s in results), report
    # the score at a glance: the autograded points, and the written answers pending until graded by hand
    honest = results["honest"]
    assert honest.auto_score == honest.auto_max == sum(spec["scores"]["honest"].values()), report
    assert honest.manual_max == honest.manual_pending == max_score - honest.auto_max, report
    glance = f"auto {honest.auto_score:g}/{honest.auto_max:g}" + (
        f", manual {honest.manual_pending:g} pending" if honest.manual_max else "")
    assert re.search(rf"^honest +{re.escape(glance)} ", report, flags=re.M), report
    # in the kernel, every test cell of the exec-hidden tamper failed on its own
    assert all(any(c.startswith(f"{g} (TamperingError)") for c in results["tamper_exec"].crashed)
               for g in auto_cells), report
    if grader_attacks:
        assert "infinite_loop" in report and results["infinite_loop"].timed_out
        assert "died" in results["kill_kernel"].failure
        # the checker's folder is read-only in the sandbox: the relay cannot take the socket's place
        assert any("OSError" in c for c in results["relay_checker"].crashed), report
        assert any("NotImplementedError" in c for c in results["huge_output"].crashed)
        flood = (course / "autograded" / "huge_output" / name / notebook_file.name).read_text()
        assert len(flood) < 2_000_000  # the huge output was cut in the autograded notebook
        # a 5 MB display and a 20 MB cell result: every kind of output is capped by the grader
        assert (course / "autograded" / "huge_result" / name / notebook_file.name).stat().st_size < 3_000_000
        assert "planted: [" in _printed(course, "plant_links", name, notebook_file.name), report
        assert os.access(course / "gradebook.db", os.W_OK)
        assert any(u.startswith("test_nll (judge: exact test NLL") for u in results["lying_model"].unverified), report
    if "cached_probe" in attacks:
        # values cached from the visible tests, exposed by a rewritten probe: every judge was reached and said no
        cached = results["cached_probe"]
        assert cached.autograded_before_review == 0, report
        assert "cached values for: [" in _printed(course, "cached_probe", name, notebook_file.name), report
        for cell in CACHED_CELLS[name]:
            assert any(u.startswith(f"{cell} (judge: ") and "never reached" not in u for u in cached.unverified), \
                f"{cell}: {cached.unverified}\n{report}"
    if "lying_sampler" in attacks:
        # real test digits from the sampler of an untrained network, its test cells reduced to their probes: both
        # judges of the model were reached (the replay and the network's own samples and loss) and said no
        lying = results["lying_sampler"]
        assert lying.autograded_before_review == 0, report
        for cell, reason in (("test_cond_sampler", "cond_model.sample: x0 = torch.randn"),
                             ("test_cond_digits", "the CFM loss of your network on the test digits")):
            assert any(u.startswith(f"{cell} (judge: {reason}") for u in lying.unverified), \
                f"{cell}: {lying.unverified}\n{report}"
    # the attacks on the judge, on every assignment: no escape, no instructor file in sight, nothing planted
    assert "escape won: []" in _printed(course, "escape", name, notebook_file.name), report
    assert "instructor files found: 0" in _printed(course, "read_solutions", name, notebook_file.name), report
    assert not list(Path(classroom.__file__).parents[1].rglob("dgm_planted.py"))  # nothing planted in dgmlib
    if name == ASSIGNMENTS[1]:  # one student regraded (`dgm grade --student`): the class keeps its results
        before = {row["student_id"]: row["score"] for row in csv.DictReader(open(course / "grades.csv", newline=""))}
        # a late submission that no report has graded yet is graded with the regrade, never dropped
        shutil.copytree(course / "submitted" / "blank", course / "submitted" / "late")
        assert main(["grade", name, "--course", str(course), "--jobs", "1", "--timeout", timeout,
                     "--student", "honest"]) == 0
        again = {r["student"]: classroom.StudentResult(**r)
                 for r in json.loads((course / "reports" / f"{name}.json").read_text())}
        assert set(again) == set(results) | set(broken) | {"late"}, "the report lost students"
        for student in results:
            assert again[student].score == results[student].score, student
        assert again["honest"].similar and again["blank"].not_attempted and again["late"].not_attempted
        after = {row["student_id"]: row["score"] for row in csv.DictReader(open(course / "grades.csv", newline=""))}
        assert after.pop("late") is not None and after == before
        with pytest.raises(SystemExit):  # a student without a submission is refused by name
            main(["grade", name, "--course", str(course), "--student", "nobody"])
    # the gradebook, the solutions and everyone's files survived
    assert (course / "gradebook.db").exists() and (course / "solutions" / name / notebook_file.name).exists()
    for student in submissions:
        assert nbformat.read(course / "submitted" / student / name / notebook_file.name, as_version=4).cells
    assert nbformat.read(course / "autograded" / "honest" / name / notebook_file.name, as_version=4).cells


def _printed(course: Path, student: str, name: str, notebook: str) -> str:
    """Everything the graded notebook of ``student`` shows as text (streams and results)."""
    nb = json.loads((course / "autograded" / student / name / notebook).read_text())
    return "".join("".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
                   for cell in nb["cells"] for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_validate_reports_an_unsolved_release(course, name):
    """`nbgrader validate`, the self-check the README gives students, flags the blank release."""
    for nb_path in sorted((course / "assignments" / name).glob("*.ipynb")):
        out = subprocess.run([sys.executable, "-m", "nbgrader", "validate", str(nb_path)], cwd=course,
                             env=_env(), capture_output=True, text=True, timeout=600)
        assert "NotImplementedError" in out.stdout + out.stderr
