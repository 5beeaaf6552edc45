"""Registry entry of lecture 12's model, kept beside its family: ``flow_matching``.

Imported at the end of ``dgmlib.models``, which adds it to ``MODELS`` with ``register``; its options choose the path
(``--path ot|vp``), the coupling (``--coupling independent|ot``), one reflow step (``--reflow 1``), class
conditioning with classifier-free guidance (``--conditioning class``, digits only) and generation in the latent
space of a VAE trained first (``--latent vae``, digits only).

Metrics (``metrics.json``), in nats unless a name says otherwise:

* ``test_nll_nats``: the ODE's exact NLL (exact trace, dopri5, rtol = atol = 1e-5); on the digits, of uniformly
  dequantized images, a bound on -log P(y); ``ode_nfe`` its evaluations. Not for the class-conditional or latent
  models (the first is judged by its guided samples, the second has a decoder without a density here).
* ``sample_seconds_per_image_S``, ``sample_nfe_S`` (ODE evaluations) and ``frechet_distance_S`` (digits;
  ``sample_distance_S``, sliced Wasserstein, on the toys and MNIST) for each sampler S, against ``frechet_floor``
  (``data_distance``); ``frechet_euler_N`` (``sliced_euler_N``) for N Euler steps; ``straightness``, Liu et al.'s S
  along the model's own 100-step Euler paths.
* With ``--reflow 1``: the same before reflow, prefixed ``before_reflow_``.
* With ``--conditioning class``: ``guided_accuracy_w``, ``guided_frechet_w``, ``guided_seconds_per_image_w`` and
  ``guided_nfe_w`` (ODE evaluations, each two network passes when w is neither 0 nor 1) for each guidance scale w.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from dgmlib import diffusion, plots, vq
from dgmlib import flow_matching as fm
from dgmlib.config import pick
from dgmlib.data import (
    ImageData,
    ToyData,
    load_digit_labels,
    load_digits,
)
from dgmlib.device import module_device
from dgmlib.models import (
    MAX_TEST_IMAGES,
    Data,
    ModelSpec,
    Option,
    register,
    samples_in_unit_interval,
)
from dgmlib.results import Column, number
from dgmlib.score_models import _synchronize, _toy_entropy
from dgmlib.train import fit

__all__ = ["GUIDANCE_SCALES", "REPORTED_GUIDANCE"]

GUIDANCE_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
"""The guidance scales of the class-conditional model's report (0: unconditional, 1: conditional)."""
REPORTED_GUIDANCE = 2.0
"""The scale of the class-conditional model's figure and column: on the digits, 99.6 % of its samples are read as
their class at a Fréchet distance of 17.7 (w = 1: 95.2 % at 12.5; w = 3: 100 % at 37.2; README)."""
EULER_STEPS = (1, 2, 5, 10, 20, 50, 100)
"""The Euler step counts of the Fréchet distance against NFE."""


def _is_digits(d: Data) -> bool:
    return isinstance(d, ImageData) and d.name == "digits"


def _pixel_model(d: Data, path: str, coupling: str, num_classes: int | None = None) -> fm.FlowMatching:
    if isinstance(d, ToyData):
        return fm.FlowMatching(diffusion.TimeMLP(d.num_dims, hidden=pick(128, 64), num_layers=3), (d.num_dims,),
                               path, coupling)
    # base 32, half VDM's: the exact trace of the test NLL costs 64 backward passes per ODE evaluation
    net = diffusion.UNet(d.shape[0], base=pick(32, 16), num_classes=num_classes)
    return fm.FlowMatching(net, d.shape, path, coupling, num_levels=d.num_levels, num_classes=num_classes)


def _latent_model(d: ImageData, path: str, coupling: str) -> fm.LatentFlowMatching:
    """A VAE (16 latents, standard prior, categorical decoder) trained first on the digits, then frozen."""
    from dgmlib.vae import build_vae

    vae = build_vae(d.shape, d.num_levels, latent_dim=16)
    history = fit(vae, d.train, d.val, epochs=pick(200, 2), lr=1e-3, batch_size=64,
                  seed=torch.initial_seed() % 2 ** 31, progress=False, device="cpu")
    flow = fm.FlowMatching(diffusion.TimeMLP(16, hidden=pick(256, 64), num_layers=4, emb_dim=64), (16,), path,
                           coupling)
    model = fm.LatentFlowMatching(vae, flow, d.train)
    model.autoencoder_seconds = history.seconds  # reported: train_seconds counts the flow's training only
    return model


