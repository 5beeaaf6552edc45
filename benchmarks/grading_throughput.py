"""Throughput of `dgm grade`: serial against parallel, and what the sandbox costs per submission.

Builds a throw-away course holding N copies of the full solution of an assignment (the slowest
honest submission: it trains in fast mode) and grades them all three ways in one run:

    jobs=1 with the sandbox, jobs=cores with the sandbox, jobs=1 without the sandbox.

    python benchmarks/grading_throughput.py --submissions 20 --assignment hw2_flows

Prints the wall times, the parallel speed-up and the sandbox's cost per submission.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import nbformat

from dgmlib.grading import classroom

ROOT = Path(__file__).resolve().parents[1]


def make_course(assignment: str, n: int) -> Path:
    course = Path(tempfile.mkdtemp(prefix="dgm-bench-course-"))
    shutil.copy(ROOT / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "solutions", course / "solutions")
    (source_path,) = sorted((ROOT / "solutions" / assignment).glob("*.ipynb"))
    nb = nbformat.read(source_path, as_version=4)
    for cell in nb.cells:  # a student's copy: solutions kept, hidden tests and markers removed
        cell.source = re.sub(r"### BEGIN HIDDEN TESTS.*?### END HIDDEN TESTS\n?", "", cell.source, flags=re.S)
        cell.source = "\n".join(line for line in cell.source.splitlines() if "### " not in line)
    for i in range(n):
        folder = course / "submitted" / f"student{i:03d}" / assignment
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / source_path.name)
    return course


def timed(assignment: str, course: Path, **kwargs) -> tuple[float, list]:
    for sub in ("autograded", "reports"):
        shutil.rmtree(course / sub, ignore_errors=True)
    (course / "gradebook.db").unlink(missing_ok=True)
    start = time.perf_counter()
    results = classroom.grade_assignment(assignment, course, **kwargs)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assignment", default="hw2_flows")
    parser.add_argument("--submissions", type=int, default=20)
    parser.add_argument("--skip-unsandboxed", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    course = make_course(args.assignment, args.submissions)
    runs = {"serial, sandboxed": dict(jobs=1), f"parallel ({cores} jobs), sandboxed": dict(jobs=cores)}
    if not args.skip_unsandboxed:
        runs["serial, no sandbox"] = dict(jobs=1, use_sandbox=False)
    times = {}
    for label, kwargs in runs.items():
        seconds, results = timed(args.assignment, course, **kwargs)
        scores = sorted({r.score for r in results})
        times[label] = seconds
        print(f"{label:<32} {seconds:7.1f} s  ({seconds / args.submissions:5.1f} s per submission, scores {scores})",
              flush=True)
    serial, parallel = times["serial, sandboxed"], times[f"parallel ({cores} jobs), sandboxed"]
    print(f"parallel speed-up on {cores} cores: {serial / parallel:.2f}x")
    if "serial, no sandbox" in times:
        cost = (serial - times["serial, no sandbox"]) / args.submissions
        print(f"sandbox cost: {cost:+.2f} s per submission "
              f"({100 * (serial / times['serial, no sandbox'] - 1):+.1f} % of the unsandboxed time)")
    shutil.rmtree(course, ignore_errors=True)


if __name__ == "__main__":
    main()
