"""Measure the similarity report of ``dgm grade`` on honest work: the 17 hw2 submissions of this folder,
and the reference solution of every assignment.

Usage (from the repository root):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python tests/data/hw2_independent/measure.py [--json]

Every submission is put in a throw-away course (``submitted/ID/ASSIGNMENT/ASSIGNMENT.ipynb``, next to copies of
``solutions/``, ``assignments/`` and ``lectures/``) and ``classroom._report_similar`` is called on it as
``dgm grade`` calls it, at the default threshold: what it reports is what the report would list. It is called
a second time with a threshold of 1e-9, to read the largest shares that stay below the threshold. Besides the 17
honest students (``studentNN``), the hw2 class holds two true copies: ``copy_dgmlib`` (student03 with its
coupling cell replaced by ``dgmlib.flows.AffineCoupling``, made to run) and ``renamed_copy`` (student05 with
its names renamed and its comments rewritten). The reference solution of each assignment is the release with
its solution cells filled from the source notebook (as ``tests/classroom_cases.py`` makes "honest").

The fingerprints are a fixed function of the code (``similarity._kgram_hashes``), so one run gives the numbers
that every run gives. Measured 2026-12-07: 0 of the 136 honest pairs reported, 0 of the 17 against dgmlib or the
solutions, largest shares 0.45 (a pair), 0.24 (in dgmlib), 0.41 (in the solutions); both copies reported; no
reference solution reported against dgmlib. Before (copydetect's own fingerprints, salted per process, k = 15, no
lecture code left out), over 10 processes: 0 honest pairs, but 4 of the 17 honest students reported against dgmlib
in at least one (largest share 0.67), and the reference solutions of hw1 and hw4 reported against dgmlib in all 10.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

from check import read_cells  # noqa: E402
from nbhelpers import ASSIGNMENTS, nbg, solution_sources  # noqa: E402

HW = "hw2_flows"


def fill(release, cells: dict[str, str]):
    """The release notebook with the given solution cells' sources replaced."""
    nb = copy.deepcopy(release)
    for cell in nb.cells:
        if cell.cell_type == "code" and nbg(cell).get("grade_id") in cells:
            cell.source = cells[nbg(cell)["grade_id"]]
    return nb


def copy_of_dgmlib() -> str:
    """dgmlib.flows.AffineCoupling's source as a student would paste it into the coupling cell, made to run."""
    source = (ROOT / "dgmlib" / "flows.py").read_text()
    start = source.index("class AffineCoupling(")
    code = source[start:source.index("\nclass ", start + 10)].rstrip() + "\n"
    return (code.replace("(Bijection)", "(flows.Bijection)").replace("_check_mask(mask)", "mask.float()")
            .replace("check_batch(", "flows.check_batch(").replace("Tensor", "torch.Tensor"))


RENAMES = {"kept": "cond_part", "log_scale": "ls", "shift": "offs", "batch_size": "n", "noise": "eps",
           "num_entries": "dim", "log_px": "lp", "correction": "const", "logit_layer": "pre", "coupling_layers": "cs",
           "index": "j", "parity": "par", "conditioner": "cnet", "composed": "chain", "uniform_bound_loss": "objective",
           "num_channels": "c", "identity": "eye", "lower_factor": "L", "upper_factor": "U", "diagonal": "d",
           "matrix_inverse": "inv_w", "matrix": "w", "height": "hh", "width": "ww", "log_det_one": "ld1",
           "variational_bound_loss": "vobjective"}


def renamed(cells: dict[str, str]) -> dict[str, str]:
    """The same code with its names renamed and every comment replaced: a copy that hides."""
    out = {}
    for grade_id, code in cells.items():
        for old, new in RENAMES.items():
            code = re.sub(rf"(?<![.\w]){old}\b", new, code)
        out[grade_id] = re.sub(r"#.*", "# my own work", code)
    return out


def course_with(folder: Path, classes: dict[str, dict[str, dict[str, str]]]) -> Path:
    """A course in ``folder``: the instructor's folders, and ``classes[assignment][student]`` submitted."""
    for name in ("solutions", "assignments", "lectures"):
        shutil.copytree(ROOT / name, folder / name)
    for hw, students in classes.items():
        release = nbformat.read(ROOT / "assignments" / hw / f"{hw}.ipynb", as_version=4)
        for student, cells in students.items():
            (folder / "submitted" / student / hw).mkdir(parents=True)
            nbformat.write(fill(release, cells), folder / "submitted" / student / hw / f"{hw}.ipynb")
    return folder


