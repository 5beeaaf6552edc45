"""The fit loop, evaluation, checkpoints, plots and the dgm CLI."""

import json
import math

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from dgmlib import data, flows, plots
from dgmlib.cli import main
from dgmlib.models import MODELS
from dgmlib.train import History, evaluate, fit, load_checkpoint, save_checkpoint


def _small_flow():
    return flows.realnvp((1, 8, 8), num_couplings=2, hidden=16, num_levels=17)


def test_fit_improves_and_keeps_best_weights():
    flow = _small_flow()
    train, val = data.load_digits("train")[:200], data.load_digits("val")[:100]
    before = evaluate(flow, val)
    hist = fit(flow, train, val, epochs=4, batch_size=50, lr=3e-3, progress=False)
    assert len(hist.train_loss) == 4 and len(hist.val_loss) == 4 and len(hist.step_loss) == 16
    assert min(hist.val_loss) < before
    # the restored weights are those of the best epoch
    assert evaluate(flow, val) == pytest.approx(hist.val_loss[hist.best_epoch], rel=1e-6)
    assert evaluate(flow, val) == evaluate(flow, val)  # evaluation noise is fixed


def test_fit_time_budget_is_a_safety_cap_that_warns():
    with pytest.warns(RuntimeWarning, match="time budget"):
        hist = fit(_small_flow(), data.load_digits("train"), epochs=1000, time_budget=0.5, progress=False)
    assert hist.stopped_by == "time budget" and hist.stopped_early and len(hist.train_loss) < 1000
    assert hist.seconds < 5 and hist.epochs == 1000


def test_fit_is_bounded_by_epochs_and_reproducible():
    """The same call and seed give the same losses and weights however busy the machine is: nothing in
    ``fit`` reads the clock to decide what to train."""
    train, val = data.load_digits("train")[:256], data.load_digits("val")[:128]
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        flow = _small_flow()
        hist = fit(flow, train, val, epochs=3, seed=5, progress=False)
        runs.append((hist, [p.detach().clone() for p in flow.parameters()]))
    (h1, p1), (h2, p2) = runs
    assert h1.stopped_by == "epochs" and not h1.stopped_early and len(h1.train_loss) == h1.epochs == 3
    assert h1.step_loss == h2.step_loss and h1.val_loss == h2.val_loss
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_fit_stops_early_after_patience_epochs_without_progress():
    train, val = data.load_digits("train")[:128], data.load_digits("val")[:64]
    torch.manual_seed(0)
    hist = fit(_small_flow(), train, val, epochs=200, lr=3e-2, patience=2, progress=False)
    assert hist.stopped_by == "early stopping" and len(hist.val_loss) < 200
    assert len(hist.val_loss) - 1 - hist.best_epoch == 2  # stopped exactly `patience` epochs after the best
    assert min(hist.val_loss[-2:]) >= hist.val_loss[hist.best_epoch]
    with pytest.raises(ValueError, match="patience"):
        fit(_small_flow(), train, val, epochs=2, patience=0, progress=False)
    with pytest.raises(ValueError, match="validation"):
        fit(_small_flow(), train, None, epochs=2, patience=3, progress=False)


def test_fit_raises_on_nan_loss():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def nll(self, y):
            return self.w + torch.log(torch.zeros(len(y)) - 1)  # NaN

    with pytest.raises(FloatingPointError, match="epoch 0, step 0"):
        fit(Bad(), torch.zeros(8, 2), epochs=1, progress=False)


def test_fit_rejects_bad_settings():
    with pytest.raises(ValueError, match="epochs"):
        fit(_small_flow(), data.load_digits("val"), epochs=0, progress=False)
    with pytest.raises(TypeError, match="nll"):
        fit(nn.Linear(2, 2), torch.zeros(4, 2), progress=False)


def test_fit_with_clipping_and_custom_loss():
    flow = flows.planar_flow(2, 4)
    x = data.toy_2d("moons", 256)
    hist = fit(flow, x, loss_fn=lambda b: -flow.log_prob(b), epochs=3, clip_grad=1.0, progress=False)
    assert hist.train_loss[-1] < hist.train_loss[0]


