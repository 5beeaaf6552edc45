"""Devices without a GPU: every registered model keeps its tensors on the device of its parameters.

CI has no GPU, so two traps stand in for one:

* **meta.** The model and its batch live on PyTorch's ``meta`` device (shapes, no values). Any tensor
  that a model makes on the CPU and mixes with its own raises, exactly as it would on a GPU, and so
  does any read of a value (``.item()``, ``if tensor.any()``), which on a GPU is a host round trip.
* **default device.** The model and its batch stay on the CPU with real values while
  ``torch.set_default_device("meta")``: a tensor made without ``device=`` lands on ``meta`` and mixing
  it with the model's raises. This covers the paths that need real values, listed in ``NEEDS_VALUES``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dgmlib import cnf, device, diffusion, score
from dgmlib.data import ImageData, load_image_data, load_toy_data
from dgmlib.models import MODELS
from dgmlib.train import check_data, evaluate, fit

NEEDS_VALUES = {"ffjord": "torchdiffeq's adaptive dopri5 reads its step sizes and the times' values",
                "score_sde": "its nll solves the probability-flow ODE with torchdiffeq's adaptive dopri5",
                "ncsn": "annealed Langevin sampling takes its step sizes from the values of the noise levels",
                "flow_matching": "its nll and default sampler solve the ODE with torchdiffeq's adaptive dopri5, and the "
                                 "OT coupling solves the assignment on the host"}
"""Registered models that cannot run on ``meta``; the default-device trap and the dynamics test cover them."""
SLOW_EXERCISE = {"flow_matching"}
"""Models whose untrained likelihood takes a minute here (the exact trace of an ODE made stiff by an untrained network's
time embedding): their default-device trap runs in the whole suite, not the quick tier."""


def _data(name: str):
    spec = MODELS[name]
    return load_image_data(spec.default_data) if spec.data[0] == "images" else load_toy_data(spec.default_data)


def _step(model: nn.Module, spec, batch: torch.Tensor) -> torch.Tensor:
    """One training step as ``fit`` takes it, without reading any value."""
    model.train()
    loss_fn = spec.loss(model) if spec.loss is not None else model.nll
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = loss_fn(batch).mean()
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def _score(model: nn.Module, spec):
    """What evaluates a model: its ``nll``, or its training loss for a model without a likelihood (a GAN)."""
    return model.nll if callable(getattr(model, "nll", None)) else spec.loss(model)


def _exercise(model: nn.Module, spec, batch: torch.Tensor) -> list[torch.Tensor]:
    """A training step, ``nll`` in eval mode, and samples with and without a seeded CPU generator."""
    outputs = [_step(model, spec, batch)]
    model.eval()
    with torch.no_grad():
        outputs.append(_score(model, spec)(batch))
    outputs.append(model.sample(3))
    outputs.append(model.sample(3, generator=torch.Generator().manual_seed(0)))
    return outputs


@pytest.mark.parametrize("name", [n for n in MODELS if n not in NEEDS_VALUES])
def test_every_model_trains_evaluates_and_samples_on_meta(name):
    spec = MODELS[name]
    d = _data(name)
    model = spec.build(d).to("meta")
    for out in _exercise(model, spec, d.train[:8].to("meta")):
        assert out.device.type == "meta"
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXERCISE else n for n in MODELS])
def test_no_model_makes_tensors_on_the_default_device(name):
    spec = MODELS[name]
    d = _data(name)
    torch.manual_seed(0)
    model = spec.build(d)
    batch = d.train[:16]
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        outputs = _exercise(model, spec, batch)
    finally:
        torch.set_default_device(previous)
    for out in outputs:
        assert out.device.type == "cpu" and torch.isfinite(out).all()


def test_the_traps_catch_a_tensor_made_on_the_wrong_device():
    """What the first run of these tests caught in vae, hvae, ffjord and ddpm: noise made on the CPU."""

    class Careless(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def sample(self, n):
            return self.w + torch.randn(n, 2)  # no device=: on the CPU (or the default device)

    with pytest.raises(RuntimeError, match="meta|device"):
        Careless().to("meta").sample(3)
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        with pytest.raises(RuntimeError, match="meta|device"):
            Careless().to("cpu").sample(3)
    finally:
        torch.set_default_device(previous)


def test_ffjord_dynamics_run_on_meta():
    """The CNF's augmented dynamics (velocity, Hutchinson noise, exact trace) keep to the state's device;
    only the adaptive solver around them needs values."""
    model = MODELS["ffjord"].build(load_toy_data("8gaussians")).to("meta")
    state = torch.zeros(8, 3, device="meta", requires_grad=True)
    for training in (True, False):
        model.train(training)
        dyn = model.dynamics
        dyn.exact = not training
        dyn.noise = cnf.sample_noise((8, 2), "rademacher", dtype=state.dtype, device=state.device)
        out = dyn(torch.zeros((), device="meta"), state)
        assert out.device.type == "meta" and out.shape == (8, 3)
    assert cnf.sample_noise((4, 2), "gaussian", torch.Generator().manual_seed(0), device="meta").device.type == "meta"


def _mnist_like(n: int = 8) -> ImageData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g).float()
    return ImageData(images, images[:4], images[:4], 256, "mnist")


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if "images" in s.data])
def test_every_image_model_builds_for_mnist(name, monkeypatch):
    """``--data mnist``: 28x28 images with 256 levels. The GPU-size model (full mode) takes a training
    step on meta; the fast-mode model also evaluates and samples there (fewer diffusion steps)."""
    spec = MODELS[name]
    d = _mnist_like()
    batch = d.train.to("meta")
    monkeypatch.setenv("DGM_FAST", "0")
    model = spec.build(d).to("meta")
    assert _step(model, spec, batch).shape == ()
    digits_params = sum(p.numel() for p in spec.build(load_image_data("digits")).parameters())
    assert sum(p.numel() for p in model.parameters()) >= digits_params
    settings = spec.train_settings("mnist")
    assert settings["batch_size"] >= 64 and "time_budget" not in settings  # bounded by epochs, not the clock
    if name in NEEDS_VALUES:  # test_score_models_run_on_meta covers the rest of what runs without values
        return
    monkeypatch.setenv("DGM_FAST", "1")
    model = spec.build(d).to("meta").eval()
    with torch.no_grad():
        assert _score(model, spec)(batch).shape == (8,)
        assert model.sample(2).shape == (2, 1, 28, 28)


# --------------------------------------------------------------------------- picking the device


def test_default_device_and_its_override(monkeypatch):
    monkeypatch.delenv("DGM_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert device.default_device().type == expected
    monkeypatch.setenv("DGM_DEVICE", "cpu")
    assert device.default_device() == torch.device("cpu")
    monkeypatch.setenv("DGM_DEVICE", "meta")
    assert device.default_device() == torch.device("meta")
    monkeypatch.setenv("DGM_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="DGM_DEVICE"):
        device.default_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_gpu_fails_loudly(monkeypatch):
    with pytest.raises(ValueError, match="cuda.is_available"):
        device.resolve_device("cuda")
    monkeypatch.setenv("DGM_DEVICE", "cuda")
    with pytest.raises(ValueError, match="DGM_DEVICE"):
        fit(MODELS["realnvp"].build(load_image_data("digits")), load_image_data("digits").val, epochs=1,
            progress=False)
    with pytest.raises(TypeError):
        device.resolve_device(0)


def test_seeded_noise_is_the_same_on_every_device():
    for draw in (device.randn, device.rand):
        cpu = draw((3, 4), device="cpu", generator=torch.Generator().manual_seed(5))
        again = draw((3, 4), device="cpu", generator=torch.Generator().manual_seed(5))
        meta = draw((3, 4), device="meta", generator=torch.Generator().manual_seed(5))
        assert torch.equal(cpu, again) and meta.device.type == "meta" and meta.shape == (3, 4)
    ints = device.randint(0, 5, (100,), device="cpu", generator=torch.Generator().manual_seed(1))
    assert ints.dtype == torch.int64 and 0 <= ints.min() and ints.max() < 5
    probs = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    draws = device.multinomial(probs, 1, generator=torch.Generator().manual_seed(0))
    assert draws[1, 0] == 0
    assert device.bernoulli(torch.ones(3), generator=torch.Generator().manual_seed(0)).tolist() == [1, 1, 1]


def test_a_seeded_sample_does_not_depend_on_the_global_state():
    model = MODELS["vae"].build(load_image_data("digits"))
    a = model.sample(4, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    b = model.sample(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_place_data_keeps_the_data_where_it_fits():
    x = torch.zeros(10, 3)
    assert device.place_data(x, "cpu") is x
    assert device.place_data(x, "meta").device.type == "meta"
    with pytest.raises(ValueError, match="fraction"):
        device.place_data(x, "cpu", fraction=0)


# --------------------------------------------------------------------------- fit and evaluate


class _Recorder(nn.Module):
    """A tiny density whose nll records whether its input was value-checked and where it ran."""

    num_levels = 17

    def __init__(self):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(4))
        self.seen: list[tuple[bool, str]] = []

    def nll(self, y):
        self.seen.append((device.value_checks(y), y.device.type))
        return 0.5 * ((y.flatten(1) / 16 - self.mean) ** 2).sum(1) + 2 * math.log(2 * math.pi)


def test_fit_checks_the_data_once_and_not_each_batch():
    model = _Recorder()
    y = torch.randint(0, 17, (40, 4)).float()
    fit(model, y, y[:10], epochs=2, batch_size=8, progress=False, device="cpu")
    assert model.seen and not any(checked for checked, _ in model.seen)  # no host round trip per batch
    assert {where for _, where in model.seen} == {"cpu"}
    assert device.value_checks(y)  # outside fit, checks are on again
    bad = y.clone()
    bad[3, 1] = 17.0
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        fit(_Recorder(), bad, epochs=1, progress=False)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate(_Recorder(), bad)
    with pytest.raises(ValueError, match="non-empty"):
        check_data(_Recorder(), torch.zeros(0, 4))


def test_fit_returns_the_model_to_its_device():
    model = _Recorder()
    fit(model, torch.randint(0, 17, (16, 4)).float(), epochs=1, progress=False, device="cpu")
    assert model.mean.device.type == "cpu"


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_fit_stops_on_a_nan_gradient_and_restores_the_best_weights():
    """A NaN gradient with a finite loss must not be applied, and the best weights come back first."""

    class Breaks(_Recorder):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def nll(self, y):
            self.calls += self.training
            mean = _NanGradient.apply(self.mean) if self.training and self.calls > 6 else self.mean
            return 0.5 * ((y.flatten(1) / 16 - mean) ** 2).sum(1)

    model = Breaks()
    y = torch.randint(0, 17, (20, 4)).float()
    with pytest.raises(FloatingPointError, match="gradient norm became nan at epoch 1.*restored"):
        fit(model, y, y, epochs=5, batch_size=4, lr=0.1, progress=False)
    assert torch.isfinite(model.mean).all()
    reference = Breaks()
    fit(reference, y, y, epochs=1, batch_size=4, lr=0.1, progress=False)  # the same first epoch
    torch.testing.assert_close(model.mean, reference.mean)


# --------------------------------------------------------------------------- the review's defects


def test_ddim_with_one_step_starts_at_T():
    seen = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            seen.append(sorted(set(t.tolist())))
            return x * self.w

    model = diffusion.DDPM(Net(), diffusion.NoiseSchedule.linear(100), (2,))
    model.ddim_sample(4, steps=1)
    assert seen == [[100]]
    seen.clear()
    model.ddim_sample(4, steps=3)
    assert seen == [[100], [50], [1]]


@pytest.mark.parametrize("name", ["ncsn", "score_sde", "vdm"])
def test_score_models_run_on_meta(name):
    """Lecture 11's models on ``meta``, for the images and the 2D data: a training step, the score, the
    fixed-step samplers, and the probability-flow dynamics (exact and Hutchinson trace) that the adaptive
    solver would call; only the solver itself and annealed Langevin's step sizes need values."""
    spec = MODELS[name]
    for d in (load_image_data("digits"), load_toy_data("8gaussians")):
        model = spec.build(d).to("meta")
        batch = d.train[:8].to("meta")
        assert _step(model, spec, batch).device.type == "meta"
        model.eval()
        x = torch.zeros(8, *d.shape if isinstance(d, ImageData) else (d.num_dims,), device="meta")
        with torch.no_grad():
            if name == "ncsn":
                sigma = model.sigmas[:1].float().expand(8)
                outputs = [model.score(x, sigma), spec.loss(model)(batch)]
            else:
                t = torch.full((8,), 0.5, device="meta")
                outputs = [model.score(x, t), model.sample(2, "euler_maruyama", num_steps=2),
                           model.sample(2, "predictor_corrector", num_steps=2,
                                        generator=torch.Generator().manual_seed(0))]
                if name == "vdm":
                    outputs += [model.nll(batch), model.sample(2, "ancestral", num_steps=2),
                                model.bound_terms(batch, num_steps=10)["total"]]
                dim = x[0].numel()
                flow = score.ProbabilityFlow(model.sde, model.score, x.shape[1:])
                for trace in ("exact", "rademacher"):
                    dyn = cnf.CNFDynamics(flow, dim, trace)
                    dyn.noise = cnf.sample_noise((8, dim), trace, dtype=x.dtype, device="meta") \
                        if trace != "exact" else None
                    outputs.append(dyn(torch.tensor(0.5, device="meta"), torch.zeros(8, dim + 1, device="meta")))
        for out in outputs:
            assert out.device.type == "meta"


def test_flow_matching_runs_on_meta():
    """Lecture 12's models on ``meta``: a training step (independent coupling; class-conditional with label
    dropout), the fixed-step samplers, guided sampling, and the exact-trace dynamics of the likelihood
    that the adaptive solver would call."""
    from dgmlib import flow_matching as fm

    spec = MODELS["flow_matching"]
    digits = load_image_data("digits")
    for d, options in ((digits, {}), (digits, {"conditioning": "class"}), (load_toy_data("8gaussians"), {})):
        model = spec.build(d, **options).to("meta")
        batch = spec.inputs(model, d, "train")[:8].to("meta")
        assert _step(model, spec, batch).device.type == "meta"
        model.eval()
        labels = torch.arange(4, device="meta") if model.num_classes else None
        outputs = [model.sample(4, s, 2, labels=labels, guidance=2.0) for s in ("euler", "midpoint", "heun")]
        outputs.append(model.sample(4, "euler", 2, labels=labels, generator=torch.Generator().manual_seed(0)))
        flow = model.cnf()
        dim = model.num_dims
        outputs.append(flow.dynamics(torch.tensor(0.5, device="meta"), torch.zeros(4, dim + 1, device="meta")))
        for out in outputs:
            assert out.device.type == "meta"