def report(course: Path, hw: str, students: list[str], threshold: float):
    """What ``_report_similar`` notes per student, and the pairs that ``similar_pairs`` returned to it."""
    from dgmlib.grading import classroom, similarity

    source = nbformat.read(course / "solutions" / hw / f"{hw}.ipynb", as_version=4)
    results = [classroom.StudentResult(s) for s in students]
    seen = []
    original = similarity.similar_pairs

    def spy(*args, **kwargs):
        seen.extend(pairs := original(*args, **kwargs))
        return pairs

    similarity.similar_pairs = spy
    try:
        classroom._report_similar(course, hw, results, threshold, classroom._instructor_cells(source))
    finally:
        similarity.similar_pairs = original
    return {r.student: r.similar for r in results}, seen


def measure_once() -> dict:
    honest = {p.stem: read_cells(p) for p in sorted(HERE.glob("student*.py"))}
    copies = {"copy_dgmlib": {**honest["student03"], "coupling": copy_of_dgmlib()},
              "renamed_copy": renamed(honest["student05"])}
    references = {hw: {"reference": solution_sources(nbformat.read(ROOT / "solutions" / hw / f"{hw}.ipynb", 4))}
                  for hw in ASSIGNMENTS}
    with tempfile.TemporaryDirectory() as tmp:
        course = course_with(Path(tmp), {**references, HW: {**honest, **copies, **references[HW]}})
        noted, _ = report(course, HW, [*honest, *copies], 0.6)
        _, every = report(course, HW, list(honest), 1e-9)
        solutions = {hw: report(course, hw, ["reference"], 0.6)[0]["reference"] for hw in ASSIGNMENTS}
    names = set(honest)
    among = [p for p in every if p.first in names and p.second in names]
    against = {kind: [p for p in every if p.first in names and p.second.startswith(kind)]
               for kind in ("dgmlib/", "solutions/")}
    label = lambda s: s.split(" (")[0]  # noqa: E731
    return {
        "honest_pairs_reported": sorted({tuple(sorted((s, label(o)))) for s in names for o in noted[s]
                                         if label(o) in names}),
        "honest_vs_dgmlib": sorted({(s, label(o)) for s in names for o in noted[s] if o.startswith("dgmlib/")}),
        "honest_vs_solutions": sorted({(s, label(o)) for s in names for o in noted[s] if o.startswith("solutions/")}),
        "largest_share_among_honest": max((max(p.first_share, p.second_share) for p in among), default=0.0),
        "largest_share_honest_vs_dgmlib": max((p.first_share for p in against["dgmlib/"]), default=0.0),
        "largest_share_honest_vs_solutions": max((p.first_share for p in against["solutions/"]), default=0.0),
        "copy_dgmlib": [label(o) for o in noted["copy_dgmlib"]],
        "renamed_copy": [label(o) for o in noted["renamed_copy"]],
        "reference_solutions_vs_dgmlib": {hw: [label(o) for o in notes if o.startswith("dgmlib/")]
                                          for hw, notes in solutions.items()},
        "reference_solutions_vs_solutions": {hw: [label(o) for o in notes if o.startswith("solutions/")]
                                             for hw, notes in solutions.items()},
    }


if __name__ == "__main__":
    r = measure_once()
    print(json.dumps(r, indent=1) if "--json" in sys.argv else
          f"honest pairs reported: {len(r['honest_pairs_reported'])}/136 {r['honest_pairs_reported']}\n"
          f"honest students reported against dgmlib: {len({s for s, _ in r['honest_vs_dgmlib']})}/17 "
          f"{r['honest_vs_dgmlib']}\n"
          f"honest students reported against the solutions: {len({s for s, _ in r['honest_vs_solutions']})}/17 "
          f"{r['honest_vs_solutions']}\n"
          f"largest shares: {r['largest_share_among_honest']:.2f} among honest, "
          f"{r['largest_share_honest_vs_dgmlib']:.2f} in dgmlib, {r['largest_share_honest_vs_solutions']:.2f} "
          f"in the solutions\n"
          f"copy_dgmlib reported against: {r['copy_dgmlib']}\nrenamed_copy reported against: {r['renamed_copy']}\n"
          f"reference solutions reported against dgmlib: "
          f"{ {hw: v for hw, v in r['reference_solutions_vs_dgmlib'].items() if v} }\n"
          f"reference solutions reported against their solutions: "
          f"{all(r['reference_solutions_vs_solutions'].values())}")
