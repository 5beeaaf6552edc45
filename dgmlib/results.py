"""``dgm results``: every ``metrics.json`` under a folder of runs, as one Markdown table and one figure.

The README's results tables are made with it (``dgm results runs/ --details``): the main table has the
same columns for every model; ``--details`` adds one table per model with the columns its registry
entry names (``ModelSpec.columns``, built from ``Column`` and ``number``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

COLUMNS = ("model", "options", "data", "test NLL (nats)", "bits/dim", "NLL computed as", "train s", "params",
           "device")


def collect(runs: str | Path) -> list[dict[str, Any]]:
    """Read every ``metrics.json`` below ``runs``, sorted by data, model, options and folder.

    Each row is the metrics dict plus ``path`` (the run's folder). A file that is not JSON is skipped
    with a warning row left out.

    Raises:
        FileNotFoundError: if ``runs`` is not a folder.
    """
    runs = Path(runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs} is not a folder of runs")
    rows = []
    for path in sorted(runs.rglob("metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(metrics, dict) and "model" in metrics:
            rows.append({**metrics, "path": str(path.parent)})
    return sorted(rows, key=lambda r: (str(r.get("data")), str(r["model"]), _options(r), r["path"]))


def _options(row: dict[str, Any]) -> str:
    """The run's options, and its seed when it is not the default 0 (two seeds of one model are two rows)."""
    seed = [f"seed={row['seed']}"] if row.get("seed") not in (None, 0) else []
    return ", ".join([*(f"{k}={v}" for k, v in (row.get("options") or {}).items()), *seed])


def _method(row: dict[str, Any]) -> str:
    if "nll_method" in row:
        return str(row["nll_method"])
    return str(row.get("likelihood", "")).split(" (")[0].split(":")[0]  # metrics written before nll_method existed


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


@dataclass(frozen=True)
class Column:
    """One column of a model's detail table: a heading and how to write a run's cell.

    Attributes:
        label: the heading, with its unit, e.g. ``"KL (nats)"``.
        cell: ``metrics dict -> str``; an empty string when the run lacks the metric.
    """

    label: str
    cell: Callable[[dict[str, Any]], str]


def number(key: str, digits: int = 2, se: str | None = None) -> Callable[[dict[str, Any]], str]:
    """A cell writer for ``Column``: ``row[key]`` with ``digits`` decimals, followed by ``± row[se]``
    when ``se`` names a standard error in the row that does not round to zero. Missing or
    non-finite values give an empty cell."""
    def cell(row: dict[str, Any]) -> str:
        text = _number(row.get(key), digits)
        if text and se is not None and _number(row.get(se), digits).strip("0.-"):
            text += f" ± {_number(row[se], digits)}"
        return text
    return cell


def detail_table(rows: list[dict[str, Any]], columns: tuple[Column, ...]) -> str:
    """The rows of one model as a Markdown table: options, data, then ``columns``, then training
    seconds and epochs (run, and the best one, whose weights were kept; "last" without validation), with
    "early stop" when early stopping ended training and "CUT BY THE TIME CAP" when the safety cap did."""
    head = ("options", "data", *(c.label for c in columns), "train s", "epochs (best)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        best = r.get("best_epoch", "?")
        epochs = f"{r['epochs_run']} ({'last' if best == -1 else best})" if "epochs_run" in r else ""
        epochs += {"early stopping": ", early stop",
                   "time budget": ", CUT BY THE TIME CAP"}.get(r.get("stopped_by"), "")
        cells = [_options(r), str(r.get("data", "")), *(c.cell(r) for c in columns),
                 _number(r.get("train_seconds"), 0), epochs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table: model, options, data, test NLL in nats (per image, or per point
    for 2D data), bits/dim (discrete images only), how the NLL was computed, training seconds,
    parameters and device (marked "(fast)" for a fast-mode run and "(cut by the time cap)" for a run the
    safety cap stopped, whose numbers depend on the machine's speed). Runs without a test NLL (e.g. a DDPM on 2D data) leave those cells empty."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [str(r["model"]), _options(r), str(r.get("data", "")), _number(r.get("test_nll_nats"), 2),
                 _number(r.get("test_bits_per_dim"), 3), _method(r) if "test_nll_nats" in r else "",
                 _number(r.get("train_seconds"), 0), f"{r['num_params']:,}" if "num_params" in r else "",
                 str(r.get("device", "cpu")) + (" (fast)" if r.get("fast_mode") else "")
                 + (" (cut by the time cap)" if r.get("stopped_by") == "time budget" else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(rows: list[dict[str, Any]], details: bool = False) -> str:
    """What ``dgm results`` prints: the main table (``markdown_table``) and, with ``details``, one table per model
    with the columns its registry entry names (``ModelSpec.columns``), under the model's name in bold."""
    from dgmlib.models import MODELS

    parts = [markdown_table(rows)]
    for name, spec in MODELS.items() if details else ():
        own = [r for r in rows if r["model"] == name]
        if own and spec.columns:
            parts.append(f"**{name}**\n\n{detail_table(own, spec.columns)}")
    return "\n\n".join(parts)

def results_figure(rows: list[dict[str, Any]]) -> Figure:
    """Test NLL against training time, one panel per dataset, one marker per run (named in the legend):
    bits/dim for images, nats per point for 2D data.

    Raises:
        ValueError: if no row has a test NLL.
    """
    with_nll = [r for r in rows if "test_nll_nats" in r and "train_seconds" in r]
    if not with_nll:
        raise ValueError("no run with a test NLL to plot")
    datasets = sorted({str(r.get("data")) for r in with_nll})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.8), squeeze=False)
    markers = "osD^v<>pX*"
    for ax, name in zip(axes[0], datasets):
        runs = [r for r in with_nll if str(r.get("data")) == name]
        bits = all("test_bits_per_dim" in r for r in runs)
        for i, r in enumerate(runs):
            y = r["test_bits_per_dim"] if bits else r["test_nll_nats"]
            label = r["model"] + (f" ({_options(r)})" if _options(r) else "")
            ax.scatter(r["train_seconds"], y, s=30, marker=markers[i % len(markers)], label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded labels on the minor ticks
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test NLL (bits/dim)" if bits else "test NLL (nats / point)")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def gallery_figure(rows: list[dict[str, Any]]) -> Figure:
    """One panel per model family (``ModelSpec.family``): the ``samples.png`` of its best run in ``rows``.

    The best run of a family is its full-mode run with the lowest test NLL on the digits, else its first
    full-mode run with samples (a GAN has no likelihood; a continuous flow trains on 2D toys); fast-mode runs are
    used only for a family without a full one, and their panel says "fast mode". Each panel is titled with the
    family, the model and its test NLL in nats per image (or per point) with how it was computed.

    Raises:
        ValueError: if no run in ``rows`` has a ``samples.png``.
    """
    import matplotlib.image as mpimg

    from dgmlib.models import MODELS

    def rank(r: dict[str, Any]) -> tuple:
        nll = r.get("test_nll_nats")
        return (bool(r.get("fast_mode")), r.get("data") != "digits", nll is None, nll if nll is not None else 0.0)

    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        spec = MODELS.get(str(r["model"]))
        if spec is None or not (Path(r["path"]) / "samples.png").is_file():
            continue
        if spec.family not in best or rank(r) < rank(best[spec.family]):
            best[spec.family] = r
    if not best:
        raise ValueError("no run with a samples.png to show")
    order = list(dict.fromkeys(spec.family for spec in MODELS.values()))
    families = [f for f in order if f in best]
    cols = min(4, len(families))
    rows_n = -(-len(families) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 3.6 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, family in zip(axes.flat, families):
        r = best[family]
        ax.imshow(mpimg.imread(Path(r["path"]) / "samples.png"))
        nll = r.get("test_nll_nats")
        unit = "image" if r.get("test_bits_per_dim") is not None else "point"
        detail = f"{nll:.1f} nats/{unit}, {_method(r)}" if nll is not None else str(r.get("data", ""))
        ax.set_title(f"{family}\n{r['model']} ({detail})" + (" [fast mode]" if r.get("fast_mode") else ""),
                     fontsize=8)
    fig.tight_layout()
    return fig