def test_checkpoint_round_trip(tmp_path):
    flow = _small_flow()
    fit(flow, data.load_digits("val"), epochs=1, progress=False)
    save_checkpoint(tmp_path / "m.pt", flow, note="hi")
    fresh = _small_flow()
    meta = load_checkpoint(tmp_path / "m.pt", fresh)
    assert meta == {"note": "hi"}
    y = data.load_digits("test")[:16]
    assert evaluate(fresh, y) == evaluate(flow, y)
    for a, b in zip(flow.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_plots_return_figures():
    fig = plots.image_grid(data.load_digits("val")[:10], nrow=4, vmax=16, title="digits")
    assert fig.axes
    flow = flows.planar_flow(2, 2)
    fig = plots.density_2d(flow.log_prob, samples=data.toy_2d("moons", 50), resolution=20)
    assert fig.axes
    fig = plots.training_curves(History(train_loss=[3, 2], val_loss=[3.5, 2.5], best_epoch=1))
    assert fig.axes
    with pytest.raises(ValueError, match="shape"):
        plots.image_grid(torch.zeros(2, 8, 8))
    plt.close("all")


def test_cli_list(capsys):
    assert main(["list"]) == 0
    assert "realnvp" in capsys.readouterr().out


def test_cli_train_fast(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "realnvp", "--fast", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_nll_nats", "test_bits_per_dim", "train_seconds", "num_params"):
        assert key in metrics
    assert metrics["test_bits_per_dim"] == pytest.approx(metrics["test_nll_nats"] / (64 * 0.6931471805599453))
    assert (out / "samples.png").stat().st_size > 0 and (out / "model.pt").exists()


def test_cli_reports_what_stopped_training(tmp_path, capsys):
    """``metrics.json`` says what ended training; a run cut by the safety cap says so loudly."""
    out = tmp_path / "r"
    assert main(["train", "nice", "--fast", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_by"] == "epochs" and metrics["epochs"] == metrics["epochs_run"] == 2
    assert "warning" not in metrics
    capsys.readouterr()
    assert main(["train", "nice", "--fast", "--epochs", "500", "--time-cap", "0.2", "--out", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_by"] == "time budget" and metrics["epochs_run"] < 500 == metrics["epochs"]
    assert "time cap" in metrics["warning"] and "WARNING" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "nice", "--time-cap", "0"])


def test_every_default_training_is_bounded_by_epochs():
    """No registry entry trains against the clock: ``train_settings`` carries epochs, never a time budget."""
    for name, spec in MODELS.items():
        for kind in ("digits", "mnist", "toy2d"):
            settings = spec.train_settings(kind)
            assert "time_budget" not in settings, name
            assert isinstance(settings["epochs"], int) and settings["epochs"] >= 1, name


def test_the_catalog_is_the_registrys():
    """``dgm list`` and ``dgm --help`` read ``catalog.json``; it must say what the registry says."""
    from dgmlib import catalog

    assert catalog.load() == catalog.build(), "catalog.json is out of date: run python -m dgmlib.catalog"


@pytest.mark.parametrize("argv", [["list"], ["--help"], ["train", "--help"], ["train", "vae", "--help"]])
def test_listing_and_help_never_import_torch(argv):
    """They answer in well under a second because nothing heavy is imported: not torch, numpy, matplotlib or
    nbformat (checked by module, not by a timed assertion)."""
    import subprocess
    import sys

    code = ("import sys\nfrom dgmlib.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'nbformat', 'sklearn') if m in sys.modules))"
            % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_figures_made_in_fast_mode_say_so(monkeypatch, tmp_path):
    """Every pyplot figure made under DGM_FAST=1 (a lecture's own, or ``dgm train``'s) carries the fast-mode
    label; in full mode none does."""
    def labels(fig):
        return [t.get_text() for t in fig.texts if t.get_gid() == "dgm-fast-mode"]

    monkeypatch.setenv("DGM_FAST", "1")
    fig, _ = plt.subplots()
    assert labels(fig) == [plots.FAST_MODE_LABEL]
    assert labels(plots.image_grid(torch.rand(4, 1, 8, 8))) == [plots.FAST_MODE_LABEL]
    plt.close("all")
    monkeypatch.setenv("DGM_FAST", "0")
    fig, _ = plt.subplots()
    assert labels(fig) == []
    plt.close("all")


def test_cli_rejects_unknown_model():
    with pytest.raises(SystemExit):
        main(["train", "glow9000"])


def test_cli_trains_a_vae_with_a_prior(tmp_path):
    out = tmp_path / "vae"
    assert main(["train", "vae", "--prior", "flow", "--decoder", "dlogistic", "--epochs", "1", "--fast",
                 "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_nll_nats", "test_bits_per_dim", "neg_elbo_nats", "kl_nats", "mutual_info_nats",
                "marginal_kl_nats", "active_units"):
        assert key in metrics, key
    assert metrics["prior"] == "flow" and metrics["decoder"] == "dlogistic" and metrics["iwae_k"] == 100
    assert metrics["test_nll_nats"] <= metrics["neg_elbo_nats"] + 1.0  # IWAE is the tighter bound
    assert metrics["mutual_info_nats"] <= metrics["log_n"] + 1e-6
    assert (out / "samples.png").exists() and (out / "model.pt").exists()
    with pytest.raises(SystemExit):
        main(["train", "realnvp", "--prior", "flow"])
    with pytest.raises(SystemExit):
        main(["train", "vae", "--prior", "gaussian"])


@pytest.mark.parametrize("toy", ["8gaussians", "2spirals"])
def test_cli_trains_ffjord_on_a_toy(tmp_path, toy):
    out = tmp_path / toy
    assert main(["train", "ffjord", "--data", toy, "--epochs", "1", "--fast", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_nll_nats", "test_nll_se_nats", "nfe_forward", "nfe_backward"):
        assert key in metrics, key
    assert metrics["nfe_forward"] >= 6 and metrics["nfe_backward"] >= 6
    assert "test_bits_per_dim" not in metrics  # a continuous 2D density: nats per point only
    if toy == "8gaussians":  # the true density is known: entropy and gap
        assert metrics["entropy_gap_nats"] == pytest.approx(metrics["test_nll_nats"] - metrics["true_entropy_nats"])
        assert metrics["true_entropy_nats"] == pytest.approx(1.697, abs=0.01)
    else:
        assert "true_entropy_nats" not in metrics
    assert (out / "samples.png").exists() and (out / "model.pt").exists()


def test_cli_checks_the_data_fits_the_model():
    for argv in (["train", "ffjord", "--data", "digits"], ["train", "realnvp", "--data", "moons"]):
        with pytest.raises(SystemExit):
            main(argv)


def test_cli_trains_ddpm_on_digits_and_swissroll(tmp_path):
    assert main(["train", "ddpm", "--epochs", "1", "--fast", "--no-progress", "--out", str(tmp_path / "d")]) == 0
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    for key in ("test_nll_nats", "test_bits_per_dim", "bound_diffusion_nats", "sample_seconds_ddpm",
                "sample_seconds_ddim", "sample_distance", "sample_distance_ddim", "data_distance"):
        assert key in metrics, key
    terms = metrics["bound_prior_nats"] + metrics["bound_diffusion_nats"] + metrics["bound_decoder_nats"]
    assert metrics["test_nll_nats"] == pytest.approx(terms, rel=1e-4)
    assert metrics["test_bits_per_dim"] == pytest.approx(metrics["test_nll_nats"] / (64 * 0.6931471805599453))
    assert main(["train", "ddpm", "--data", "swissroll", "--fast", "--no-progress", "--out", str(tmp_path / "s")]) == 0
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert "test_nll_nats" not in metrics and metrics["epochs_run"] == 3
    assert 0 < metrics["data_distance"] < metrics["sample_distance"] and metrics["sample_count"] == 2000
    assert (tmp_path / "s" / "samples.png").exists()


def test_cli_help_lists_each_models_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "vae", "--help"])
    out = capsys.readouterr().out
    assert "--prior" in out and "--decoder" in out and "--device" in out and "vamp" in out
    with pytest.raises(SystemExit):
        main(["train", "ddpm", "--help"])
    out = capsys.readouterr().out
    assert "--prior" not in out and "swissroll" in out
    with pytest.raises(SystemExit):
        main(["train", "realnvp", "--device", "tpu"])


def test_cli_trains_on_mnist_sized_images(tmp_path, monkeypatch):
    """`--data mnist` (no network here: 28x28 images with 256 levels stand in for MNIST's splits)."""
    g = torch.Generator().manual_seed(0)
    fake = {s: torch.randint(0, 256, (n, 1, 28, 28), generator=g).float() for s, n in
            (("train", 64), ("val", 32), ("test", 32))}
    monkeypatch.setattr(data, "load_mnist", lambda split="train", root="": fake[split])
    out = tmp_path / "mnist"
    assert main(["train", "realnvp", "--data", "mnist", "--fast", "--epochs", "1", "--no-progress",
                 "--device", "cpu", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_dims"] == 784 and metrics["num_levels"] == 256 and metrics["device"] == "cpu"
    assert metrics["test_bits_per_dim"] == pytest.approx(metrics["test_nll_nats"] / (784 * math.log(2)))
    assert metrics["nll_method"] == "dequantization bound" and (out / "samples.png").exists()


def test_cli_results_gathers_runs_into_a_table_and_a_figure(tmp_path, capsys):
    runs = tmp_path / "runs"
    rows = [{"model": "vae", "data": "digits", "options": {"prior": "flow"}, "test_nll_nats": 85.5,
             "test_bits_per_dim": 1.927, "nll_method": "IWAE, k = 1000", "train_seconds": 150.2, "num_params": 1234,
             "device": "cpu", "fast_mode": False},
            {"model": "ffjord", "data": "8gaussians", "options": {}, "test_nll_nats": 1.74,
             "nll_method": "exact (continuous)", "train_seconds": 200.0, "num_params": 8836, "device": "cuda"},
            {"model": "ddpm", "data": "swissroll", "options": {}, "train_seconds": 60.0, "num_params": 10}]
    for i, row in enumerate(rows):
        (runs / str(i)).mkdir(parents=True)
        (runs / str(i) / "metrics.json").write_text(json.dumps(row))
    (runs / "broken").mkdir()
    (runs / "broken" / "metrics.json").write_text("{not json")
    assert main(["results", str(runs)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 3 and "bits/dim" in lines[0]
    assert "| vae | prior=flow | digits | 85.50 | 1.927 | IWAE, k = 1000 | 150 | 1,234 | cpu |" in out
    assert "| ffjord |  | 8gaussians | 1.74 |  | exact (continuous) |" in out
    assert (runs / "results.png").stat().st_size > 0
    assert "**vae**" not in out  # the detail tables only with --details
    rows[0].update(neg_elbo_nats=89.25, kl_nats=11.34, mutual_info_nats=6.65, mutual_info_se=0.007,
                   active_units=16, latent_dim=16, epochs_run=347, best_epoch=39)
    (runs / "0" / "metrics.json").write_text(json.dumps(rows[0]))
    assert main(["results", str(runs), "--details"]) == 0
    out = capsys.readouterr().out
    vae_table = out.split("**vae**")[1].split("**")[0]
    assert "| −ELBO (nats) |" in vae_table and "| KL (nats) |" in vae_table
    assert "| prior=flow | digits | 89.25 |" in vae_table and "| 11.34 | 6.65 ± 0.01 |" in vae_table
    assert "| 16/16 | 150 | 347 (39) |" in vae_table
    assert "**ddpm**" in out and "**ffjord**" in out  # a run missing metrics leaves empty cells, no KeyError
    rows[0].update(stopped_by="early stopping")
    rows[1].update(stopped_by="time budget", epochs_run=5, best_epoch=4)
    for i in (0, 1):
        (runs / str(i) / "metrics.json").write_text(json.dumps(rows[i]))
    with pytest.raises(SystemExit):  # no run has samples.png yet
        main(["results", str(runs), "--details", "--gallery", str(tmp_path / "g.png")])
    capsys.readouterr()
    for i in (0, 1):
        plt.imsave(runs / str(i) / "samples.png", torch.rand(16, 16).numpy(), cmap="gray")
    assert main(["results", str(runs), "--details", "--gallery", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "| 347 (39), early stop |" in out and "5 (4), CUT BY THE TIME CAP |" in out
    assert "| cuda (cut by the time cap) |" in out
    assert (tmp_path / "g.png").stat().st_size > 0 and "gallery:" in out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["results", str(tmp_path / "empty")])
    plt.close("all")
