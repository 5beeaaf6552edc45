"""Run every judge of an assignment against its own reference solution at many secret seeds, and report failures.

A judge draws its inputs and parameters from a secret seed per submission. A check that holds for the reference at
most seeds but not all (a log-det that is nearly 0 at one draw, a ReLU head that is dead on every input drawn) costs
some honest students their points by bad luck, in proportion to the class. This audit finds such checks; the suite
runs each judge at one seed per class only.

Usage (from the repository root; a few minutes per assignment on 2 cores):
    OMP_NUM_THREADS=2 python tests/audit_judges.py hw1_autoregressive [SEEDS=300] [SECONDS_PER_JUDGE=30]

The source notebook's code cells run here in fast mode (``DGM_FAST=1``), in order, with each test cell's
``grading.probe(name, **exposed)`` replaced by a call that records ``exposed``; then each judge of
``solutions/NAME/judge.py`` runs through ``judge.judge_locally`` on the recorded objects at seeds 0, 1, ... until
``SEEDS`` or ``SECONDS_PER_JUDGE``. Judges of trained models see one training (the notebook's) at every seed.

Measured 2026-12-07 (300 seeds or 30 s per judge): every judge of hw2-hw6 passed its reference at every seed
tried; hw1's ``test_blind_spot`` failed the reference at 3 of 300 seeds and hw2's ``test_log_det`` at 6 of 3000,
both fixed since (0 of 1000 and 0 of 3000). hw7 (100 seeds per judge, 150 s for its two trained-model judges): every
judge passed its reference at every seed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ["DGM_FAST"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]


def recorded_probes(name: str) -> dict[str, dict]:
    """grade_id -> the objects each test cell of ``solutions/NAME/NAME.ipynb`` exposes to its judge."""
    folder = ROOT / "solutions" / name
    recorded: dict[str, dict] = {}

    def record(grade_id: str, **exposed) -> None:
        recorded[grade_id] = exposed

    namespace = {"__name__": "__main__", "__record__": record}
    cwd = os.getcwd()
    os.chdir(folder)  # the notebook's relative paths
    try:
        for cell in json.loads((folder / f"{name}.ipynb").read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            grade_id = cell["metadata"].get("nbgrader", {}).get("grade_id", "?")
            source = "".join(cell["source"]).replace("grading.probe(", "__record__(")
            try:
                exec(compile(source, grade_id, "exec"), namespace)  # noqa: S102 - the instructor's notebook
            except Exception as error:  # noqa: BLE001 - reported, and the audit goes on
                print(f"cell {grade_id} raised {type(error).__name__}: {error}", flush=True)
    finally:
        os.chdir(cwd)
        import matplotlib.pyplot as plt

        plt.close("all")
    return recorded


def main(argv: list[str]) -> int:
    from dgmlib.grading.judge import judge_locally, load_judges

    name = argv[0]
    seeds = int(argv[1]) if len(argv) > 1 else 300
    budget = float(argv[2]) if len(argv) > 2 else 30.0
    start = time.perf_counter()
    probes = recorded_probes(name)
    print(f"{name}: the notebook ran in {time.perf_counter() - start:.0f} s; probes: {sorted(probes)}", flush=True)
    judges = load_judges(ROOT / "solutions" / name / "judge.py")
    bad = 0
    for grade_id in sorted(probes):
        start, tried, failures = time.perf_counter(), 0, []
        for seed in range(seeds):
            passed, message = judge_locally(judges[grade_id], probes[grade_id], seed=seed)
            tried += 1
            if not passed:
                failures.append((seed, message[:160]))
            if time.perf_counter() - start > budget:
                break
        bad += bool(failures)
        print(f"{grade_id}: {len(failures)}/{tried} seeds fail the reference ({time.perf_counter() - start:.0f} s)"
              + (f"; first: {failures[:3]}" if failures else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
