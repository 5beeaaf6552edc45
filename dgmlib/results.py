"""``dgm results``: every ``metrics.json`` under a folder of runs, as one Markdown table and one figure.

The README's results tables are made with it (``dgm results runs/ --details``): the main table has the
same columns for every model; ``--details`` adds the table of every bound a run measured on the test NLL
(``bounds_table``: an importance-weighted bound beside the reported one, say) and one table per model with
the columns its registry entry names (``ModelSpec.columns``, built from ``Column`` and ``number``).
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
BOUND_COLUMNS = ("model", "options", "data", "bound on −log P(y)", "nats", "bits/dim")

# Further bounds on the same test NLL that a run's metrics may hold, beside its reported ``test_nll_nats``:
# metrics key -> the bound's name, written from the run's metrics.
FURTHER_BOUNDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "iw_nll_nats": lambda r: f"importance-weighted dequantization bound, k = {r.get('iw_k', '?')}",
    "uniform_nll_nats": lambda r: "uniform dequantization bound of the same flow",
    "neg_elbo_nats": lambda r: "−ELBO (the k = 1 bound)",
    "uniform_bound_nats": lambda r: "bound of the stage-1 model: uniform prior over the codes",
}


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


def _cell(text: str) -> str:
    """A table cell's text with its pipes escaped, so that a label such as ``−log P(y | c)`` stays one cell."""
    return text.replace("|", "\\|")


def _row(cells: list[str] | tuple[str, ...]) -> str:
    """One Markdown table row of ``cells``, pipes inside a cell escaped."""
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


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
    "early stop" when early stopping ended training and "CUT BY THE TIME CAP" when the safety cap did. A pipe
    inside a label or a cell is escaped (``\\|``)."""
    head = ("options", "data", *(c.label for c in columns), "train s", "epochs (best)")
    lines = [_row(head), "|" + "---|" * len(head)]
    for r in rows:
        best = r.get("best_epoch", "?")
        epochs = f"{r['epochs_run']} ({'last' if best == -1 else best})" if "epochs_run" in r else ""
        epochs += {"early stopping": ", early stop",
                   "time budget": ", CUT BY THE TIME CAP"}.get(r.get("stopped_by"), "")
        cells = [_options(r), str(r.get("data", "")), *(c.cell(r) for c in columns),
                 _number(r.get("train_seconds"), 0), epochs]
        lines.append(_row(cells))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table: model, options, data, test NLL in nats (per image, or per point
    for 2D data), bits/dim (discrete images only), how the NLL was computed, training seconds,
    parameters and device (marked "(fast)" for a fast-mode run and "(cut by the time cap)" for a run the
    safety cap stopped, whose numbers depend on the machine's speed). Runs without a test NLL (e.g. a DDPM on 2D data) leave those cells empty."""
    lines = [_row(COLUMNS), "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [str(r["model"]), _options(r), str(r.get("data", "")), _number(r.get("test_nll_nats"), 2),
                 _number(r.get("test_bits_per_dim"), 3), _method(r) if "test_nll_nats" in r else "",
                 _number(r.get("train_seconds"), 0), f"{r['num_params']:,}" if "num_params" in r else "",
                 str(r.get("device", "cpu")) + (" (fast)" if r.get("fast_mode") else "")
                 + (" (cut by the time cap)" if r.get("stopped_by") == "time budget" else "")]
        lines.append(_row(cells))
    return "\n".join(lines)


def bounds_table(rows: list[dict[str, Any]]) -> str:
    """Every bound on a test NLL that a run of discrete images measured, as a Markdown table, smallest first
    within each run: the reported ``test_nll_nats`` and the further bounds of ``FURTHER_BOUNDS`` in its
    metrics (Glow's importance-weighted bound with k samples of q(u | y) and the uniform bound of its flow, a
    VAE's −ELBO beside its IWAE estimate, a VQ-VAE's bound with the uniform prior of stage 1). Columns: model,
    options, data, the bound's name, nats per image and bits/dim = nats / (D ln 2) with D = ``num_dims``.
    Only runs with a bits/dim and at least one further bound get rows; an empty string when none has.

    All the bounds of a flow or a VAE bound the same −log P(y) (in expectation over the sampling of the
    estimate), so the smallest is the best statement about that model's test NLL. A VQ-VAE's uniform-prior
    bound is that of its stage-1 model, whose prior is uniform: another model. Sources: the importance-weighted
    bound is Burda, Grosse & Salakhutdinov 2016 (IWAE), Eq. 8 and Theorem 1, with q(u | y) as the proposal.
    """
    lines = []
    for r in rows:
        dims = r.get("num_dims")
        if "test_nll_nats" not in r or "test_bits_per_dim" not in r or not dims:
            continue
        bounds = [(_method(r), r["test_nll_nats"])]
        bounds += [(name(r), r[key]) for key, name in FURTHER_BOUNDS.items()
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if len(bounds) < 2:
            continue
        for name, nats in sorted(bounds, key=lambda b: b[1]):
            lines.append(_row([str(r["model"]), _options(r), str(r.get("data", "")), name, _number(nats, 2),
                               _number(nats / (dims * math.log(2)), 3)]))
    if not lines:
        return ""
    return "\n".join([_row(BOUND_COLUMNS), "|" + "---|" * len(BOUND_COLUMNS), *lines])


def results_markdown(rows: list[dict[str, Any]], details: bool = False) -> str:
    """What ``dgm results`` prints: the main table (``markdown_table``) and, with ``details``, the table of every
    bound each run measured (``bounds_table``, when a run has more than one) and one table per model with the
    columns its registry entry names (``ModelSpec.columns``), under the model's name in bold. Each further table
    is introduced by one sentence, so that the output can be pasted unchanged."""
    from dgmlib.models import MODELS

    parts = [markdown_table(rows)]
    if not details:
        return parts[0]
    bounds = bounds_table(rows)
    if bounds:
        parts += ["Every bound on a test NLL that a run measured, the smallest first:", bounds]
    own_tables = [f"**{name}**\n\n{detail_table(own, spec.columns)}" for name, spec in MODELS.items()
                  if spec.columns and (own := [r for r in rows if r["model"] == name])]
    if own_tables:
        parts += ["The models' own metrics, from the same runs:", *own_tables]
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
