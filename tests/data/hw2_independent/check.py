"""Check that honest hw2 submissions pass the notebook's visible tests.

Usage (from the repository root; one notebook at a time, in fast mode):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python tests/data/hw2_independent/check.py [student01 ... | PATH.py ...]

Each ``studentNN.py`` holds the code of hw2_flows' solution cells, each cell after a line
``# ---- cell: GRADE_ID ----``. The release (assignments/hw2_flows/hw2_flows.ipynb) is filled with them and
executed with nbclient, ``DGM_FAST=1``; the script prints, per student, the test cells that failed (none
for a correct submission) and the seconds it took, and exits 1 if any failed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
RELEASE = HERE.parents[2] / "assignments" / "hw2_flows" / "hw2_flows.ipynb"
MARKER = re.compile(r"^# ---- cell: (\w+) ----\n", re.M)


def read_cells(path: Path) -> dict[str, str]:
    """grade_id -> source of each solution cell written in ``path``."""
    parts = MARKER.split(path.read_text())
    return {grade_id: code.rstrip() + "\n" for grade_id, code in zip(parts[1::2], parts[2::2])}


def failures(student: Path) -> list[str]:
    """The grade_ids of the filled release's test cells (and other cells) that raised."""
    cells = read_cells(student)
    nb = nbformat.read(RELEASE, as_version=4)
    filled = set()
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if cell.cell_type == "code" and grade_id in cells:
            cell.source = cells[grade_id]
            filled.add(grade_id)
    missing = set(cells) - filled
    if missing:
        raise ValueError(f"{student.name}: no code cell of the release is named {sorted(missing)}")
    with tempfile.TemporaryDirectory() as work:
        client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": work}})
        client.execute()
    return [f"{cell.metadata.get('nbgrader', {}).get('grade_id', i)}: {out.get('ename')}: {out.get('evalue')}"
            for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


if __name__ == "__main__":
    os.environ.update(DGM_FAST="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    names = sys.argv[1:] or sorted(p.stem for p in HERE.glob("student*.py"))
    bad = 0
    for name in names:
        start = time.perf_counter()
        failed = failures(Path(name) if name.endswith(".py") else HERE / f"{name}.py")
        bad += bool(failed)
        print(f"{name}: {'ok' if not failed else 'FAILED ' + '; '.join(failed)} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    sys.exit(1 if bad else 0)
