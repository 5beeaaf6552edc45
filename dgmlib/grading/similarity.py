"""Near-copies among submissions, and of dgmlib or the solutions, found by winnowing.

The code is fingerprinted as MOSS does (Schleimer, Wilkerson and Aiken, "Winnowing: local algorithms for
document fingerprinting", SIGMOD 2003). ``copydetect``'s filter (``filter_code``, Pygments' tokeniser) turns it into a string in which
every name is replaced by its kind (so renaming variables does not hide a copy) and comments and whitespace are
dropped: a keyword stays as written, a name becomes one letter (``V``, ``F``). Every k-gram of ``_K``
characters of that filtered string is hashed (copydetect's unit; 25 characters span a few tokens), and winnowing keeps the rightmost minimum of every window of
``_WINDOW`` consecutive hashes: any common run of ``_K + _WINDOW - 1`` filtered characters is found. The hash is a fixed
function of the k-gram. ``copydetect``'s own fingerprints use Python's ``hash``, which is salted per process, so
its report changed from one run of ``dgm grade`` to the next (an honest hw2 student was reported against dgmlib in
some runs and not in others); here the same code gives the same report in every run. The similarity of A to B is the share of A's filtered characters that lie in k-grams of A whose
fingerprints B also has.

Each submission's code is its solution cells and the cells the student added. Code a student was given or
shown never counts as copied: every k-gram of the release's cells (signatures, stubs) and of the lectures'
code cells (``lectures/*.ipynb``, which the course teaches from and students may reuse) is left out of every
fingerprint, so blank submissions look like nothing and two students who reuse the same lecture code do not
look alike. Two submissions are compared as wholes: a pair is reported when either side's similarity reaches
``threshold``. Cells are not compared between submissions: short cells that call a given function with given
arguments look alike in every honest submission. A submission is compared with the solutions as a whole, and
reported when ``threshold`` of it is found there.

It is compared with each reference (dgmlib's source files) as a whole and cell by cell, so that one cell
copied from dgmlib is found among cells the student wrote: it is reported when the whole, or a cell, keeps at
least ``_MIN_CELL_CHARS`` filtered characters and ``threshold`` of them are found in the reference. For this comparison
every k-gram of the solutions is left out as well. The solutions are the course's reference implementation of
the very answers that dgmlib implements, and they share much of its code: the reference solution itself was
found "similar to dgmlib" in hw1, hw3, hw4 and hw5 before this rule. Code a submission shares with the
solutions is the solutions' (the comparison with them reports it); what is compared with dgmlib is the code
that is in neither the given code nor the solutions, so a cell pasted from dgmlib is still found by what dgmlib
has and the solution has not (its checks, its error messages, its own names of steps).

Measured on 17 honest, independently written hw2 submissions (``tests/data/hw2_independent``, with
``measure.py`` there; ``tests/test_similarity.py`` keeps it): 0 of their 136 pairs reported, and 0 of the 17
reported against dgmlib or the solutions, so a false-report rate of 0/136 pairs and 0/17 submissions; the
largest share of an honest pair is 0.45, of an honest submission in dgmlib 0.24 and in the solutions 0.41, against
the threshold of 0.6. Before these rules (copydetect's comparison, k = 15, the lectures not left out), 4 of the 17
were reported against dgmlib in at least one of 10 runs. Reports flag; they never change a score. Source: the course's issue 12.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from copydetect.utils import filter_code

from dgmlib.grading.review import split_cells
from dgmlib.grading.untrusted import read_notebook

__all__ = ["SimilarPair", "student_cells", "code_cells", "similar_pairs", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 0.6
"""Report a pair when at least 60 % of one side's code is found in the other."""

