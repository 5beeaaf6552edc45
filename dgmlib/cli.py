"""The ``dgm`` command line: ``dgm list``, ``dgm train MODEL``, ``dgm results`` and ``dgm grade``.

Everything particular to a model comes from its entry in ``dgmlib.models.MODELS``: its options,
the data it trains on, its training settings, test metrics and figures. This file has no per-model code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from dgmlib import catalog

DEFAULT_TIME_CAP = 3600.0
"""``dgm train``'s safety cap in seconds. Runs are bounded by epochs; the cap only stops a run gone wrong."""


def _train_parser(sub: argparse._SubParsersAction, models: dict[str, dict]) -> None:
    """``dgm train MODEL``: one sub-command per registered model, with that model's options, read from the
    catalog (``dgmlib.catalog``) so that parsing the command line never imports torch."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=None, help="output folder (default: runs/MODEL[_OPTIONS][_DATA], without _DATA for digits)")
    common.add_argument("--epochs", type=int, default=None, help="override the model's default epochs")
    common.add_argument("--time-cap", type=float, default=DEFAULT_TIME_CAP, metavar="SECONDS",
                        help="safety cap on training time; training is bounded by epochs, and a run cut by this "
                             f"cap is reported as such (default: {DEFAULT_TIME_CAP:g} s)")
    common.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    common.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N, mps (default: $DGM_DEVICE, else CUDA, then MPS, else the CPU)")
    common.add_argument("--fast", action="store_true", help="fast mode, same as DGM_FAST=1")
    common.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tr = sub.add_parser("train", help="train a model, then write metrics.json, samples.png, curves.png and model.pt",
                        description="Train a registered model; `dgm train MODEL --help` lists its options.")
    parsers = tr.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, card in models.items():
        p = parsers.add_parser(name, parents=[common], help=card["description"], description=card["description"])
        choices, default = card["data"], card["default_data"]
        p.add_argument("--data", default=default, choices=choices, metavar="DATA",
                       help=f"one of {', '.join(choices)} (default: {default}); mnist needs torchvision and a network")
        for key, opt in card["options"].items():
            p.add_argument(f"--{key}", default=None, choices=opt["choices"],
                           help=f"{opt['help']} (default: {opt['default']})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dgm`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["site"]:
        try:
            from dgmlib import site
        except ModuleNotFoundError as err:
            print(f"dgm site: the website needs the site extra ({err.name} is missing): "
                  'pip install "dgmlib[site]"', file=sys.stderr)
            return 2
        return site.main(argv[1:])
    parser = argparse.ArgumentParser(prog="dgm", description="Deep Generative Models course tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the models that `dgm train` knows")
    models = catalog.load()
    _train_parser(sub, models)
    res = sub.add_parser("results", help="gather every metrics.json under a folder into one table and a figure")
    res.add_argument("runs", nargs="?", default="runs", help="folder searched for metrics.json (default: runs)")
    res.add_argument("--figure", default=None, help="where to save the figure (default: RUNS/results.png)")
    res.add_argument("--gallery", default=None, metavar="PNG",
                     help="also save one picture of samples, the best run of each model family (the README's picture)")
    res.add_argument("--details", action="store_true",
                     help="also one table per model with its own metrics (ELBO split, entropy gap, sampling times)")
    # `dgm site ...` is handed to dgmlib.site before parsing (below), so that its imports (nbformat, Sphinx's
    # helpers) are paid only when the site is built; this entry only lists it in `dgm --help`.
    sub.add_parser("site", add_help=False, help="build the course website (lectures with their outputs, released "
                                                "assignments, results, API reference); `dgm site --help` for options")
    gr = sub.add_parser("grade", help="autograde every submission of an assignment (sandboxed, in parallel)")
    gr.add_argument("assignment", help="assignment name, e.g. hw2_flows")
    gr.add_argument("--course", default=".", help="nbgrader course root (default: .)")
    gr.add_argument("--student", action="append", default=None, metavar="ID",
                    help="(re)grade only this student's submission, e.g. a late or corrected one; repeatable. The "
                         "others keep their last results, and the export and the report still cover the class")
    gr.add_argument("--jobs", type=int, default=None, help="parallel graders (default: number of cores)")
    gr.add_argument("--timeout", type=int, default=300, help="per-cell timeout in seconds (default: 300)")
    gr.add_argument("--submission-timeout", type=int, default=None,
                    help="wall-clock limit per submission (default: 4 x timeout + 120)")
    gr.add_argument("--memory-mb", type=int, default=None, help="kernel memory limit in MiB (default: 6144)")
    gr.add_argument("--full", action="store_true", help="grade without fast mode (DGM_FAST=0)")
    gr.add_argument("--no-sandbox", action="store_true", help="run kernels without bubblewrap (unsafe)")
    gr.add_argument("--similarity", type=float, default=None,
                    help="share of code at which two submissions are reported as near-copies (default: 0.6)")
    args = parser.parse_args(argv)

    if args.command == "list":
        width = max(map(len, models))
        for name, card in models.items():
            print(f"{name:<{width}}  {card['description']}")
        return 0
    if args.command == "results":
        from dgmlib.results import collect, gallery_figure, results_figure, results_markdown

        runs = Path(args.runs)
        rows = collect(runs)
        if not rows:
            parser.error(f"no metrics.json under {runs}")
        print(results_markdown(rows, details=args.details))
        figure = Path(args.figure) if args.figure else runs / "results.png"
        results_figure(rows).savefig(figure, dpi=120, bbox_inches="tight")
        print(f"\nfigure: {figure}")
        if args.gallery:
            try:
                gallery = gallery_figure(rows)
            except ValueError as err:
                parser.error(f"--gallery: {err}")
            gallery.savefig(args.gallery, dpi=110, bbox_inches="tight")
            print(f"gallery: {args.gallery}")
        return 0
    if args.command == "grade":
        try:
            from dgmlib.grading.classroom import CourseNotFoundError, format_report, grade_assignment
        except ModuleNotFoundError as err:
            parser.error(f"grading needs the grade extra ({err.name} is missing): pip install \"dgmlib[grade]\"")
        limits = {} if args.memory_mb is None else {"memory_mb": args.memory_mb}
        if args.similarity is not None:
            limits["similarity_threshold"] = args.similarity
        try:
            results = grade_assignment(args.assignment, Path(args.course), jobs=args.jobs, cell_timeout=args.timeout,
                                       submission_timeout=args.submission_timeout, fast=not args.full,
                                       use_sandbox=not args.no_sandbox, students=args.student, **limits)
        except CourseNotFoundError as err:  # checked before grading: a usage error; any other error is the grader's
            parser.error(str(err))
        print(format_report(args.assignment, results), end="")
        print(f"grades: {Path(args.course) / 'grades.csv'}; report: {Path(args.course) / 'reports' / args.assignment}.txt")
        return 0
    card = models[args.model]
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be positive")
    if not args.time_cap > 0:
        parser.error("--time-cap must be positive seconds")
    if args.device is not None:
        from dgmlib.device import resolve_device

        try:
            resolve_device(args.device)
        except (TypeError, ValueError) as err:
            parser.error(f"--device: {err}")
    given = {key: getattr(args, key) for key in card["options"] if getattr(args, key) is not None}
    if args.fast:
        os.environ["DGM_FAST"] = "1"
    default_out = "_".join([args.model, *given.values(), *([args.data] if args.data != "digits" else [])])
    metrics = train_model(args.model, args.data, Path(args.out or f"runs/{default_out}"), epochs=args.epochs,
                          seed=args.seed, progress=not args.no_progress, device=args.device, time_cap=args.time_cap,
                          **given)
    print(json.dumps(metrics, indent=2))
    return 0


def train_model(name: str, data_name: str, out: Path, epochs: int | None = None, seed: int = 0,
                progress: bool = True, device: str | None = None, time_cap: float = DEFAULT_TIME_CAP,
                **options: str) -> dict:
    """Train registered model ``name`` on ``data_name``; write ``out/{metrics.json, samples.png,
    curves.png, model.pt}`` and return the metrics.

    The test NLL is in nats per image and bits/dim for discrete images, or in nats per point for the
    2D toys; ``nll_method`` and ``likelihood`` say which bound or estimate it is. Training, the test
    metrics and the figures run on ``device`` (default ``dgmlib.device.default_device()``).
    ``options`` go to the model's builder (e.g. ``prior="flow"`` for the VAE); the others take
    their defaults.

    Training is bounded by the model's epochs (and its early-stopping patience), so the same call and
    seed give the same metrics on any machine, within floating-point noise. ``time_cap`` (seconds) is
    only a safety cap: ``metrics.json`` records what stopped training in ``stopped_by`` (``"epochs"``,
    ``"early stopping"`` or ``"time budget"``), and a run cut by the cap also says so in ``warning`` and
    on stderr, since its result depends on the machine's speed.

    Raises:
        KeyError: for an unknown model name. ValueError: for an unknown dataset, device or option.
    """
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from dgmlib import plots
    from dgmlib.config import fast_mode
    from dgmlib.data import data_kind, load_data
    from dgmlib.device import resolve_device
    from dgmlib.models import MODELS
    from dgmlib.train import fit, save_checkpoint
    from dgmlib.units import nats_to_bits_per_dim

    spec = MODELS[name]
    options = spec.resolve_options(options)
    kind = data_kind(data_name)
    if ("toy2d" if kind == "toy2d" else "images") not in spec.data:
        raise ValueError(f"{name} cannot train on {data_name!r}")
    device = resolve_device(device)
    torch.manual_seed(seed)
    data = load_data(data_name)
    model = spec.build(data, **options)
    settings = spec.train_settings(kind)
    if epochs is not None:
        settings["epochs"] = epochs
    loss_fn = spec.loss(model) if spec.loss is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cut run is reported below, in metrics.json and loudly
        train, val = (data.train, data.val) if spec.inputs is None else \
            (spec.inputs(model, data, "train"), spec.inputs(model, data, "val"))
        history = fit(model, train, val if spec.validate else None, loss_fn=loss_fn, seed=seed,
                      progress=progress, device=device, time_budget=time_cap, **settings)
    stage = spec.after_fit(model, data, {"seed": seed, "progress": progress, "device": device}) \
        if spec.after_fit is not None else {}
    model.to(device)
    on_device = data.to(device)
    report = spec.report(model, on_device, seed)
    likelihood = {}
    if "test_nll_nats" in report:
        likelihood = {"test_nll_nats": report["test_nll_nats"]}
        if data.num_levels is not None:  # bits/dim only for discrete images; a 2D density stays in nats per point
            likelihood["test_bits_per_dim"] = nats_to_bits_per_dim(report["test_nll_nats"], data.num_dims)
    metrics = {
        "model": name,
        "data": data_name,
        "options": options,
        **options,
        **likelihood,
        **({("val_loss" if spec.loss is not None else "val_nll_nats"): min(history.val_loss)}
           if history.val_loss else {}),
        **report,
        **stage,
        "num_levels": data.num_levels,
        "num_dims": data.num_dims,
        "train_seconds": history.seconds,
        "epochs": settings["epochs"],
        "epochs_run": len(history.train_loss),
        "best_epoch": history.best_epoch,
        "stopped_by": history.stopped_by,
        "num_params": sum(p.numel() for p in model.parameters()),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "fast_mode": fast_mode(),
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
    }
    if history.stopped_by == "time budget":
        metrics["warning"] = (f"training was cut by the {time_cap:g} s time cap after {len(history.train_loss)} of "
                              f"{settings['epochs']} epochs: these numbers depend on this machine's speed and are not "
                              "the course's reproducible result")
        print(f"\nWARNING: {name}: {metrics['warning']}\n", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_checkpoint(out / "model.pt", model, name=name, data=data_name, options=options, metrics=metrics)
    title = " ".join([name, *(f"{k}={v}" for k, v in options.items()), f"({data_name})",
                      *(["[fast mode]"] if fast_mode() else [])])
    for figure_name, figure in spec.figures(model, on_device, seed, title).items():
        figure.savefig(out / f"{figure_name}.png", dpi=120, bbox_inches="tight")
    unit = "image" if data.num_levels is not None else "point"
    ylabel = spec.loss_label or f"NLL (nats / {unit})" + (", a bound" if data.num_levels is not None else "")
    plots.training_curves(history, title=name, ylabel=ylabel).savefig(out / "curves.png", dpi=120, bbox_inches="tight")
    return metrics


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
