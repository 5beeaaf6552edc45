"""Every model's NLL that the lectures quote comes from one source: the README's *Results* tables.

The README's tables are the output of ``dgm results runs/full --details``. When they are regenerated with new
numbers, these tests fail until the lectures (and ``docs/training.md``) quote the new ones.

How the lectures quote a figure, so that this file can check it without guessing:

* A figure is a number followed by its unit, ``nats`` (``nats/image``, ``nats per image``, ``nats/point``) or
  ``bits/dim``; a list of numbers ending with one unit (``86.5, 86.1 and 85.3 nats``) gives each of them that unit.
  A number written inside maths (``$64 \\ln 17 = 181.33$``) is the result of the arithmetic shown there and is not
  checked; a course model's measured figure is never written inside maths.
* **Prose.** A sentence that quotes a figure names the registry model in code font, as ``realnvp`` or as a
  command, ``dgm train vae --decoder dlogistic`` (the options narrow the README rows to those with
  ``decoder=dlogistic``, ``--data`` to the data). Each figure of the sentence must equal, to the digits it shows,
  a figure with the same unit in a README row of a model the sentence names.
* **Tables.** A lecture table with a ``model`` column holds registry names there (an ``options`` column narrows
  the rows, as above); each number in a column whose heading says ``nats`` or ``bits/dim`` must equal a README
  figure of that row's model in that unit. A row whose model is not in the registry (the uniform distribution,
  say) writes its numbers in maths. Other tables are read row by row as prose.
* A figure that is not a README figure is listed below with its reason: in ``DERIVED`` when it is computed from
  README figures (the test recomputes it), in ``EXEMPT`` otherwise (a paper's figure, a notebook's own run).
  Every entry must still be used.

"Equal to the digits it shows": a quote ``q`` with ``d`` decimals matches a README figure ``f`` with ``e`` decimals
when ``|q - f| <= (10^-d + 10^-e) / 2``, the largest difference that rounding both can explain.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
LECTURES = sorted((ROOT / "lectures").glob("*.ipynb"))
DOCS = [ROOT / "docs" / "training.md"]  # the guide that quotes results; the others quote no README figure
REGISTRY = set(json.loads((ROOT / "dgmlib" / "catalog.json").read_text()))

NUM = r"\d+(?:\.\d+)?"
ITEM = rf"{NUM}(?:\s*±\s*{NUM})?"
SEP = r"(?:\s*,\s*(?:and\s+|or\s+)?|\s+and\s+|\s+or\s+|\s*→\s*|\s+to\s+|\s*/\s*)"
UNIT = r"(nats|bits/dim|bits per dim)"
FIGURES = re.compile(rf"(?<![\w.]){ITEM}(?:{SEP}{ITEM})*\s+{UNIT}")
NUMBER = re.compile(rf"(?<![\w.]){NUM}(?![\w])")
COMMAND = re.compile(r"^(?:dgm train\s+)?([a-z][a-z0-9_]*)((?:\s+--[a-z_-]+\s+\S+)*)\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*])")

# A figure computed from README figures: (file stem, unit, quoted number) -> (reason, the value from README figures).
# ``fig(model, column, options)`` is the README's number in that column of that model's row.
DERIVED: dict[tuple[str, str, str], tuple[str, Callable[[Callable[..., float]], float]]] = {
    ("04_dequantization", "nats", "4.65"): (
        "Glow's variational bound minus its importance-weighted bound, a lower bound on the average KL gap",
        lambda fig: fig("glow", "test NLL (nats)") - fig("glow", "nats", bound="importance-weighted")),
}

# A figure that is not a README figure: (file stem, unit) -> {quoted numbers}, with the reason.
EXEMPT: list[tuple[str, str, set[str], str]] = [
    ("04_dequantization", "nats", {"0.0003", "0.0007"},
     "section 6: gaps of one run of the exact one-dimensional case with k = 256, not a registry model"),
    ("04_dequantization", "nats", {"0.86", "3.2", "0.1", "0.14"},
     "Exercise 3's solution: gaps of the exact one-dimensional case in the lecture's own runs"),
    ("05_vae", "nats", {"3.6"}, "section 7: the KL of the lecture's PixelCNN-decoder VAE, not a registry model"),
    ("05_vae", "nats", {"86.76", "85.54", "84.78", "86.47", "86.35"},
     "Burda et al. 2016, Table 1: the paper's MNIST figures"),
    ("05_vae", "nats", {"2.2", "4.6", "8.6"},
     "Exercise 3's solution: differences in the lecture's own IWAE-training run, not a registry model"),
]


@dataclass(frozen=True)
class Figure:
    """One number of the README's Results tables: its model, options, data, column and unit."""

    model: str
    options: frozenset[tuple[str, str]]
    data: str
    column: str
    unit: str  # "nats" or "bits/dim"
    text: str

    @property
    def value(self) -> float:
        return float(self.text)


@dataclass
class Attribution:
    """A registry model a lecture names, with the options (and data) that narrow its README rows."""

    model: str
    options: dict[str, str] = field(default_factory=dict)
    data: str | None = None

    def covers(self, f: Figure) -> bool:
        return (f.model == self.model and (self.data is None or f.data == self.data)
                and all((k, v) in f.options for k, v in self.options.items()))