_K, _WINDOW = 25, 6  # copydetect's defaults: k-grams of 25 filtered characters, windows of 6: a common run of 30 is found
_MIN_CELL_CHARS = 40  # a cell this long (after the code left out) is compared with the references on its own
_BASE = np.uint64(1_000_003)  # of the polynomial hash of a k-gram (arithmetic modulo 2**64)
_NOTHING = np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class SimilarPair:
    """``first``'s code is ``first_share`` found in ``second``'s, and ``second``'s is ``second_share`` in ``first``'s."""

    first: str
    second: str
    first_share: float
    second_share: float


@dataclass(frozen=True)
class _Fingerprint:
    """The winnowed fingerprints of one piece of code: ``hashes`` and ``starts`` (where each k-gram starts, in
    filtered characters), both ``(n,)``, and how many characters the kept k-grams cover (``covered`` > 0)."""

    hashes: np.ndarray
    starts: np.ndarray
    covered: int


def student_cells(notebook_path: str | Path, instructor_cells: set[str] | None = None) -> list[str]:
    """The code a student wrote: the sources of their cells as ``review.split_cells`` finds them.

    Raises:
        UntrustedFileError, OSError, ValueError: if the notebook cannot be read safely or is not JSON.
    """
    students, _ = split_cells(read_notebook(notebook_path), instructor_cells)  # a regular file, capped
    return [source for _, _, source in students]


def code_cells(notebook_path: str | Path) -> list[str]:
    """The sources of every code cell of a notebook, e.g. a lecture's (read as ``untrusted.read_notebook`` reads).

    Raises:
        UntrustedFileError, OSError, ValueError: if the notebook cannot be read safely or is not JSON.
    """
    sources = [cell.get("source", "") for cell in read_notebook(notebook_path).get("cells", [])
               if isinstance(cell, dict) and cell.get("cell_type") == "code"]
    return ["".join(s) if isinstance(s, list) else str(s) for s in sources]


