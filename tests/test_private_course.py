"""A private course for credit, set up and graded as ``docs/private_course.md`` says, with nbgrader's own commands.

One module-scoped course, in a temporary folder, built from this repository's ``solutions/hw3_vae`` and
``nbgrader_config.py`` with the page's settings block appended (the per-hour late policy, roster-only grading). The
page's own commands are run (each read from the page, so the page cannot drift from what is tested): the roster of
the page is imported, the assignment added with its due date in Paris time, the release generated; then three
submissions are placed: the solution on time (``timestamp.txt`` written by hand), the solution 2.5 hours late
(collected by ``nbgrader zip_collect`` with the page's expression), and a partial one without a timestamp, plus
one from a student who is not on the roster. ``dgm grade`` grades them (sandboxed, judged), then the page's export,
feedback and LMS script run. The tests check the roster, the refused stranger, the late penalty (the late student
only), the CSV's columns, ids and names, the release (no solution, no ``judge.py``), the feedback (no line of
``judge.py``, no solution line the student did not write) and the LMS upload.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from classroom_cases import EXPECTED, pipeline_submission
from dgmlib.cli import main
from dgmlib.grading import sandbox
from nbhelpers import ROOT, SOLUTION_MARKERS, secret_lines

pytestmark = [pytest.mark.slow, pytest.mark.notebook,
              pytest.mark.skipif(sandbox.bwrap_path() is None, reason="bubblewrap is not installed")]

ASSIGNMENT = "hw3_vae"
DOC = ROOT / "docs" / "private_course.md"
ON_TIME = "2026-10-16 21:14:03 UTC"  # ada's timestamp.txt, written by hand as the page shows
LATE_FILE = f"bob_20261017T002900Z_{ASSIGNMENT}.ipynb"  # bob's LMS download: 00:29 UTC, 2.5 hours after 21:59 UTC
STRANGER = "mallory"  # submits, but is not on the roster
EXPORT_COLUMNS = ["assignment", "duedate", "timestamp", "student_id", "last_name", "first_name", "email", "raw_score",
                  "late_submission_penalty", "score", "max_score"]
CANVAS_COLUMN = "HW3 VAE (12345)"


def doc_blocks() -> list[tuple[str, str]]:
    """Every fenced code block of the page, as (language, code), indented blocks (in list items) dedented."""
    text = DOC.read_text()
    return [(lang, textwrap.dedent(indent + code).strip("\n"))
            for indent, lang, code in re.findall(r"^( *)```(\w*)\n(.*?)^\1```", text, flags=re.M | re.S)]


def doc_block(language: str, contains: str) -> str:
    """The one code block of the page in ``language`` that contains ``contains``."""
    found = [code for lang, code in doc_blocks() if lang == language and contains in code]
    assert len(found) == 1, f"{DOC.name}: {len(found)} {language} blocks contain {contains!r}"
    return found[0]


def doc_command(prefix: str) -> list[str]:
    """The page's shell command that starts with ``prefix`` (in a bash block), split as bash would, comment dropped."""
    lines = [line for lang, code in doc_blocks() if lang == "bash" for line in code.splitlines()
             if line.startswith(prefix + " ") or line == prefix]
    assert len(lines) == 1, f"{DOC.name}: {len(lines)} commands start with {prefix!r}"
    return shlex.split(lines[0], comments=True)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run one command of the page in the course folder (``nbgrader`` and ``python`` as this interpreter's).

    Fails the test with the command's output if it exits with an error.
    """
    command = [sys.executable, "-m", "nbgrader", *args[1:]] if args[0] == "nbgrader" else \
        [sys.executable, *args[1:]] if args[0] == "python" else args
    proc = subprocess.run(command, cwd=cwd, env={**os.environ, "DGM_FAST": "1"}, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{shlex.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def visible_text(page: str) -> str:
    """The text a reader sees on an HTML page: tags removed (code is split into highlighted spans), entities decoded."""
    page = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def judge_lines() -> list[str]:
    """The lines of the assignment's judge.py (stripped, over 12 characters): its code, comments and docstrings."""
    text = (ROOT / "solutions" / ASSIGNMENT / "judge.py").read_text()
    return sorted({line.strip() for line in text.splitlines() if len(line.strip()) > 12})


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    """The private course of the page, graded: roster, due date, release, four submissions, dgm grade, export,
    feedback, and the LMS script of step 9 on a Canvas-like export."""
    root = tmp_path_factory.mktemp("dgm-private")
    shutil.copytree(ROOT / "solutions" / ASSIGNMENT, root / "solutions" / ASSIGNMENT)
    settings = doc_block("python", "private course settings")
    (root / "nbgrader_config.py").write_text((ROOT / "nbgrader_config.py").read_text() + "\n\n" + settings + "\n")
    (root / "roster.csv").write_text(doc_block("text", "id,first_name,last_name,email,lms_user_id") + "\n")
    (root / "lms_grades.py").write_text(doc_block("python", "Fill one assignment column") + "\n")

    run(doc_command("nbgrader db student import"), root)
    run(doc_command("nbgrader db assignment add"), root)
    run(doc_command("nbgrader generate_assignment"), root)

    (notebook,) = sorted((root / "solutions" / ASSIGNMENT).glob("*.ipynb"))
    source = nbformat.read(notebook, as_version=4)
    release = nbformat.read(root / "assignments" / ASSIGNMENT / notebook.name, as_version=4)
    spec = EXPECTED[ASSIGNMENT]
    honest = pipeline_submission("honest", release, source, spec)
    # ada: the solution, on time, placed by hand with its timestamp.txt
    (root / "submitted" / "ada" / ASSIGNMENT).mkdir(parents=True)
    nbformat.write(honest, root / "submitted" / "ada" / ASSIGNMENT / notebook.name)
    (root / "submitted" / "ada" / ASSIGNMENT / "timestamp.txt").write_text(ON_TIME + "\n")
    # cyd: a partial submission without timestamp.txt (never late); mallory: the blank release, not on the roster
    for student, nb in (("cyd", pipeline_submission("partial", release, source, spec)), (STRANGER, release)):
        (root / "submitted" / student / ASSIGNMENT).mkdir(parents=True)
        nbformat.write(nb, root / "submitted" / student / ASSIGNMENT / notebook.name)
    # bob: the solution 2.5 hours late, downloaded from an LMS and collected by zip_collect with the page's expression
    (root / "downloaded" / ASSIGNMENT / "archive").mkdir(parents=True)
    nbformat.write(honest, root / "downloaded" / ASSIGNMENT / "archive" / LATE_FILE)
    run(doc_command("nbgrader zip_collect"), root)

    assert main(["grade", ASSIGNMENT, "--course", str(root), "--jobs", "2"]) == 0
    run(doc_command("nbgrader export"), root)
    run(doc_command("nbgrader generate_feedback"), root)

    with open(root / "canvas_export.csv", "w", newline="") as fh:  # the gradebook export of a Canvas-like LMS
        writer = csv.writer(fh)
        writer.writerow(["Student", "ID", "SIS User ID", "SIS Login ID", "Section", CANVAS_COLUMN])
        writer.writerow(["    Points Possible", "", "", "", "", "19.00"])
        for name, canvas_id, lms_id, login in (("Lovelace, Ada", "501", "1001", "ada"),
                                               ("Babbage, Bob", "502", "1002", "bob"),
                                               ("Hopper, Cyd", "503", "1003", "cyd"),
                                               ("Turing, Alan", "504", "1004", "alan")):
            writer.writerow([name, canvas_id, lms_id, login, "DGM 2026", ""])
    run(doc_command("python lms_grades.py"), root)
    return root


def _grades(course: Path) -> dict[str, dict[str, str]]:
    """student_id -> the row of the page's export (grades.csv)."""
    with open(course / "grades.csv", newline="") as fh:
        return {row["student_id"]: row for row in csv.DictReader(fh)}


def _roster() -> list[dict[str, str]]:
    """The page's roster, as rows."""
    return list(csv.DictReader(doc_block("text", "id,first_name").splitlines()))


def test_the_roster_is_imported_with_the_names_of_the_csv(course):
    from nbgrader.api import Gradebook

    roster = _roster()
    assert [r["id"] for r in roster] == ["ada", "bob", "cyd"]
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        students = {s.id: s for s in gb.students}
        assert set(students) == {"ada", "bob", "cyd"}  # the stranger was never added
        for row in roster:
            student = students[row["id"]]
            assert (student.first_name, student.last_name, student.lms_user_id) == \
                (row["first_name"], row["last_name"], row["lms_user_id"])
            assert student.email == (row["email"] or None)
    listing = run(["nbgrader", "db", "student", "list"], course).stdout
    assert "There are 3 students in the database" in listing
    assert "ada (Lovelace, Ada) -- ada@uni.example, 1001" in listing  # as the page's comment says


def test_the_due_date_is_stored_in_utc_as_the_page_says(course):
    listing = run(["nbgrader", "db", "assignment", "list"], course).stdout
    assert f"{ASSIGNMENT} (due: 2026-10-16 21:59:00)" in listing
    assert f"{ASSIGNMENT} (due: 2026-10-16 21:59:00)" in DOC.read_text()


def test_a_submission_from_outside_the_roster_is_refused(course):
    report = {r["student"]: r for r in json.loads((course / "reports" / f"{ASSIGNMENT}.json").read_text())}
    assert report[STRANGER]["failure"], report[STRANGER]
    assert not any(report[s]["failure"] for s in ("ada", "bob", "cyd")), report
    assert STRANGER not in _grades(course)


def test_the_late_penalty_falls_on_the_late_student_only(course):
    scores = EXPECTED[ASSIGNMENT]["scores"]
    full, partial = sum(scores["honest"].values()), sum(scores["partial"].values())
    rows = _grades(course)
    assert f'echo "{ON_TIME}" > submitted/ada/{ASSIGNMENT}/timestamp.txt' in DOC.read_text()  # the page's example
    assert (course / "submitted" / "bob" / ASSIGNMENT / "timestamp.txt").is_file()  # written by zip_collect
    assert rows["ada"]["timestamp"] == "2026-10-16 21:14:03" and rows["bob"]["timestamp"] == "2026-10-17 00:29:00"
    assert rows["cyd"]["timestamp"] == ""  # no timestamp.txt: never late
    for student, raw in (("ada", full), ("bob", full), ("cyd", partial)):
        assert float(rows[student]["raw_score"]) == raw, rows[student]
    # 2.5 hours late: 3 started hours at 10 % each
    assert float(rows["bob"]["late_submission_penalty"]) == pytest.approx(0.3 * full)
    assert float(rows["bob"]["score"]) == pytest.approx(0.7 * full)
    for student in ("ada", "cyd"):
        assert float(rows[student]["late_submission_penalty"]) == 0.0
        assert float(rows[student]["score"]) == float(rows[student]["raw_score"])


def test_the_export_has_the_columns_ids_and_names_an_lms_needs(course):
    with open(course / "grades.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == EXPORT_COLUMNS
    text = DOC.read_text()
    assert all(f"`{column}`" in text for column in EXPORT_COLUMNS)  # every column is explained on the page
    roster = {r["id"]: r for r in _roster()}
    assert sorted(r["student_id"] for r in rows) == sorted(roster)
    for row in rows:
        assert row["assignment"] == ASSIGNMENT and row["duedate"] == "2026-10-16 21:59:00"
        assert (row["first_name"], row["last_name"]) == (roster[row["student_id"]]["first_name"],
                                                         roster[row["student_id"]]["last_name"])
        assert float(row["max_score"]) == 19.0  # the page's number, written answer included


def test_the_lms_upload_fills_the_assignment_column_by_lms_id(course):
    grades = _grades(course)
    with open(course / "upload.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", CANVAS_COLUMN]
    by_login = {row["SIS Login ID"]: row for row in rows}
    for student in ("ada", "bob", "cyd"):
        assert by_login[student][CANVAS_COLUMN] == grades[student]["score"]
    assert by_login["alan"][CANVAS_COLUMN] == ""  # in the LMS, not in the course: left alone
    assert rows[0]["Student"].strip() == "Points Possible" and rows[0][CANVAS_COLUMN] == "19.00"


def test_the_release_holds_no_solution_and_no_judge(course):
    released = course / "assignments" / ASSIGNMENT
    assert sorted(p.name for p in released.rglob("*")) == [f"{ASSIGNMENT}.ipynb"]
    text = (released / f"{ASSIGNMENT}.ipynb").read_text()
    for marker in SOLUTION_MARKERS:
        assert marker not in text
    source = nbformat.read(course / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)
    lines = secret_lines(source)
    assert lines
    for line in lines:
        assert json.dumps(line)[1:-1] not in text, f"the release holds solution text: {line!r}"


def test_feedback_shows_no_hidden_test_and_no_solution_the_student_did_not_write(course):
    source = nbformat.read(course / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)
    release = (course / "assignments" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb").read_text()
    solution, judge = secret_lines(source), judge_lines()
    # one page per graded student, beside the copy of their own timestamp.txt (cyd has none): no judge.py
    files = sorted(str(p.relative_to(course / "feedback")) for p in (course / "feedback").rglob("*") if p.is_file())
    assert files == sorted([f"{s}/{ASSIGNMENT}/{ASSIGNMENT}.html" for s in ("ada", "bob", "cyd")] +
                           [f"{s}/{ASSIGNMENT}/timestamp.txt" for s in ("ada", "bob")])
    checked = {}
    for student in ("ada", "bob", "cyd"):
        shown = visible_text((course / "feedback" / student / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text())
        own = (course / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb").read_text()
        public = release + own  # what the student was given, and what they wrote themselves

        def is_public(line: str) -> bool:
            return json.dumps(line)[1:-1] in public

        for marker in SOLUTION_MARKERS:
            assert marker not in shown, f"{student}'s feedback shows {marker!r}"
        secret = [line for line in solution + judge if not is_public(line)]
        for line in secret:
            assert line not in shown, f"{student}'s feedback shows text the student did not write: {line!r}"
        checked[student] = secret
        # what the feedback does show: the late penalty (bob's only) and a failed cell's reason from its judge
        assert ("Late submission penalty" in shown) == (student == "bob"), student
        assert ("JudgeFailed" in shown) == (student == "cyd"), student
        if student == "ada":  # the check sees code at all: her own solution is shown to her
            assert any(line in shown for line in solution), "no solution line found in the solution's feedback"
    # not a vacuous check: the partial submission leaves solution lines unwritten, and judge.py is almost all secret
    assert set(solution) & set(checked["cyd"]) and len(set(judge) & set(checked["cyd"])) > len(judge) // 2
