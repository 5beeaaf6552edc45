"""The whole nbgrader pipeline, for every assignment in solutions/.

1. Regenerating assignments/ from solutions/ reproduces the committed release notebooks.
2. Autograding simulated submissions in a temporary course gives exactly the expected scores,
   per test cell and in the exported CSV (the untouched release scores zero). The "complete"
   submission is the release with every solution cell filled in; autograding restores the hidden
   tests, so its full score also shows that the solution notebook runs and passes every test.
3. No solution or hidden-test text appears in assignments/.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from nbhelpers import ASSIGNMENTS, ROOT, SOLUTION_MARKERS, autograded_points, make_course, max_points, nbg, solution_sources

# What each simulated submission must score on the autograded cells. "partial" fills in only the
# listed solution cells; "raises" is the full solution with `raising_cell` made to raise first.
EXPECTED = {
    "hw2_flows": {
        "partial_cells": {"coupling"},
        "raising_cell": "coupling",
        "scores": {
            "complete": {"test_round_trip": 2, "test_log_det": 3, "test_mask": 2, "test_bound": 3, "test_nll": 4},
            "blank": {},
            "partial": {"test_round_trip": 2, "test_log_det": 3, "test_mask": 2},
            "edited_tests": {},
            "raises": {"test_bound": 3},
        },
    },
    "hw3_vae": {
        "partial_cells": {"bounds"},
        "raising_cell": "bounds",
        "scores": {
            "complete": {"test_kl": 2, "test_elbo": 2, "test_iwae": 2, "test_q_agg": 2, "test_surgery": 2,
                         "test_vamp": 3, "test_nll": 4},
            "blank": {},
            "partial": {"test_kl": 2, "test_elbo": 2, "test_iwae": 2},
            "edited_tests": {},
            # the bounds are undefined, so training with -iwae fails too
            "raises": {"test_q_agg": 2, "test_surgery": 2, "test_vamp": 3},
        },
    },
    "hw5_neural_ode": {
        "partial_cells": {"adjoint"},
        "raising_cell": "adjoint",
        "scores": {
            "complete": {"test_augmented": 2, "test_adjoint": 3, "test_hutchinson": 3, "test_ffjord": 2,
                         "test_nll": 4},
            "blank": {},
            "partial": {"test_augmented": 2, "test_adjoint": 3},
            "edited_tests": {},
            # FFJORD uses only the student's Hutchinson estimator and dgmlib's adjoint
            "raises": {"test_hutchinson": 3, "test_ffjord": 2, "test_nll": 4},
        },
    },
    "hw6_diffusion": {
        "partial_cells": {"forward"},
        "raising_cell": "objective",
        "scores": {
            "complete": {"test_q_sample": 2, "test_posterior": 2, "test_l_simple": 2, "test_step": 2,
                         "test_toy": 4, "test_digits": 2},
            "blank": {},
            "partial": {"test_q_sample": 2, "test_posterior": 2},
            "edited_tests": {},
            # without l_simple and p_sample_step nothing can be trained or sampled
            "raises": {"test_q_sample": 2, "test_posterior": 2},
        },
    },
}

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


def _submission(kind: str, release, source, spec: dict):
    """Build one simulated student notebook from the release and source notebooks."""
    nb = copy.deepcopy(release)
    solutions = solution_sources(source)
    fill = {"complete": set(solutions), "raises": set(solutions), "partial": spec["partial_cells"]}.get(kind, set())
    for cell in nb.cells:
        meta = nbg(cell)
        if meta.get("solution") and meta["grade_id"] in fill:
            cell.source = solutions[meta["grade_id"]]
        if kind == "raises" and meta.get("grade_id") == spec["raising_cell"]:
            cell.source = 'raise RuntimeError("a bug in the student\'s cell")\n' + cell.source
        if kind == "edited_tests" and meta.get("grade") and not meta.get("solution"):
            cell.source = "pass  # the student deleted the tests"
    return nb


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
        # a line that is also public somewhere in the notebook (e.g. `with torch.no_grad():`) is no leak
        public = "\n".join(re.sub(r"### BEGIN (SOLUTION|HIDDEN TESTS).*?### END \1", "", cell.source, flags=re.S)
                           for cell in source.cells)
        for cell in source.cells:
            for region in re.findall(r"### BEGIN (?:SOLUTION|HIDDEN TESTS)(.*?)### END", cell.source, flags=re.S):
                for line in region.splitlines():
                    line = line.strip()
                    if len(line) > 12 and line not in public:
                        assert json.dumps(line)[1:-1] not in released, f"solution text leaked: {line!r}"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_autograde_gives_exact_scores(course, name):
    spec = EXPECTED[name]
    (notebook_file,) = sorted((ROOT / "solutions" / name).glob("*.ipynb"))
    source = nbformat.read(notebook_file, as_version=4)
    release = nbformat.read(course / "assignments" / name / notebook_file.name, as_version=4)
    for kind in spec["scores"]:
        folder = course / "submitted" / kind / name
        folder.mkdir(parents=True)
        nbformat.write(_submission(kind, release, source, spec), folder / notebook_file.name)
    nbgrader("autograde", name, "--force", cwd=course)
    nbgrader("export", "--to", "grades.csv", cwd=course)

    from nbgrader.api import Gradebook

    auto_cells = list(autograded_points(source))
    max_score = max_points(source)
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for kind, expected in spec["scores"].items():
            nb_sub = gb.find_submission_notebook(notebook_file.stem, name, kind)
            got = {cell: gb.find_grade(cell, notebook_file.stem, name, kind).score for cell in auto_cells}
            want = {cell: expected.get(cell, 0) for cell in auto_cells}
            assert got == want, f"{kind}: per-cell scores {got} != expected {want}"
            assert nb_sub.max_score == max_score

    with open(course / "grades.csv", newline="") as fh:
        rows = {row["student_id"]: row for row in csv.DictReader(fh) if row["assignment"] == name}
    assert set(rows) == set(spec["scores"])
    for kind, expected in spec["scores"].items():
        assert float(rows[kind]["score"]) == sum(expected.values()), kind
        assert float(rows[kind]["max_score"]) == max_score
    assert (course / "autograded" / "complete" / name / notebook_file.name).exists()


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_validate_reports_an_unsolved_release(course, name):
    """`nbgrader validate`, the self-check the README gives students, flags the blank release."""
    for nb_path in sorted((course / "assignments" / name).glob("*.ipynb")):
        out = subprocess.run([sys.executable, "-m", "nbgrader", "validate", str(nb_path)], cwd=course,
                             env=_env(), capture_output=True, text=True, timeout=600)
        assert "NotImplementedError" in out.stdout + out.stderr
