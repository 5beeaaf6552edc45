"""Registry entries of lecture 11's models, kept beside their family: ``ncsn``, ``score_sde`` and ``vdm``.

Imported at the end of ``dgmlib.models``, which adds them to ``MODELS`` with ``register``; everything
particular to these models (how to build them, their options, test metrics, figures and columns) is
here, and ``dgmlib.cli`` has no code for them.

Metrics (``metrics.json``), all in nats unless a name says otherwise:

* ``test_nll_nats`` with ``nll_method``: VDM's continuous-time variational bound; for ``score_sde``, the
  probability-flow ODE's NLL (on the digits, of uniformly dequantized data: a bound on -log P(y)).
* ``ode_nll_nats`` and ``ode_nfe``: the probability-flow ODE's NLL and its number of function evaluations.
* ``sample_seconds_per_image_SAMPLER`` and ``sample_distance_SAMPLER`` for each sampler, against
  ``data_distance``: the sliced Wasserstein distance of held-out data to the same test points (the floor).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dgmlib import diffusion, score
from dgmlib.config import pick
from dgmlib.data import TOY_DENSITIES, ImageData, ToyData, toy_entropy
from dgmlib.device import module_device
from dgmlib.models import MAX_TEST_IMAGES, Data, ModelSpec, Option, register, samples_in_unit_interval
from dgmlib.results import Column, number

__all__ = ["ncsn_sigmas"]


def ncsn_sigmas(x: Tensor, sigma_min: float = 0.01, num_levels: int = 10) -> Tensor:
    """NCSN's noise levels for data ``x`` ``(N, ...)``: geometric from σ_1 = the largest pairwise
    Euclidean distance of (up to 1000 of) the points (Song & Ermon 2020, Technique 1) down to
    ``sigma_min``; float64 ``(L,)``."""
    flat = x[:1000].flatten(1).double()
    return score.geometric_sigmas(float(torch.cdist(flat, flat).max()), sigma_min, num_levels)


def _to_unit(d: Data) -> Callable[[Tensor], Tensor]:
    """Data to the models' space: image levels to [-1, 1]; 2D points unchanged."""
    return (lambda y: diffusion.levels_to_unit(y, d.num_levels)) if isinstance(d, ImageData) else (lambda x: x)


def _net(d: Data, in_channels: int | None = None) -> nn.Module:
    if isinstance(d, ToyData):
        return diffusion.TimeMLP(d.num_dims, hidden=pick(128, 64), num_layers=3)
    return diffusion.UNet(d.shape[0], base=pick(64, 16), in_channels=in_channels)


def _build_ncsn(d: Data) -> score.NCSN:
    images = isinstance(d, ImageData)
    return score.NCSN(_net(d), ncsn_sigmas(_to_unit(d)(d.train), num_levels=pick(10, 5)),
                      d.shape if images else (d.num_dims,),
                      num_levels=d.num_levels if images else None, epsilon=pick(2e-5, 2e-5) if images else 1e-4,
                      steps_per_level=pick(100, 10))


def _build_score_sde(d: Data, sde: str = "vp") -> score.ScoreSDE:
    images = isinstance(d, ImageData)
    return score.ScoreSDE(_net(d), score.make_sde(sde), d.shape if images else (d.num_dims,),
                          num_levels=d.num_levels if images else None, sample_steps=pick(1000, 50))


def _build_vdm(d: Data, schedule: str = "learned") -> score.VDM:
    images = isinstance(d, ImageData)
    exponents = (4, 5, 6)
    net = _net(d, in_channels=d.shape[0] * (1 + 2 * len(exponents)) if images else None)
    return score.VDM(net, d.shape if images else (d.num_dims,), num_levels=d.num_levels if images else None,
                     schedule=schedule, fourier_exponents=exponents, sample_steps=pick(1000, 50))


def _synchronize(model: nn.Module) -> Callable[[], None]:
    return torch.cuda.synchronize if module_device(model).type == "cuda" else (lambda: None)


