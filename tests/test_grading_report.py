"""`dgm grade`'s report at a glance, and what "not attempted" means; no nbgrader run (the class tests do that)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nbformat
import pytest

from dgmlib.grading import classroom
from dgmlib.grading.classroom import StudentResult, format_report, score_line
from nbhelpers import nbg

ROOT = Path(__file__).resolve().parents[1]


def test_score_at_a_glance():
    pending = StudentResult("a", score=25, max_score=27, auto_score=25, auto_max=25, manual_max=2, manual_pending=2)
    assert score_line(pending) == "auto 25/25, manual 2 pending"
    half = StudentResult("b", score=25.5, max_score=27, auto_score=25, auto_max=25, manual_score=0.5, manual_max=2,
                         manual_pending=1)
    assert score_line(half) == "auto 25/25, manual 0.5/1, 1 pending"
    done = StudentResult("c", score=26.5, max_score=27, auto_score=25, auto_max=25, manual_score=1.5, manual_max=2)
    assert score_line(done) == "26.5/27 (auto 25/25, manual 1.5/2)"
    auto_only = StudentResult("d", score=14, max_score=16, auto_score=14, auto_max=16)
    assert score_line(auto_only) == "auto 14/16"
    blank = StudentResult("e", max_score=27, auto_max=25, manual_max=2, manual_pending=2, not_attempted=True,
                          crashed=[f"test_{i} (NotImplementedError)" for i in range(27)])
    assert score_line(blank) == "not attempted"
    assert score_line(StudentResult("f", failure="the kernel died")) == "failed"


def test_report_counts_and_plurals():
    one = format_report("hw1", [StudentResult("s1", auto_score=3, auto_max=3)])
    assert one.splitlines()[0] == "hw1: 1 submission"
    blank = StudentResult("s2", not_attempted=True, crashed=["test_a (NotImplementedError)"],
                          unverified=["test_a (judge: no answer)"])
    pending = StudentResult("s3", auto_score=25, auto_max=25, manual_max=2, manual_pending=2)
    copied = StudentResult("s4", auto_score=25, auto_max=25, manual_max=2, manual_pending=2,
                           similar=["s3 (90% of this code, 80% of theirs)"])
    report = format_report("hw1", [blank, pending, copied])
    assert report.splitlines()[0] == ("hw1: 3 submissions, 1 not attempted, 1 with near-copies to review, "
                                      "manual grading pending for 2 students")
    # a blank submission is one line: nothing cell by cell
    assert [line for line in report.splitlines() if line.startswith("s2")] == [line for line in report.splitlines()
                                                                                if "s2" in line]
    assert "NotImplementedError" not in report and "judge" not in report
    assert "similar to s3" in report


def _release_and_source(name: str = "hw2_flows") -> tuple[nbformat.NotebookNode, dict]:
    release = nbformat.read(ROOT / "assignments" / name / f"{name}.ipynb", as_version=4)
    source = json.loads((ROOT / "solutions" / name / f"{name}.ipynb").read_text())
    return release, source


@pytest.mark.parametrize("change", ["nothing", "the fast switch", "a solution cell", "an added cell",
                                    "code under the fast switch's comment", "code in the fast switch",
                                    "a written answer"])
def test_not_attempted(tmp_path, change):
    release, source = _release_and_source()
    cells = {"hw2_flows": classroom._instructor_cells(source)}
    submission = copy.deepcopy(release)
    if change == "the fast switch":
        switch = next(c for c in submission.cells if c.get("id") == "fast_switch")
        switch.source = switch.source.replace("FAST = fast_mode()", "FAST = True")
    elif change == "a solution cell":
        cell = next(c for c in submission.cells if c.metadata.get("nbgrader", {}).get("solution"))
        cell.source += "\nx = 1\n"
    elif change == "an added cell":
        submission.cells.append(nbformat.v4.new_code_cell("print('my own scratch work')"))
    elif change == "code under the fast switch's comment":  # a student's whole solution, disguised by its comment
        submission.cells.append(nbformat.v4.new_code_cell("# The fast switch.\nclass AffineCoupling: pass\n"))
    elif change == "code in the fast switch":
        switch = next(c for c in submission.cells if c.get("id") == "fast_switch")
        switch.source += "\nimport os\n"
    elif change == "a written answer":  # the written answer alone is an attempt: its points wait for a grader
        cell = next(c for c in submission.cells if c.cell_type == "markdown" and nbg(c).get("solution"))
        cell.source = "Because the Jacobian is triangular."
    nbformat.write(submission, tmp_path / "hw2_flows.ipynb")
    expected = change in ("nothing", "the fast switch")
    assert classroom._not_attempted(tmp_path, {"hw2_flows": json.loads(nbformat.writes(release))}, cells) is expected


def test_crashes_are_grouped_and_a_crash_explains_its_judges_zero():
    partial = StudentResult("s5", auto_score=7, auto_max=25, manual_max=2, manual_pending=2,
                            crashed=["test_bound (NotImplementedError)", "train (NotImplementedError)",
                                     "plots (NameError)", "test_nll (NameError)"],
                            unverified=["test_bound (judge: the test cell's probe never reached the grader's judge)",
                                        "test_nll (judge: the test cell's probe never reached the grader's judge)",
                                        "test_mask (judge: 2 of 5 values are wrong)"])
    notes = [line.strip() for line in format_report("hw2", [partial]).splitlines()[4:]]
    assert notes == ["unsolved (NotImplementedError): test_bound, train", "crashed (NameError): plots, test_nll",
                     "scored 0 by the judge: test_mask (judge: 2 of 5 values are wrong)"]