def _build(d: Data, path: str = "ot", coupling: str = "independent", reflow: str = "0", conditioning: str = "none",
           latent: str = "none") -> nn.Module:
    special = [name for name, value in (("--reflow 1", reflow != "0"), ("--conditioning class", conditioning != "none"),
                                        ("--latent vae", latent != "none")) if value]
    if len(special) > 1:
        raise ValueError(f"choose one of {', '.join(special)} per run")
    if (conditioning != "none" or latent != "none") and not _is_digits(d):
        raise ValueError("--conditioning class and --latent vae train on the digits (their labels and VAE are bundled)")
    if latent == "vae":
        return _latent_model(d, path, coupling)
    return _pixel_model(d, path, coupling, num_classes=10 if conditioning == "class" else None)


def _inputs(model: nn.Module, d: Data, split: str) -> Tensor:
    """The class-conditional model trains on the images packed with their labels; the others on the images."""
    images = getattr(d, split)
    if isinstance(model, fm.FlowMatching) and model.num_classes is not None:
        return fm.pack_labels(images, load_digit_labels(split).to(images.device))
    return images


# --------------------------------------------------------------------------- measuring samples


def _timed(model: nn.Module, draw: Callable[[], Tensor]) -> tuple[Tensor, float]:
    sync = _synchronize(model)
    sync()
    start = time.perf_counter()
    samples = draw()
    sync()
    return samples, time.perf_counter() - start


def _digits01(x: Tensor) -> Tensor:
    return ((x.float().cpu() + 1) / 2).clamp(0, 1)


