"""Near-copies among submissions, and of dgmlib or the solutions, found with copydetect.

``copydetect`` fingerprints code as MOSS does (Schleimer, Wilkerson and Aiken, "Winnowing: local
algorithms for document fingerprinting", SIGMOD 2003): it tokenises the code, replaces names by
their kind (so renaming variables does not hide a copy), hashes every k-gram of tokens and keeps the
minimum hash of each window. The similarity of A to B is the fraction of A's tokens that lie in
k-grams found in B.

Each submission's code is its solution cells and the cells the student added. The code the release
already gives (function signatures, stubs) is removed as boilerplate, so blank submissions look like
nothing. Two submissions are compared as wholes: a pair is reported when either side's similarity
reaches ``threshold``. A submission is compared with the solutions as a whole, and reported when
``threshold`` of it is found there. It is compared with each reference (dgmlib's source files) as a
whole and cell by cell, so that one cell copied from dgmlib
is found among cells the student wrote: it is reported when the whole, or any cell of at least
``_MIN_CELL_TOKENS`` tokens, is ``threshold`` found in the reference. Cells are not compared between
submissions: short cells that call a given function with given arguments look alike in every
honest submission. Reports flag; they never change a score. Source: the course's issue 12.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from copydetect import CodeFingerprint, compare_files

from dgmlib.grading.review import split_cells
from dgmlib.grading.untrusted import read_notebook

__all__ = ["SimilarPair", "student_cells", "similar_pairs", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 0.6
"""Report a pair when at least 60 % of one side's code is found in the other."""

_K, _WINDOW = 15, 4  # k-grams of 15 tokens, winnowing windows of 4: any copied run of 18 tokens is found
_MIN_CELL_TOKENS = 40  # a cell this long (after the boilerplate) is compared with the references on its own


@dataclass(frozen=True)
class SimilarPair:
    """``first``'s code is ``first_share`` found in ``second``'s, and ``second``'s is ``second_share`` in ``first``'s."""

    first: str
    second: str
    first_share: float
    second_share: float


def student_cells(notebook_path: str | Path, instructor_cells: set[str] | None = None) -> list[str]:
    """The code a student wrote: the sources of their cells as ``review.split_cells`` finds them."""
    students, _ = split_cells(read_notebook(notebook_path), instructor_cells)  # a regular file, capped
    return [source for _, _, source in students]


def _fingerprint(label: str, code: str, boilerplate: list[int]) -> CodeFingerprint | None:
    # CodeFingerprint chooses its tokenizer from the name, which must end in .py
    fp = CodeFingerprint(f"{label}.py", _K, _WINDOW, boilerplate=boilerplate, fp=io.StringIO(code))
    return fp if fp.token_coverage > 0 else None


def similar_pairs(submissions: dict[str, list[str]], references: dict[str, str] | None = None,
                  boilerplate: str = "", threshold: float = DEFAULT_THRESHOLD,
                  solutions: dict[str, list[str]] | None = None) -> list[SimilarPair]:
    """Pairs of near-copies: between submissions, and from a submission to a reference or a solution.

    Args:
        submissions: student id -> the code cells they wrote (``student_cells``).
        references: label (e.g. ``"dgmlib/flows.py"``) -> code that no submission, and no cell of one,
            should copy.
        solutions: label (e.g. ``"solutions/hw2_flows"``) -> the solution cells, which no submission as
            a whole should copy.
        boilerplate: code the release gives every student; it never counts as copied.
        threshold: the share of one side's tokens found in the other at which a pair is reported, in
            (0, 1].

    Returns:
        the pairs, most similar first; for a reference or a solution the submission is ``first``; for a
        reference the shares are those of its most copied part (the whole, or one cell) and of the
        reference.

    Raises:
        ValueError: if ``threshold`` is not in (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    template = _fingerprint("boilerplate", boilerplate, []) if boilerplate.strip() else None
    base = list(template.hashes) if template is not None else []
    wholes = {s: fp for s, cells in submissions.items()
              if (fp := _fingerprint(s, "\n\n".join(cells) + "\n", base)) is not None}
    parts = {s: [fp for i, cell in enumerate(submissions[s])
                 if (fp := _fingerprint(f"{s}-{i}", cell, base)) is not None and fp.token_coverage >= _MIN_CELL_TOKENS]
             for s in wholes}
    refs = {r: fp for r, code in (references or {}).items() if (fp := _fingerprint(r, code, [])) is not None}
    sols = {r: fp for r, cells in (solutions or {}).items()
            if (fp := _fingerprint(r, "\n\n".join(cells) + "\n", base)) is not None}
    pairs = []
    names = sorted(wholes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            _, (share_a, share_b), _ = compare_files(wholes[a], wholes[b])
            if max(share_a, share_b) >= threshold:
                pairs.append(SimilarPair(a, b, float(share_a), float(share_b)))
        for label, ref in refs.items():
            share_a, share_ref = max(compare_files(part, ref)[1] for part in [wholes[a], *parts[a]])
            if share_a >= threshold:
                pairs.append(SimilarPair(a, label, float(share_a), float(share_ref)))
        for label, sol in sols.items():
            _, (share_a, share_sol), _ = compare_files(wholes[a], sol)
            if share_a >= threshold:
                pairs.append(SimilarPair(a, label, float(share_a), float(share_sol)))
    return sorted(pairs, key=lambda p: -max(p.first_share, p.second_share))