def _unit(label: str) -> str | None:
    if "bits/dim" in label or "bits per dim" in label:
        return "bits/dim"
    return "nats" if "nats" in label else None


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row; ``\\|`` is a pipe inside a cell."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _options(text: str) -> frozenset[tuple[str, str]]:
    pairs = (p.split("=", 1) for p in text.replace("`", "").split(",") if "=" in p)
    return frozenset((k.strip(), v.strip()) for k, v in pairs)


def _tables(text: str) -> Iterator[tuple[str, list[str], list[list[str]]]]:
    """Each Markdown table of ``text``: the nearest non-empty line above it, its header and its rows."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*:?-", lines[i + 1]):
            above = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            yield above, _cells(lines[i]), [_cells(r) for r in lines[i + 2:j]]
            i = j
        else:
            i += 1


def readme_figures() -> list[Figure]:
    """Every number in a nats or bits/dim column of the README's Results tables."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Results")
    section = readme[start:readme.index("\n## ", start)]
    figures = []
    for above, head, rows in _tables(section):
        title = re.fullmatch(r"\*\*(\w+)\*\*", above)
        for row in rows:
            cells = dict(zip(head, row))
            model = cells.get("model") or (title.group(1) if title else None)
            if model is None:
                continue
            for column, cell in cells.items():
                unit = _unit(column)
                if unit is None:
                    continue
                label = f"{column}: {cells['bound on −log P(y)']}" if "bound on −log P(y)" in cells else column
                figures += [Figure(model, _options(cells.get("options", "")), cells.get("data", ""), label, unit, n)
                            for n in NUMBER.findall(cell)]
    return figures


FIGS = readme_figures()


def readme_number(model: str, column: str, options: str = "", bound: str = "") -> float:
    """The one README figure of ``model`` in ``column`` (a bounds-table figure when ``bound`` is part of its name).

    Raises:
        LookupError: unless exactly one figure fits.
    """
    want = _options(options)
    found = {f.value for f in FIGS if f.model == model and want <= f.options and f.column.startswith(column)
             and bound in f.column}
    if len(found) != 1:
        raise LookupError(f"{len(found)} README figures for {model} {options} {column} {bound}")
    return found.pop()


def _masked(text: str) -> str:
    """``text`` with maths and code spans blanked out (same length, so positions still match)."""
    for pattern in (r"\$\$.*?\$\$", r"\$[^$]*\$", r"`[^`]*`"):
        text = re.sub(pattern, lambda m: "§" * len(m.group()), text, flags=re.S)
    return text


def _attributions(text: str) -> list[Attribution]:
    """The registry models ``text`` names in code font, with the options and data its commands give."""
    found = []
    for span in re.findall(r"`([^`]+)`", text):
        m = COMMAND.match(span.strip())
        if m and m.group(1) in REGISTRY:
            flags = dict(re.findall(r"--([a-z_-]+)\s+(\S+)", m.group(2)))
            data = flags.pop("data", None)
            found.append(Attribution(m.group(1), {k.replace("-", "_"): v for k, v in flags.items()}, data))
    return found


def _close(quote: str, figure: str) -> bool:
    def decimals(s: str) -> int:
        return len(s.split(".")[1]) if "." in s else 0
    return abs(float(quote) - float(figure)) <= (10 ** -decimals(quote) + 10 ** -decimals(figure)) / 2 + 1e-9


@dataclass
class Quote:
    """A figure a lecture quotes, where, and the models it is attributed to."""

    source: str  # the file's stem
    number: str
    unit: str
    context: str
    models: list[Attribution]


def _units_of(text: str) -> Iterator[tuple[str, str]]:
    """(number, unit) for every figure of ``text`` outside maths and code."""
    for m in FIGURES.finditer(_masked(text)):
        unit = "bits/dim" if m.group(1).startswith("bits") else "nats"
        yield from ((n, unit) for n in NUMBER.findall(m.group()[:m.start(1) - m.start()]))


def _prose_quotes(source: str, text: str) -> Iterator[Quote]:
    masked = _masked(text)
    starts = [0] + [m.end() for m in SENTENCE_END.finditer(masked)]
    for a, b in zip(starts, starts[1:] + [len(text)]):
        sentence = text[a:b]
        models = _attributions(sentence)
        for number, unit in _units_of(sentence):
            yield Quote(source, number, unit, " ".join(sentence.split())[:160], models)


