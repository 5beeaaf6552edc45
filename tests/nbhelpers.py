"""Helpers shared by the nbgrader tests: reading nbgrader metadata and making throw-away courses."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir())
SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")


def nbg(cell) -> dict:
    """A cell's nbgrader metadata ({} for cells nbgrader does not know, e.g. ones a student added)."""
    return cell.metadata.get("nbgrader", {})


def solution_sources(source_nb) -> dict[str, str]:
    """grade_id -> the reference answer of each solution cell, without the nbgrader markers."""
    return {nbg(c)["grade_id"]: "\n".join(line for line in c.source.splitlines() if line.strip() not in SOLUTION_MARKERS)
            for c in source_nb.cells if nbg(c).get("solution")}


def secret_lines(source_nb) -> list[str]:
    """The lines of a source notebook's solution and hidden-test regions that a release must not contain: those
    longer than 12 characters that appear nowhere outside the regions (``with torch.no_grad():`` is no secret)."""
    public = "\n".join(re.sub(r"### BEGIN (SOLUTION|HIDDEN TESTS).*?### END \1", "", cell.source, flags=re.S)
                       for cell in source_nb.cells)
    lines = []
    for cell in source_nb.cells:
        for region in re.findall(r"### BEGIN (?:SOLUTION|HIDDEN TESTS)(.*?)### END", cell.source, flags=re.S):
            lines += [line.strip() for line in region.splitlines()
                      if len(line.strip()) > 12 and line.strip() not in public]
    return lines

def autograded_points(source_nb) -> dict[str, float]:
    """grade_id -> points of every autograded (test) cell."""
    return {nbg(c)["grade_id"]: nbg(c).get("points", 0) for c in source_nb.cells
            if nbg(c).get("grade") and not nbg(c).get("solution")}


def max_points(source_nb) -> float:
    """All points of the notebook, the manually graded ones included."""
    return sum(nbg(c).get("points", 0) for c in source_nb.cells if nbg(c).get("grade"))


def make_course(root: Path) -> Path:
    """A throw-away nbgrader course in ``root``: the config and a copy of solutions/."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "nbgrader_config.py", root)
    shutil.copytree(ROOT / "solutions", root / "solutions")
    return root


def run_tagged_cells(path: Path, tag: str = "mechanism") -> dict:
    """Execute a notebook's code cells that carry ``tag`` (in order) and return their namespace.

    Lectures show a model's core inline, in cells tagged ``mechanism``; tests run exactly those cells
    and compare what they define with dgmlib on the same input, so the code a student reads is the
    code that runs. The tagged cells must import what they use and must not train anything.
    """
    import nbformat

    cells = [c for c in nbformat.read(path, as_version=4).cells
             if c.cell_type == "code" and tag in c.metadata.get("tags", [])]
    if not cells:
        raise ValueError(f"{path.name} has no code cell tagged {tag!r}")
    namespace: dict = {"__name__": f"{path.stem}_{tag}"}
    for cell in cells:
        exec(compile(cell.source, f"{path.name}[{tag}]", "exec"), namespace)  # noqa: S102 - our own notebook
    return namespace
