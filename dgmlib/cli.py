"""The ``dgm`` command line: ``dgm list`` and ``dgm train MODEL``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dgmlib.data import TOY_NAMES


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dgm`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="dgm", description="Deep Generative Models course tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the models that `dgm train` knows")
    tr = sub.add_parser("train", help="train a model, then write metrics.json, samples.png and model.pt")
    tr.add_argument("model", help="model name (see `dgm list`)")
    tr.add_argument("--data", default=None, choices=["digits", "mnist", *TOY_NAMES],
                    help="dataset: digits or mnist for image models, a 2D toy for ffjord and ddpm "
                         "(default: digits, or 8gaussians for ffjord)")
    tr.add_argument("--out", default=None, help="output folder (default: runs/MODEL)")
    tr.add_argument("--epochs", type=int, default=None, help="override the model's default epochs")
    tr.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    tr.add_argument("--fast", action="store_true", help="fast mode, same as DGM_FAST=1")
    tr.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tr.add_argument("--prior", default=None, help="VAE prior: standard, mog, vamp or flow (default: standard)")
    tr.add_argument("--decoder", default=None, help="VAE decoder: categorical or dlogistic (default: categorical)")
    gr = sub.add_parser("grade", help="autograde every submission of an assignment (sandboxed, in parallel)")
    gr.add_argument("assignment", help="assignment name, e.g. hw2_flows")
    gr.add_argument("--course", default=".", help="nbgrader course root (default: .)")
    gr.add_argument("--jobs", type=int, default=None, help="parallel graders (default: number of cores)")
    gr.add_argument("--timeout", type=int, default=300, help="per-cell timeout in seconds (default: 300)")
    gr.add_argument("--submission-timeout", type=int, default=None,
                    help="wall-clock limit per submission (default: 4 x timeout + 120)")
    gr.add_argument("--memory-mb", type=int, default=None, help="kernel memory limit in MiB (default: 6144)")
    gr.add_argument("--full", action="store_true", help="grade without fast mode (DGM_FAST=0)")
    gr.add_argument("--no-sandbox", action="store_true", help="run kernels without bubblewrap (unsafe)")
    args = parser.parse_args(argv)

    from dgmlib.models import MODELS

    if args.command == "list":
        width = max(map(len, MODELS))
        for name, spec in MODELS.items():
            print(f"{name:<{width}}  {spec.description}")
        return 0
    if args.command == "grade":
        from dgmlib.grading.classroom import format_report, grade_assignment

        limits = {} if args.memory_mb is None else {"memory_mb": args.memory_mb}
        results = grade_assignment(args.assignment, Path(args.course), jobs=args.jobs, cell_timeout=args.timeout,
                                   submission_timeout=args.submission_timeout, fast=not args.full,
                                   use_sandbox=not args.no_sandbox, **limits)
        print(format_report(args.assignment, results), end="")
        print(f"grades: {Path(args.course) / 'grades.csv'}; report: {Path(args.course) / 'reports' / args.assignment}.txt")
        return 0
    if args.model not in MODELS:
        parser.error(f"unknown model {args.model!r}; known: {', '.join(MODELS)}")
    spec = MODELS[args.model]
    if args.data is None:
        args.data = "digits" if spec.data[0] == "images" else "8gaussians"
    if ("toy2d" if args.data in TOY_NAMES else "images") not in spec.data:
        kinds = {"images": "digits or mnist", "toy2d": "a 2D toy (" + ", ".join(TOY_NAMES) + ")"}
        parser.error(f"{args.model} trains on {' or '.join(kinds[k] for k in spec.data)}, not {args.data!r}")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be positive")
    options = {k: v for k, v in (("prior", args.prior), ("decoder", args.decoder)) if v is not None}
    try:
        MODELS[args.model].check_options(options)
    except ValueError as err:
        parser.error(f"{args.model}: {err}")
    if args.fast:
        os.environ["DGM_FAST"] = "1"
    default_out = "_".join([args.model, *options.values(), *([args.data] if args.data in TOY_NAMES else [])])
    metrics = train_model(args.model, args.data, Path(args.out or f"runs/{default_out}"),
                          epochs=args.epochs, seed=args.seed, progress=not args.no_progress, **options)
    print(json.dumps(metrics, indent=2))
    return 0


def train_model(name: str, data_name: str, out: Path, epochs: int | None = None, seed: int = 0,
                progress: bool = True, **options: str) -> dict:
    """Train registered model ``name`` on ``data_name``; write ``out/{metrics.json,samples.png,
    curves.png,model.pt}`` and return the metrics (test NLL in nats/image and bits/dim, or in nats
    per point for the 2D toys).

    ``options`` go to the model's builder (e.g. ``prior="flow"`` for the VAE).

    Raises:
        KeyError: for an unknown model name. ValueError: for an unknown dataset or option.
    """
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from dgmlib import plots
    from dgmlib.config import fast_mode, pick
    from dgmlib.data import load_image_data, load_toy_data
    from dgmlib.diffusion import DDPM
    from dgmlib.models import MODELS
    from dgmlib.train import evaluate, fit, save_checkpoint
    from dgmlib.units import nats_to_bits_per_dim

    spec = MODELS[name]
    spec.check_options(options)
    torch.manual_seed(seed)
    toy = data_name in TOY_NAMES
    if ("toy2d" if toy else "images") not in spec.data:
        raise ValueError(f"{name} cannot train on {data_name!r}")
    data = load_toy_data(data_name) if toy else load_image_data(data_name)
    model = spec.build(data, **options)
    settings = spec.train_settings(toy)
    if epochs is not None:
        settings["epochs"] = epochs
    loss_fn = getattr(model, "training_loss", None)  # DDPM trains on L_simple, the others on their NLL
    history = fit(model, data.train, data.val, loss_fn=loss_fn, seed=seed, progress=progress, **settings)
    if spec.report is None:
        report = {"test_nll_nats": evaluate(model, data.test, num_samples=4, seed=seed),
                  "likelihood": "uniform-dequantization bound on -log P(y): E_u[-log p((y+u)/K)] + D log K, "
                                "4 noise draws per test image"}
    else:
        report = spec.report(model, data, seed)
    likelihood = {}
    if "test_nll_nats" in report:  # bits/dim only for discrete images; a 2D density stays in nats per point
        likelihood = {"test_nll_nats": report["test_nll_nats"]}
        if not toy:
            likelihood["test_bits_per_dim"] = nats_to_bits_per_dim(report["test_nll_nats"], data.num_dims)
    metrics = {
        "model": name,
        "data": data_name,
        **options,
        **likelihood,
        ("val_loss" if loss_fn is not None else "val_nll_nats"): min(history.val_loss),
        **report,
        "num_levels": None if toy else data.num_levels,
        "num_dims": data.num_dims,
        "train_seconds": history.seconds,
        "epochs_run": len(history.train_loss),
        "best_epoch": history.best_epoch,
        "num_params": sum(p.numel() for p in model.parameters()),
        "fast_mode": fast_mode(),
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_checkpoint(out / "model.pt", model, name=name, data=data_name, options=options, metrics=metrics)
    if toy and hasattr(model, "log_prob"):
        samples = model.sample(2000, generator=torch.Generator().manual_seed(seed))
        model.eval()
        plots.density_2d(model.log_prob, samples[:500], resolution=pick(120, 40),
                         title=f"{name} on {data_name}: density and samples").savefig(out / "samples.png", dpi=120)
    elif toy:
        samples = model.sample(2000, generator=torch.Generator().manual_seed(seed))
        plots.samples_2d(samples, data.test[:2000], title=f"{name} on {data_name}: samples (blue), test data (grey)"
                         ).savefig(out / "samples.png", dpi=120)
    else:
        samples = model.sample(64, generator=torch.Generator().manual_seed(seed))
        if isinstance(model, DDPM):  # a DDPM samples in [-1, 1]
            samples = (samples + 1) / 2
        plots.image_grid(samples.clamp(0, 1), nrow=8, vmax=1.0,
                         title=" ".join([name, *options.values(), f"samples ({data_name})"])).savefig(out / "samples.png", dpi=120)
    ylabel = ("L_simple (mean squared error of ε)" if loss_fn is not None
              else "NLL (nats / point)" if toy else "NLL bound (nats / image)")
    plots.training_curves(history, title=name, ylabel=ylabel).savefig(out / "curves.png", dpi=120, bbox_inches="tight")
    return metrics


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