def quotes(source: str, markdown: str) -> Iterator[Quote]:
    """Every figure of a Markdown text: model tables cell by cell, the rest by paragraph and sentence."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    table_lines = set()
    for _, head, rows in _tables(markdown):
        key = [h.strip("*` ").lower() for h in head]
        if "model" not in key:
            continue
        for row in rows:
            cells = dict(zip(key, row))
            table_lines.add(tuple(row))
            name = cells["model"].strip("`* ")
            models = [Attribution(name, dict(_options(cells.get("options", ""))), cells.get("data") or None)]
            for h, cell in zip(head, row):
                unit = _unit(h)
                if unit is None:
                    continue
                for number in NUMBER.findall(_masked(cell)):
                    yield Quote(source, number, unit, " | ".join(row)[:160],
                                models if name in REGISTRY else [])
    blocks = []
    for line in markdown.splitlines():
        if line.startswith("|") and tuple(_cells(line)) in table_lines:
            continue
        if not line.strip() or line.startswith("|") or re.match(r"\s*(?:[*-]|\d+\.)\s", line):
            blocks.append("")  # a blank line, a table row or a list item starts a new block
        if blocks:
            blocks[-1] += line + "\n"
        else:
            blocks.append(line + "\n")
    for block in blocks:
        yield from _prose_quotes(source, block)


def all_quotes() -> list[Quote]:
    found = []
    for path in LECTURES:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                found += quotes(path.stem, cell.source)
    for path in DOCS:
        found += quotes(path.stem, path.read_text())
    return found


def _exempt(q: Quote) -> bool:
    return any(q.source == s and q.unit == u and q.number in numbers for s, u, numbers, _ in EXEMPT)


def test_the_readme_tables_parse():
    """The README's Results tables give figures for every model with a likelihood, in both units."""
    models = {f.model for f in FIGS}
    assert {"gated_pixelcnn", "glow", "vae", "vqvae", "ddpm", "ffjord"} <= models, models
    assert readme_number("glow", "nats", bound="importance-weighted") < readme_number("glow", "test NLL (nats)")
    assert any(f.model == "glow" and f.unit == "bits/dim" and "importance-weighted" in f.column for f in FIGS)


def test_every_quoted_figure_is_a_readme_figure_of_its_model():
    """Each nats or bits/dim figure in the lectures' markdown and docs/training.md matches a README figure of a
    model its sentence (or table row) names, or is derived from README figures, or is exempt with a reason."""
    wrong = []
    for q in all_quotes():
        if _exempt(q):
            continue
        derived = DERIVED.get((q.source, q.unit, q.number))
        if derived is not None:
            if not _close(q.number, f"{derived[1](readme_number):.6f}"):
                wrong.append(f"{q.source}: {q.number} {q.unit} should be {derived[1](readme_number):.4f} "
                             f"({derived[0]})\n    in: {q.context}")
            continue
        candidates = [f for f in FIGS if f.unit == q.unit and any(a.covers(f) for a in q.models)]
        if not any(_close(q.number, f.text) for f in candidates):
            named = ", ".join(a.model + "".join(f" {k}={v}" for k, v in a.options.items()) for a in q.models)
            wrong.append(f"{q.source}: {q.number} {q.unit} "
                         + (f"is no README figure of {named}" if named else "names no registry model")
                         + f"\n    in: {q.context}")
    assert not wrong, "quoted figures that the README does not hold:\n" + "\n".join(wrong)


def test_every_exemption_is_used():
    """An entry of DERIVED or EXEMPT that no lecture uses any more is stale: remove it."""
    found = {(q.source, q.unit, q.number) for q in all_quotes()}
    stale = [key for key in DERIVED if key not in found]
    stale += [(s, u, n) for s, u, numbers, _ in EXEMPT for n in numbers if (s, u, n) not in found]
    assert not stale, stale


def test_quotes_are_found_in_prose_lists_and_tables():
    """The reader itself: a list of figures with one unit, a command with options, maths left alone."""
    text = ("With `dgm train vae --decoder dlogistic` the NLL is 82.2 nats (1.85 bits/dim), against 86.5, 86.1\n"
            "and 85.3 nats elsewhere; $64 \\ln 17 = 181.33$ nats is arithmetic. A new sentence: 90.4 nats.\n\n"
            "| model | options | test NLL (nats) | bits/dim |\n|---|---|---|---|\n"
            "| `glow` | dequantization=variational | 83.52 | 1.883 |\n| uniform | | $181.33$ | $4.087$ |\n")
    found = [(q.number, q.unit, [(a.model, a.options) for a in q.models]) for q in quotes("x", text)]
    assert found == [("83.52", "nats", [("glow", {"dequantization": "variational"})]),
                     ("1.883", "bits/dim", [("glow", {"dequantization": "variational"})]),
                     ("82.2", "nats", [("vae", {"decoder": "dlogistic"})]),
                     ("1.85", "bits/dim", [("vae", {"decoder": "dlogistic"})]),
                     ("86.5", "nats", [("vae", {"decoder": "dlogistic"})]),
                     ("86.1", "nats", [("vae", {"decoder": "dlogistic"})]),
                     ("85.3", "nats", [("vae", {"decoder": "dlogistic"})]),
                     ("90.4", "nats", [])]
    assert _close("90.4", "90.35") and _close("82.2", "82.16") and not _close("82.3", "82.16")
    assert math.isclose(readme_number("vae", "test NLL (nats)", "decoder=dlogistic"),
                        float(next(f.text for f in FIGS if f.model == "vae" and ("decoder", "dlogistic") in f.options
                                   and f.column == "test NLL (nats)")))
