"""Near-copies among submissions, and of dgmlib or the solutions, found with copydetect.

``copydetect`` fingerprints code as MOSS does (Schleimer, Wilkerson and Aiken, "Winnowing: local
algorithms for document fingerprinting", SIGMOD 2003): it tokenises the code, replaces names by
their kind (so renaming variables does not hide a copy), hashes every k-gram of tokens and keeps the
minimum hash of each window. The similarity of A to B is the fraction of A's tokens that lie in
k-grams found in B.

Each submission's code is its solution cells and the cells the student added. The code the release
already gives (function signatures, stubs) is removed as boilerplate, so blank submissions look like
nothing. A pair is reported when either side's similarity reaches ``threshold``. Reports flag; they
never change a score. Source: the course's issue 12.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from copydetect import CodeFingerprint, compare_files

__all__ = ["SimilarPair", "student_code", "similar_pairs", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 0.6
"""Report a pair when at least 60 % of one side's code is found in the other."""

_K, _WINDOW = 15, 4  # k-grams of 15 tokens, winnowing windows of 4: any copied run of 18 tokens is found


@dataclass(frozen=True)
class SimilarPair:
    """``first``'s code is ``first_share`` found in ``second``'s, and ``second``'s is ``second_share`` in ``first``'s."""

    first: str
    second: str
    first_share: float
    second_share: float


def student_code(notebook_path: str | Path) -> str:
    """The code a student wrote: the solution cells and the cells they added, joined by blank lines."""
    nb = json.loads(Path(notebook_path).read_text())
    parts = []
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.get("cell_type") == "code" and (not meta or meta.get("solution", False)):
            source = cell.get("source", "")
            parts.append("".join(source) if isinstance(source, list) else source)
    return "\n\n".join(parts) + "\n"


def _fingerprint(label: str, code: str, boilerplate: list[int]) -> CodeFingerprint | None:
    # CodeFingerprint chooses its tokenizer from the name, which must end in .py
    fp = CodeFingerprint(f"{label}.py", _K, _WINDOW, boilerplate=boilerplate, fp=io.StringIO(code))
    return fp if fp.token_coverage > 0 else None


def similar_pairs(submissions: dict[str, str], references: dict[str, str] | None = None, boilerplate: str = "",
                  threshold: float = DEFAULT_THRESHOLD) -> list[SimilarPair]:
    """Pairs of near-copies: between submissions, and from a submission to a reference.

    Args:
        submissions: student id -> their code (``student_code``).
        references: label (e.g. ``"dgmlib/flows.py"``, ``"solutions/hw2_flows"``) -> code that no
            submission should copy.
        boilerplate: code the release gives every student; it never counts as copied.
        threshold: the share of one side's tokens found in the other at which a pair is reported, in
            (0, 1].

    Returns:
        the pairs, most similar first; for a reference the student is ``first``.

    Raises:
        ValueError: if ``threshold`` is not in (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    template = _fingerprint("boilerplate", boilerplate, []) if boilerplate.strip() else None
    base = list(template.hashes) if template is not None else []
    students = {s: fp for s, code in submissions.items() if (fp := _fingerprint(s, code, base)) is not None}
    refs = {r: fp for r, code in (references or {}).items() if (fp := _fingerprint(r, code, base)) is not None}
    pairs = []
    names = sorted(students)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            _, (share_a, share_b), _ = compare_files(students[a], students[b])
            if max(share_a, share_b) >= threshold:
                pairs.append(SimilarPair(a, b, float(share_a), float(share_b)))
        for label, ref in refs.items():
            _, (share_a, share_ref), _ = compare_files(students[a], ref)
            if share_a >= threshold:
                pairs.append(SimilarPair(a, label, float(share_a), float(share_ref)))
    return sorted(pairs, key=lambda p: -max(p.first_share, p.second_share))