def _kgram_hashes(code: str) -> np.ndarray:
    """The hash of every k-gram of ``code`` filtered by ``copydetect`` (names replaced by their kind, comments and
    whitespace dropped), ``(max(0, T - _K + 1),)`` uint64 for a filtered string of T characters."""
    filtered, _ = filter_code(code, "code.py")  # the name picks copydetect's Python tokeniser
    points = np.frombuffer(filtered.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = len(points) - _K + 1
    if count <= 0:
        return _NOTHING
    hashes = np.zeros(count, dtype=np.uint64)
    for j in range(_K):  # sum_j points[i + j] * BASE ** (K - 1 - j), modulo 2**64
        hashes = hashes * _BASE + points[j:j + count]
    # splitmix64's finaliser mixes every bit, so that the minimum of a window is a fair draw
    hashes ^= hashes >> np.uint64(30)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(27)
    hashes *= np.uint64(0x94D049BB133111EB)
    hashes ^= hashes >> np.uint64(31)
    return hashes


def _all_kgrams(pieces: Sequence[str]) -> np.ndarray:
    """The sorted distinct hashes of every k-gram of every piece of code (each piece tokenised on its own)."""
    found = [_kgram_hashes(code) for code in pieces if code.strip()]
    return np.unique(np.concatenate(found)) if found else _NOTHING


def _covered(starts: np.ndarray) -> int:
    """How many filtered characters the k-grams starting at ``starts`` cover together."""
    if starts.size == 0:
        return 0
    starts = np.unique(starts)
    return int(np.minimum(np.diff(starts), _K).sum()) + _K


def _fingerprint(cells: Sequence[str], left_out: np.ndarray) -> _Fingerprint | None:
    """The fingerprints of one or more cells, each tokenised and winnowed on its own (no k-gram spans two cells;
    Schleimer et al. 2003, Sec. 3: the rightmost minimum of each window of ``_WINDOW`` hashes), less those in
    ``left_out`` (sorted hashes); None if nothing is left."""
    hashes, starts, offset = [], [], 0
    for code in cells:
        kgrams = _kgram_hashes(code)
        if kgrams.size == 0:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(kgrams, min(_WINDOW, kgrams.size))
        chosen = np.unique(np.arange(len(windows)) + windows.shape[1] - 1 - np.argmin(windows[:, ::-1], axis=1))
        chosen = chosen[~np.isin(kgrams[chosen], left_out)]
        hashes.append(kgrams[chosen])
        starts.append(chosen + offset)
        offset += kgrams.size + _K  # the next cell's k-grams never touch this one's
    if not hashes:
        return None
    fingerprint = _Fingerprint(np.concatenate(hashes), np.concatenate(starts), _covered(np.concatenate(starts)))
    return fingerprint if fingerprint.covered > 0 else None


def _share(a: _Fingerprint, b: _Fingerprint) -> float:
    """The share of ``a``'s filtered characters that lie in k-grams whose fingerprint ``b`` also has, in [0, 1]."""
    return _covered(a.starts[np.isin(a.hashes, b.hashes)]) / a.covered


def similar_pairs(submissions: dict[str, list[str]], references: dict[str, str] | None = None,
                  boilerplate: str | Sequence[str] = "", threshold: float = DEFAULT_THRESHOLD,
                  solutions: dict[str, list[str]] | None = None) -> list[SimilarPair]:
    """Pairs of near-copies: between submissions, and from a submission to a reference or a solution.

    Args:
        submissions: student id -> the code cells they wrote (``student_cells``).
        references: label (e.g. ``"dgmlib/flows.py"``) -> code that no submission, and no cell of one,
            should copy.
        boilerplate: code every student was given or shown, one string or one per cell (the release's cells,
            the lectures' code cells): none of its k-grams ever counts as copied.
        threshold: the share of one side's code (filtered characters) found in the other at which a pair is reported, in (0, 1].
        solutions: label (e.g. ``"solutions/hw2_flows"``) -> the solution cells, which no submission as a
            whole should copy. Their k-grams are also left out when a submission is compared with the
            references: code shared with the solutions is reported as the solutions', never as dgmlib's.

    Returns:
        the pairs, most similar first; for a reference or a solution the submission is ``first``; for a
        reference the shares are those of its most copied part (the whole, or one cell, each without the
        solutions' code) and of the reference.

    Raises:
        ValueError: if ``threshold`` is not in (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    given = _all_kgrams([boilerplate] if isinstance(boilerplate, str) else list(boilerplate))
    solution_cells = [cell for cells in (solutions or {}).values() for cell in cells]
    given_or_solved = np.union1d(given, _all_kgrams(solution_cells))

    wholes = {s: fp for s, cells in submissions.items() if (fp := _fingerprint(cells, given)) is not None}
    # compared with the references: the whole and each cell, without the solutions' code, if long enough
    parts = {s: [fp for piece in [submissions[s], *([cell] for cell in submissions[s])]
                 if (fp := _fingerprint(piece, given_or_solved)) is not None and fp.covered >= _MIN_CELL_CHARS]
             for s in wholes}
    refs = {r: fp for r, code in (references or {}).items() if (fp := _fingerprint([code], _NOTHING)) is not None}
    sols = {r: fp for r, cells in (solutions or {}).items() if (fp := _fingerprint(cells, given)) is not None}
    pairs = []
    names = sorted(wholes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            share_a, share_b = _share(wholes[a], wholes[b]), _share(wholes[b], wholes[a])
            if max(share_a, share_b) >= threshold:
                pairs.append(SimilarPair(a, b, share_a, share_b))
        for label, ref in refs.items():
            share_a, share_ref = max(((_share(part, ref), _share(ref, part)) for part in parts[a]), default=(0.0, 0.0))
            if share_a >= threshold:
                pairs.append(SimilarPair(a, label, share_a, share_ref))
        for label, sol in sols.items():
            share_a, share_sol = _share(wholes[a], sol), _share(sol, wholes[a])
            if share_a >= threshold:
                pairs.append(SimilarPair(a, label, share_a, share_sol))
    return sorted(pairs, key=lambda p: -max(p.first_share, p.second_share))