def _samples_and_distances(model: nn.Module, data: Data, seed: int,
                           samplers: dict[str, Callable[[int, torch.Generator], Tensor]]) -> dict:
    """Time per image and sliced Wasserstein distance to the test points for each sampler, and the floor."""
    images = isinstance(data, ImageData)
    n = pick(64, 16) if images else min(pick(2000, 500), len(data.test), len(data.val))
    to_unit = _to_unit(data)
    test, held_out = to_unit(data.test[:n]).flatten(1), to_unit(data.val[:n]).flatten(1)
    metrics: dict = {"sample_count": n, "data_distance": diffusion.sliced_wasserstein(held_out, test),
                     "distance": f"sliced 2-Wasserstein (512 directions) between {n} samples and {n} test points"
                                 + (" in [-1, 1] pixel units" if images else "")
                                 + "; data_distance: held-out data against the same test points, the floor"}
    sync = _synchronize(model)
    for name, draw in samplers.items():
        g = torch.Generator().manual_seed(seed)
        sync()
        start = time.perf_counter()
        samples = draw(n, g)
        sync()
        metrics[f"sample_seconds_per_image_{name}"] = (time.perf_counter() - start) / n
        metrics[f"sample_distance_{name}"] = diffusion.sliced_wasserstein(samples.flatten(1).float(), test)
    return metrics


def _toy_entropy(metrics: dict, data: Data, seed: int, nll_key: str = "ode_nll_nats") -> None:
    """Add a 2D toy's true entropy and the gap of ``metrics[nll_key]`` to it (also for ``flow_matching``)."""
    if isinstance(data, ToyData) and data.name in TOY_DENSITIES:
        entropy, se = toy_entropy(data.name, seed=seed + 123)
        metrics.update(true_entropy_nats=entropy, true_entropy_se_nats=se,
                       entropy_gap_nats=metrics[nll_key] - entropy)


def _ode_nll(model: score.ScoreSDE | score.VDM, x: Tensor, images: bool, seed: int) -> dict:
    """The probability-flow ODE's NLL on ``x`` (levels or points): exact trace for 2D, Hutchinson (one
    Rademacher draw per image) for images, whose exact trace would cost D = 64 backward passes per step."""
    g = torch.Generator().manual_seed(seed)
    trace = "rademacher" if images else "exact"
    nll, nfe = [], []
    for batch in x.split(500):
        if isinstance(model, score.ScoreSDE):
            nll.append(model.nll(batch, trace=trace, generator=g))
            nfe.append(model.last_nfe)
        else:
            log_p, n = score.probability_flow_log_prob(model.sde, model.score, batch, trace, generator=g)
            nll.append(-log_p)
            nfe.append(n)
    nll = torch.cat(nll)
    return {"ode_nll_nats": nll.mean().item(), "ode_nll_se_nats": (nll.std() / math.sqrt(len(nll))).item(),
            "ode_nfe": max(nfe), "ode_trace": trace}


def _ncsn_report(model: score.NCSN, data: Data, seed: int) -> dict:
    """NCSN has no likelihood: its samples (annealed Langevin) against the data floor."""
    model.eval()
    images = isinstance(data, ImageData)
    metrics = {"noise_levels": len(model.sigmas), "sigma_max": model.sigmas[0].item(),
               "sigma_min": model.sigmas[-1].item(), "langevin_steps": model.steps_per_level * len(model.sigmas)}
    metrics.update(_samples_and_distances(model, data, seed, {"langevin": lambda n, g: model.sample(n, generator=g)}))
    return metrics


