"""The similarity report of ``dgm grade`` (``dgmlib.grading.similarity``): winnowing's guarantee, the same report in
every process, code the course gives or shows never counted as copied, the reference solutions never reported as
copies of dgmlib, and the false-report rate on 17 independently written hw2 submissions (``tests/data/hw2_independent``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dgmlib.grading import similarity
from nbhelpers import ASSIGNMENTS, ROOT, solution_sources

HONEST = sorted((ROOT / "tests" / "data" / "hw2_independent").glob("student*.py"))
DGMLIB = {f"dgmlib/{p.relative_to(ROOT / 'dgmlib').as_posix()}": p.read_text()
          for p in sorted((ROOT / "dgmlib").rglob("*.py"))}


def _own_code(seed: int, lines: int = 12) -> str:
    """A function no one else wrote: arithmetic whose constants and operators depend on ``seed``."""
    ops = ["+", "-", "*", "//", "%"]
    body = "\n".join(f"    v{i} = v{i - 1} {ops[(seed * 7 + i) % 5]} {seed * 13 + i * 3 + 1}" for i in range(1, lines))
    return f"def f{seed}(v0):\n{body}\n    return v{lines - 1}\n"


def _cells(path: Path) -> list[str]:
    sys.path.insert(0, str(path.parent))
    try:
        from check import read_cells
    finally:
        sys.path.remove(str(path.parent))
    return list(read_cells(path).values())


def test_fingerprints_are_the_same_in_every_process():
    """Python's ``hash`` is salted per process; the fingerprints must not be, or two runs would report differently."""
    code = "print(sum(i * i for i in range(10)))\n" * 4
    script = f"from dgmlib.grading import similarity; print(similarity._kgram_hashes({code!r}).tolist())"
    outputs = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                              capture_output=True, text=True, check=True).stdout for seed in (0, 1, 2)}
    assert len(outputs) == 1 and outputs.pop().strip() not in ("", "[]")


def test_any_common_run_of_k_plus_w_minus_1_characters_is_found():
    """Winnowing's guarantee (Schleimer et al. 2003, Sec. 3): a shared run of ``_K + _WINDOW - 1`` filtered characters always
    leaves a common fingerprint, wherever it sits between different code."""
    shared = "total = alpha * beta + gamma - delta / epsilon\nresult = max(total, 0)\n" * 2
    for seed in range(8):
        a = similarity._fingerprint([_own_code(seed) + shared + _own_code(seed + 100)], similarity._NOTHING)
        b = similarity._fingerprint([_own_code(seed + 200, 5) + shared], similarity._NOTHING)
        assert a is not None and b is not None
        assert similarity._share(a, b) > 0 and similarity._share(b, a) > 0


def test_code_given_or_shown_never_counts_as_copied():
    """Two students who reuse the same lecture cell, each with code of their own, are not reported; without the
    lecture as boilerplate they are."""
    lecture_cell = _own_code(1, 40)
    submissions = {"ann": [lecture_cell, _own_code(2)], "bob": [_own_code(3), lecture_cell]}
    assert similarity.similar_pairs(submissions, boilerplate=[lecture_cell]) == []
    assert {(p.first, p.second) for p in similarity.similar_pairs(submissions)} == {("ann", "bob")}


def test_a_blank_submission_is_similar_to_nothing():
    """A submission that only repeats the release (signatures, stubs) has no fingerprint left."""
    release = ["def coupling(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n", _own_code(5, 30)]
    pairs = similarity.similar_pairs({"blank": release, "also_blank": list(release), "own": [_own_code(6, 30)]},
                                     {"dgmlib/x.py": release[1]}, boilerplate=release,
                                     solutions={"solutions/hw": release})
    assert pairs == []


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_the_reference_solution_is_not_reported_as_a_copy_of_dgmlib(name):
    """The solutions implement the answers that dgmlib implements; their shared code is the solutions' own, and the
    reference solution is reported against the solutions only."""
    source = nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)
    release = nbformat.read(ROOT / "assignments" / name / f"{name}.ipynb", as_version=4)
    reference = list(solution_sources(source).values())
    given = [c.source for c in release.cells if c.cell_type == "code"]
    pairs = similarity.similar_pairs({"reference": reference}, DGMLIB, given,
                                     solutions={f"solutions/{name}": reference})
    assert [p.second for p in pairs] == [f"solutions/{name}"]


def test_no_false_report_among_17_independent_hw2_submissions():
    """Measured: of the 136 pairs of 17 honest, independently written hw2 submissions, none is reported, and none of
    them against dgmlib or the solutions, with the release and every lecture's code as boilerplate as ``dgm grade``
    has it. True copies among them are still found: a renamed copy, and a cell pasted from dgmlib."""
    assert len(HONEST) == 17
    honest = {p.stem: _cells(p) for p in HONEST}
    name = "hw2_flows"
    source = nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)
    release = nbformat.read(ROOT / "assignments" / name / f"{name}.ipynb", as_version=4)
    given = [c.source for c in release.cells if c.cell_type == "code"]
    for lecture in sorted((ROOT / "lectures").glob("*.ipynb")):
        given += similarity.code_cells(lecture)
    solutions = {f"solutions/{name}": list(solution_sources(source).values())}

    pairs = similarity.similar_pairs(honest, DGMLIB, given, solutions=solutions)
    assert pairs == [], [(p.first, p.second, round(p.first_share, 2)) for p in pairs]

    flows = DGMLIB["dgmlib/flows.py"]
    start = flows.index("class AffineCoupling(")
    pasted = flows[start:flows.index("\nclass ", start + 10)]
    renamed = [cell.replace("log_det", "ld").replace("mask", "m").replace("self.net", "self.g") for cell in honest["student05"]]
    copies = {"student05": honest["student05"], "renamed": renamed, "pasted": [*honest["student03"][1:], pasted]}
    found = {(p.first, p.second) for p in similarity.similar_pairs(copies, DGMLIB, given, solutions=solutions)}
    assert ("renamed", "student05") in found or ("student05", "renamed") in found
    assert ("pasted", "dgmlib/flows.py") in found