def _sample_quality(model: nn.Module, data: Data, seed: int, prefix: str = "") -> dict:
    """Time per image and distance to the data of each sampler, the distance against Euler's NFE, straightness."""
    n = min(len(data.test), MAX_TEST_IMAGES if isinstance(data, ImageData) else 2000)
    n = pick(n, min(n, 64))
    metrics: dict = {}
    images = _is_digits(data)  # the Fréchet distance's classifier knows the 8x8 digits only
    if images:
        metrics.update(frechet_floor=vq.frechet_digit_distance(load_digits("test") / 16.0), frechet_samples=n)

        def distance(x: Tensor) -> float:
            return vq.frechet_digit_distance(_digits01(x))
    else:  # the sliced Wasserstein distance to test points (2D) or test images in [-1, 1] (MNIST)
        to_unit = (lambda y: diffusion.levels_to_unit(y, data.num_levels)) if isinstance(data, ImageData) \
            else (lambda x: x)
        test, held_out = (to_unit(v[:n].cpu()).flatten(1) for v in (data.test, data.val))
        metrics.update(data_distance=diffusion.sliced_wasserstein(held_out, test), sample_count=n)

        def distance(x: Tensor) -> float:
            return diffusion.sliced_wasserstein(x.float().cpu().flatten(1), test)
    steps = pick(10, 2)
    for sampler, num_steps in (("euler", steps), ("midpoint", steps // 2), ("heun", steps // 2), ("dopri5", None)):
        g = torch.Generator().manual_seed(seed)
        samples, seconds = _timed(model, lambda s=sampler, k=num_steps, g=g: model.sample(n, s, k, generator=g))
        name = "frechet_distance" if images else "sample_distance"
        metrics.update({f"sample_seconds_per_image_{sampler}": seconds / n, f"{name}_{sampler}": distance(samples),
                        f"sample_nfe_{sampler}": model.last_nfe})
    for num_steps in pick(EULER_STEPS, (1, 2)):
        g = torch.Generator().manual_seed(seed)
        metrics[f"{'frechet' if images else 'sliced'}_euler_{num_steps}"] = distance(
            model.sample(n, "euler", num_steps, generator=g))
    flow = model.flow if isinstance(model, fm.LatentFlowMatching) else model
    x0 = flow.prior_sample(pick(500, 50), torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        metrics["straightness"] = fm.straightness(flow.field(), x0, pick(100, 10), flow.path.t_max).mean().item()
    return {prefix + k: v for k, v in metrics.items()}


def _nll(model: fm.FlowMatching, data: Data, seed: int) -> dict:
    images = isinstance(data, ImageData)
    test = data.test[:pick(MAX_TEST_IMAGES, 8) if images else pick(2000, 200)]
    trace = "exact" if data.num_dims <= 64 else "rademacher"  # MNIST: 784 backward passes per step is too many
    g = torch.Generator().manual_seed(seed)
    nll, nfe = [], []
    start = time.perf_counter()
    for batch in test.split(500):
        nll.append(model.nll(batch, generator=g, trace=trace))
        nfe.append(model.last_nfe)
    nll = torch.cat(nll)
    metrics = {"test_nll_nats": nll.mean().item(), "test_nll_se_nats": (nll.std() / math.sqrt(len(nll))).item(),
               "ode_nfe": max(nfe), "nll_seconds": time.perf_counter() - start, "ode_trace": trace}
    if images:
        how = (f"exact trace: {data.num_dims} backward passes per evaluation" if trace == "exact"
               else "Hutchinson's trace, one Rademacher draw per image")
        metrics.update(nll_method="dequantization bound (ODE likelihood)",
                       likelihood=f"E_u[-log p_ODE(x + u)] - D log h in nats per image on {len(test)} test images: the "
                                  f"ODE's density (dopri5, rtol = atol = 1e-5, {how}) of uniformly dequantized data "
                                  "(bins of width h = 2/(K-1)), one draw per image")
    else:
        metrics.update(nll_method="exact (ODE)", likelihood=f"-log p(x) of the ODE (exact trace, dopri5, rtol = atol "
                                                            f"= 1e-5) on {len(test)} test points, nats per point")
        _toy_entropy(metrics, data, seed, "test_nll_nats")
    return metrics


def _guidance(model: fm.FlowMatching, seed: int) -> dict:
    """Guided samples (dopri5) of every class at each scale of ``GUIDANCE_SCALES``: the digit classifier's accuracy
    on them and their Fréchet distance to the training digits; the time per image at ``REPORTED_GUIDANCE``."""
    per_class = pick(50, 5)
    labels = torch.arange(10).repeat_interleave(per_class).to(module_device(model))
    classifier = vq.digit_classifier()
    metrics: dict = {"guided_samples_per_class": per_class, "reported_guidance": REPORTED_GUIDANCE}
    for w in GUIDANCE_SCALES:
        g = torch.Generator().manual_seed(seed)
        samples, seconds = _timed(model, lambda w=w, g=g: model.sample(len(labels), "dopri5", labels=labels,
                                                                       guidance=w, generator=g))
        images = _digits01(samples)
        with torch.no_grad():
            predicted = classifier(images).argmax(1)
        metrics.update({f"guided_accuracy_{w:g}": (predicted == labels.cpu()).float().mean().item(),
                        f"guided_frechet_{w:g}": vq.frechet_digit_distance(images),
                        f"guided_seconds_per_image_{w:g}": seconds / len(labels),
                        f"guided_nfe_{w:g}": model.last_nfe})
    return metrics


# --------------------------------------------------------------------------- report, reflow, figures


def _report(model: nn.Module, data: Data, seed: int) -> dict:
    """See the module's docstring."""
    model.eval()
    metrics: dict = {"path": type(getattr(model, "flow", model).path).__name__}
    if isinstance(model, fm.FlowMatching) and model.num_classes is not None:
        metrics.update(nll_method="none (judged by its guided samples)",
                       likelihood="none reported: the class-conditional model is measured by the classifier's accuracy "
                                  "on its guided samples and their Fréchet distance")
        metrics.update(_guidance(model, seed))
        return metrics
    if isinstance(model, fm.LatentFlowMatching):
        metrics.update(nll_method="none (latent model)",
                       likelihood="none reported: the latent flow's samples are decoded by the VAE's mean; compared by "
                                  "the Fréchet distance")
        g = torch.Generator().manual_seed(seed)
        prior = _digits01(model.autoencoder.sample(len(data.test), generator=g) * 2 - 1)
        metrics.update(frechet_vae_prior=vq.frechet_digit_distance(prior),
                       autoencoder_train_seconds=getattr(model, "autoencoder_seconds", None))
    else:
        metrics.update(_nll(model, data, seed))
    metrics.update(_sample_quality(model, data, seed))
    if _is_digits(data):
        metrics["likelihood"] += (f"; Fréchet distances of {len(data.test)} samples to the training digits on the "
                                  "features of dgmlib.vq.digit_classifier, the floor being the held-out test digits'")
    return metrics


def _reflow(model: nn.Module, data: Data, settings: dict) -> dict:
    """``--reflow 1``: measure the samples, then one reflow step (Liu et al. 2023, Algorithm 1): pairs
    (x0, ODE(x0)) of the trained flow (dopri5), and the same network trained further on them."""
    if not (isinstance(model, fm.FlowMatching) and getattr(model, "reflow_steps", 0)):
        return {}
    device = settings["device"]
    model.to(device).eval()
    before = _sample_quality(model, data.to(device), settings["seed"], prefix="before_reflow_")
    num_pairs = pick(5000, 64)
    g = torch.Generator().manual_seed(settings["seed"] + 7)
    start = time.perf_counter()
    pairs = []
    for part in range(0, num_pairs, 500):
        x0 = model.prior_sample(min(500, num_pairs - part), g)
        pairs.append(torch.stack(fm.reflow_pairs(model.field(), x0, t_end=model.path.t_max), dim=1))  # (B, 2, ...)
    pairs = torch.cat(pairs)
    pair_seconds = time.perf_counter() - start
    split = num_pairs * 9 // 10
    history = fit(model.net, pairs[:split], pairs[split:], loss_fn=lambda b: model.pair_loss(b[:, 0], b[:, 1]),
                  epochs=pick(100, 1), lr=5e-4, batch_size=128, seed=settings["seed"], progress=settings["progress"],
                  device=device)
    return {**before, "reflow_pairs": num_pairs, "reflow_pair_seconds": pair_seconds,
            "reflow_train_seconds": history.seconds, "reflow_epochs": len(history.train_loss)}


def _build_with_reflow(d: Data, **options: str) -> nn.Module:
    model = _build(d, **options)
    model.reflow_steps = int(options.get("reflow", "0"))
    return model


def _figures(model: nn.Module, data: Data, seed: int, title: str) -> dict[str, Figure]:
    """``samples.png`` (dopri5); for the class-conditional model, a row of guided samples per class."""
    if not (isinstance(model, fm.FlowMatching) and model.num_classes is not None):
        return samples_in_unit_interval(model, data, seed, title)
    labels = torch.arange(10).repeat_interleave(8).to(module_device(model))
    samples = model.sample(len(labels), labels=labels, guidance=REPORTED_GUIDANCE,
                           generator=torch.Generator().manual_seed(seed))
    return {"samples": plots.image_grid(_digits01(samples), nrow=8, vmax=1.0,
                                        title=f"{title}: guided samples (w = {REPORTED_GUIDANCE:g}), a row per class")}


def _sampler_columns() -> tuple[Column, ...]:
    def cell(r: dict, s: str) -> str:
        for key in (f"frechet_distance_{s}", f"sample_distance_{s}"):
            if key in r:
                return f"{1000 * r[f'sample_seconds_per_image_{s}']:.2f}, {r[key]:.2f}"
        return ""
    return tuple(Column(f"{label}: ms/image, distance", lambda r, s=s: cell(r, s))
                 for s, label in (("euler", "Euler, 10 steps"), ("dopri5", "dopri5")))


register("flow_matching", ModelSpec(
    family="flow matching",
    description="flow matching: a U-Net (an MLP for 2D) trained by conditional flow matching on the OT or VP path, "
                "independent or minibatch-OT coupling; optional reflow, class conditioning with classifier-free "
                "guidance, or a VAE's latent space; exact ODE NLL (lecture 12)",
    build=_build_with_reflow, epochs=400, fast_epochs=3, lr=2e-3, batch_size=64, report=_report,
    data=("images", "toy2d"), figures=_figures, loss=lambda model: model.training_loss,
    loss_label="||v_θ(x_t, t) - u_t(x_t | x0, x1)||² (conditional flow matching)",
    overrides={"toy2d": {"epochs": (300, 3), "batch_size": (128, 512)}},
    options={"path": Option(fm.PATHS, "ot", "the probability path: optimal transport (straight) or variance preserving"),
             "coupling": Option(fm.COUPLINGS, "independent", "pair noise and data independently, or by the exact OT "
                                                             "assignment within each minibatch (POT)"),
             "reflow": Option(("0", "1"), "0", "after training, one reflow step on 5000 (noise, sample) pairs"),
             "conditioning": Option(("none", "class"), "none", "class-conditional with label dropout 0.1, sampled "
                                                               "with classifier-free guidance (digits)"),
             "latent": Option(("none", "vae"), "none", "flow matching in the 16-d latent space of a VAE trained "
                                                       "first, decoded to images (digits)")},
    after_fit=_reflow, inputs=_inputs,
    columns=(Column("ODE NFE", lambda r: str(r.get("ode_nfe") or "")),
             Column("true entropy (nats)", number("true_entropy_nats", 3)),
             Column("straightness", number("straightness", 3)))
    + _sampler_columns() + (Column("floor", lambda r: f"{r.get('frechet_floor', r.get('data_distance', 0)):.2f}"
                                   if "frechet_floor" in r or "data_distance" in r else ""),
                            Column("before reflow: straightness, Euler 10 distance", lambda r: (
                                f"{r['before_reflow_straightness']:.3f}, {r['before_reflow_frechet_euler_10']:.2f}"
                                if "before_reflow_straightness" in r else "")),
                            Column("guided (w = 2): accuracy, Fréchet, ms/image", lambda r: (
                                f"{r['guided_accuracy_2']:.3f}, {r['guided_frechet_2']:.1f}, "
                                f"{1000 * r['guided_seconds_per_image_2']:.0f}" if "guided_accuracy_2" in r else "")),
                            Column("VAE prior: Fréchet", number("frechet_vae_prior"))),
))