def _score_sde_report(model: score.ScoreSDE, data: Data, seed: int) -> dict:
    """The probability-flow ODE's NLL (its NFE), and the three samplers' time and distance."""
    model.eval()
    images = isinstance(data, ImageData)
    test = data.test[:MAX_TEST_IMAGES] if images else data.test[:pick(2000, 200)]
    metrics = _ode_nll(model, test, images, seed)
    metrics.update(test_nll_nats=metrics["ode_nll_nats"], test_nll_se_nats=metrics["ode_nll_se_nats"])
    if images:
        metrics.update(nll_method="dequantization bound (probability-flow ODE)",
                       likelihood=f"E_u[-log p_ODE(x + u)] - D log h in nats per image on {len(test)} test images: the probability-flow "
                                  "ODE's density (dopri5, rtol = atol = 1e-5, Hutchinson trace, one Rademacher draw) "
                                  "of uniformly dequantized data (bins of width h = 2/(K-1)), one draw per image")
    else:
        metrics.update(nll_method="exact (probability-flow ODE)",
                       likelihood=f"-log p(x) of the probability-flow ODE (exact trace, dopri5, rtol = atol = 1e-5) on "
                                  f"{len(test)} test points, nats per point")
        _toy_entropy(metrics, data, seed)
    metrics.update(sde=type(model.sde).__name__, sample_steps=model.sample_steps, **_samples_and_distances(
        model, data, seed, {s: (lambda n, g, s=s: model.sample(n, s, generator=g)) for s in score.SAMPLERS}))
    metrics["sample_nfe_ode"] = model.last_nfe
    return metrics


def _vdm_report(model: score.VDM, data: Data, seed: int) -> dict:
    """VDM's continuous-time bound (64 draws of (t, ε) per image) and its terms, the T = 1000 discrete-time
    bound, the learned schedule's endpoints, and the samplers' time and distance."""
    model.eval()
    images = isinstance(data, ImageData)
    g = torch.Generator().manual_seed(seed)
    draws = pick(64, 2)  # each draw is one network pass per image: cheap, and the bound's MC error shrinks by 8
    metrics: dict = {}
    gamma_ends = model.gamma(torch.tensor([0.0, 1.0], device=module_device(model)))
    metrics.update(gamma_0=gamma_ends[0].item(), gamma_1=gamma_ends[1].item())
    if images:
        test = data.test[:MAX_TEST_IMAGES]
        with torch.no_grad():
            terms = {k: [] for k in ("prior", "diffusion", "reconstruction", "total")}
            discrete = []
            for batch in test.split(500):
                runs = [model.bound_terms(batch, g) for _ in range(draws)]
                for k in terms:
                    terms[k].append(torch.stack([r[k] for r in runs]).mean(0))
                discrete.append(torch.stack([model.bound_terms(batch, g, num_steps=1000)["total"]
                                             for _ in range(draws)]).mean(0))
            terms = {k: torch.cat(v) for k, v in terms.items()}
            discrete = torch.cat(discrete)
        total = terms["total"]
        metrics.update(
            test_nll_nats=total.mean().item(), test_nll_se_nats=(total.std() / math.sqrt(len(total))).item(),
            bound_prior_nats=terms["prior"].mean().item(), bound_diffusion_nats=terms["diffusion"].mean().item(),
            bound_reconstruction_nats=terms["reconstruction"].mean().item(),
            discrete_bound_nats=discrete.mean().item(), discrete_steps=1000,
            nll_method="variational bound (continuous time)",
            likelihood=f"VDM's continuous-time bound on -log P(y) in nats per image: KL(q(z_1|x) || N(0, I)) + L_inf + (-log p(y | z_0)) "
                       f"with the discrete decoder over the K levels; L_inf estimated with {draws} draws of (t, eps) "
                       f"per image (antithetic t), on {len(test)} test images; no dequantization term")
    else:
        test = data.test[:pick(2000, 200)]
        metrics.update(_ode_nll(model, test, images, seed))
        with torch.no_grad():
            bound = torch.stack([model.bound_terms(test, g)["total"] for _ in range(draws)]).mean(0)
        metrics.update(test_nll_nats=bound.mean().item(), test_nll_se_nats=(bound.std() / math.sqrt(len(bound))).item(),
                       nll_method="variational bound (continuous time)",
                       likelihood="VDM's continuous-time bound on -log p(x) with a Gaussian decoder, nats per point; "
                                  "ode_nll_nats: the probability-flow ODE's exact NLL (exact trace)")
        _toy_entropy(metrics, data, seed)
    samplers = {"ancestral": lambda n, g: model.sample(n, "ancestral", generator=g),
                "ode": lambda n, g: model.sample(n, "ode", generator=g)}
    metrics.update(sample_steps=model.sample_steps, **_samples_and_distances(model, data, seed, samplers))
    metrics["sample_nfe_ode"] = model.last_nfe
    return metrics


def _distance_columns(samplers: tuple[str, ...]) -> tuple[Column, ...]:
    return tuple(Column(f"{s}: ms/image, distance", lambda r, s=s: (
        f"{1000 * r[f'sample_seconds_per_image_{s}']:.1f}, {r[f'sample_distance_{s}']:.3f}"
        if f"sample_distance_{s}" in r else "")) for s in samplers) + (Column("data floor", number("data_distance", 3)),)


_ODE_COLUMNS = (Column("ODE NLL (nats)", number("ode_nll_nats", 3, "ode_nll_se_nats")),
                Column("ODE NFE", lambda r: str(r.get("ode_nfe") or "")),
                Column("true entropy (nats)", number("true_entropy_nats", 3)))

_SHARED = {  # what the three models have in common: data, figures in [-1, 1], their own loss, the toys' settings
    "data": ("images", "toy2d"),
    "figures": samples_in_unit_interval,
    "loss": lambda model: model.training_loss,
    "overrides": {"toy2d": {"epochs": (300, 3), "batch_size": (128, 512)}},
}

register("ncsn", ModelSpec(
    family="score-based",
    description="NCSN: a noise-conditional score network over 10 geometric noise levels (σ_1 = the largest "
                "pairwise distance), denoising score matching, annealed Langevin sampling (lecture 11)",
    build=_build_ncsn, epochs=200, fast_epochs=3, lr=2e-3, batch_size=128, report=_ncsn_report,
    **_SHARED, loss_label="½ ||σ s_θ(x̃, σ) + ε||² (σ²-weighted denoising score matching)",
    columns=_distance_columns(("langevin",)),
))

register("score_sde", ModelSpec(
    family="score-based",
    description="score SDE (VP, VE or sub-VP): ε-network, continuous-time denoising score matching; Euler-Maruyama, "
                "predictor-corrector and probability-flow ODE samplers; the ODE's NLL (lecture 11)",
    build=_build_score_sde, epochs=200, fast_epochs=3, lr=2e-3, batch_size=128, report=_score_sde_report,
    **_SHARED, loss_label="½ ||ε̂(x_t, t) - ε||² (denoising score matching, λ(t) = σ(t)²)",
    options={"sde": Option(score.SDES, "vp", "the forward SDE: variance preserving, variance exploding, or sub-VP")},
    columns=_ODE_COLUMNS + _distance_columns(score.SAMPLERS),
))

register("vdm", ModelSpec(
    family="diffusion",
    description="VDM: a learned monotone noise schedule (or a fixed linear one), Fourier features, the "
                "continuous-time bound with a discrete decoder over the levels (lecture 11)",
    build=_build_vdm, epochs=300, fast_epochs=3, lr=2e-3, batch_size=64, report=_vdm_report,
    **_SHARED, loss_label="the continuous-time bound (nats): prior KL + L_inf + reconstruction",
    options={"schedule": Option(score.VDM.SCHEDULES, "learned",
                                "γ(t): a monotone network trained to minimise the loss's variance, or linear")},
    columns=(Column("bound (nats)", number("test_nll_nats", 1, "test_nll_se_nats")),
             Column("prior / L_inf / reconstruction (nats)", lambda r: " / ".join(
                 f"{r[k]:.2f}" for k in ("bound_prior_nats", "bound_diffusion_nats", "bound_reconstruction_nats"))
                 if "bound_prior_nats" in r else ""),
             Column("T = 1000 bound (nats)", number("discrete_bound_nats", 1)),
             Column("γ_0, γ_1", lambda r: f"{r['gamma_0']:.1f}, {r['gamma_1']:.1f}" if "gamma_0" in r else ""))
    + _ODE_COLUMNS[:1] + _ODE_COLUMNS[2:] + _distance_columns(("ancestral", "ode")),
))
