"""dgmlib's diffusion samplers against diffusers' schedulers: the same network and schedule, in one run.

One ε-network is trained once with dgmlib's DDPM (L_simple, Ho et al.'s linear schedule β from 1e-4 to 0.02,
T = 1000): a small `dgmlib.diffusion.UNet` on the 8x8 digits scaled to [-1, 1] (default), or a `TimeMLP` on a
2D toy (`--data moons`, ...). Then every sampler runs with that network and schedule, ours and diffusers', from
the same seed (the same x_T and, where both draw noise in the same order, the same noise: paired samples):

* DDPM (Algorithm 2, T ancestral steps): `DDPM.sample` against `DDPMScheduler` (`trained_betas` = our β,
  `variance_type="fixed_large"` for our default σ_t² = β_t, "fixed_small" for `--variance beta_tilde`;
  `clip_sample` on for images, as ours clips x̂_0 to [-1, 1], off for 2D data), in the loop of diffusers'
  `DDPMPipeline` (`set_timesteps(T)`, then `scheduler.step` per timestep).
* DDIM (eta = 0, `--ddim-steps`): `DDPM.ddim_sample` against `DDIMScheduler` (`set_alpha_to_one=True`: the last
  step returns x̂_0 as ours; `clip_sample` as above with `use_clipped_model_output=True`: ours re-derives ε from
  the clipped x̂_0; `steps_offset=0`). The timestep grids cannot be matched exactly: ours evaluates the network at
  round(linspace(T, 1, S)) and steps from each τ to the next one; diffusers steps from t to t - T // S whatever
  the spacing. `--ddim-spacing` picks diffusers' spacing (default "linspace": the same timesteps as ours, with
  diffusers' fixed stride); the run prints how far each spacing's trajectory lies from ours, and checks with
  S = T (where both grids are 999..0) that the updates agree to float precision.
* Euler–Maruyama on the VP SDE (`--sde-steps`): the trained DDPM read as the VP SDE with β_min = T β_1 = 0.1,
  β_max = T β_T = 20 (Song et al. 2021, App. B), its network called at the discrete step T·t for the continuous
  time t, score = -ε̂ / σ(t). Ours: `dgmlib.score.ScoreSDE(...).sample(n, "euler_maruyama")` (N steps on
  linspace(1, t_min, N + 1), then Tweedie's denoising at t_min); diffusers: `ScoreSdeVpScheduler.step_pred`
  (deprecated, but still shipped) in score_sde_pytorch's loop (N timesteps linspace(1, eps, N) with Δt = 1/N,
  returning the last noise-free mean). t_min = eps = 1/T on both, the smallest step the network was trained on.
* Predictor–corrector (one Langevin corrector step per step, snr 0.16 for images and 0.05 for 2D, as
  `ScoreSDE.sample`): diffusers has no VP predictor–corrector; the peer is composed from its parts,
  `ScoreSdeVeScheduler.step_correct` (the Langevin corrector, SDE-agnostic, batch-averaged norms, without the
  α_i = α(t)²/α(t')² = 1 - β_i factor of Song et al.'s VP Algorithm 5) followed by `ScoreSdeVpScheduler.step_pred` at
  each timestep, the order of diffusers' `ScoreSdeVePipeline` (ours: predictor, then corrector at the next time).

    pip install -e ".[bench]"
    python benchmarks/diffusers_samplers.py                  # digits, a few minutes on 2 CPU cores
    python benchmarks/diffusers_samplers.py --steps 20000 --n 350 --base 32
    python benchmarks/diffusers_samplers.py --data moons     # a TimeMLP on a 2D toy

Prints, per sampler: network evaluations, seconds per sample for ours and diffusers and the ratio ours / diffusers;
the sliced Wasserstein distance (`dgmlib.diffusion.sliced_wasserstein`) of the n samples to n test points for
both, the ratio ours / diffusers and the data floor (n validation points against the same test points); and the
largest difference between the paired samples. The time and quality ratios are of this run, on this device; the
network dominates the time, so the ratios sit near 1 and a shared machine moves them by ±10 % (`--repeats 3` keeps
the least of three timings). The paired SW ratios of DDPM are 1 by construction once the samplers match.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dgmlib import data, diffusion, score
from dgmlib.device import randn, resolve_device

T = 1000
BETA_START, BETA_END = 1e-4, 0.02


# --------------------------------------------------------------------------- the peer's parts


def _import_peer() -> dict:
    """diffusers' schedulers (ScoreSdeVpScheduler from its module: the top level hides it without transformers)."""
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, ScoreSdeVeScheduler
    try:
        from diffusers.schedulers.deprecated.scheduling_sde_vp import (
            ScoreSdeVpScheduler,
        )
    except ImportError:  # before diffusers moved it to deprecated/
        from diffusers.schedulers.scheduling_sde_vp import ScoreSdeVpScheduler
    diffusers.utils.logging.set_verbosity_error()
    return {"version": diffusers.__version__, "DDPM": DDPMScheduler, "DDIM": DDIMScheduler,
            "VP": ScoreSdeVpScheduler, "VE": ScoreSdeVeScheduler}


class DiscreteTimeEps(nn.Module):
    """The DDPM's ε-network seen in continuous time: ``ScoreSDE`` calls ``net(x, 999 t)``; this calls our
    network at the discrete step ``T t`` (the DDPM step t_disc = T t of the VP SDE's time t; real-valued)."""

    def __init__(self, net: nn.Module, num_steps: int) -> None:
        super().__init__()
        self.net, self.num_steps = net, num_steps

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return self.net(x, s * (self.num_steps / 999.0))


def peer_ddpm(peer: dict, net: nn.Module, betas: Tensor, x: Tensor, clip: bool, variance_type: str,
              generator: torch.Generator) -> Tensor:
    """diffusers' DDPMPipeline loop: ``scheduler.step`` over ``set_timesteps(T)``; timesteps 0..T-1 are our 1..T."""
    sched = peer["DDPM"](num_train_timesteps=len(betas), trained_betas=betas.tolist(), variance_type=variance_type,
                         clip_sample=clip, prediction_type="epsilon")
    sched.set_timesteps(len(betas))
    for t in sched.timesteps:
        eps = net(x, torch.full((len(x),), int(t) + 1, dtype=torch.long, device=x.device))
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1) if clip else x  # the pipeline's (x / 2 + 0.5).clamp(0, 1); ours clamps too


def peer_ddim(peer: dict, net: nn.Module, betas: Tensor, x: Tensor, steps: int, clip: bool, spacing: str) -> Tensor:
    """diffusers' DDIMPipeline loop with eta = 0: ``set_timesteps(steps)``, ``scheduler.step`` per timestep."""
    sched = peer["DDIM"](num_train_timesteps=len(betas), trained_betas=betas.tolist(), clip_sample=clip,
                         set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing, prediction_type="epsilon")
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        eps = net(x, torch.full((len(x),), int(t) + 1, dtype=torch.long, device=x.device))
        x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


def _vp_std(sched: object, t: Tensor) -> Tensor:
    """σ(t) of the VP SDE as ScoreSdeVpScheduler computes it (for the corrector's score)."""
    c = sched.config
    log_mean = -0.25 * t ** 2 * (c.beta_max - c.beta_min) - 0.5 * t * c.beta_min
    return torch.sqrt(1.0 - torch.exp(2.0 * log_mean))


def peer_sde(peer: dict, net: nn.Module, x: Tensor, steps: int, t_min: float, generator: torch.Generator,
             corrector_snr: float | None = None) -> Tensor:
    """score_sde_pytorch's loop on diffusers' ScoreSdeVpScheduler (Euler–Maruyama; ``step_pred`` takes ε̂ and
    divides by σ(t) itself), returning the last noise-free mean; with ``corrector_snr``, one Langevin step of
    ScoreSdeVeScheduler.step_correct (score = -ε̂/σ) before each predictor step, as diffusers' ScoreSdeVePipeline."""
    vp = peer["VP"](num_train_timesteps=T, beta_min=T * BETA_START, beta_max=T * BETA_END, sampling_eps=t_min)
    vp.set_timesteps(steps, device=x.device)
    ve = None
    if corrector_snr is not None:
        ve = peer["VE"](num_train_timesteps=T, snr=corrector_snr)
        ve.set_timesteps(steps, device=x.device)
    x_mean = x
    for t in vp.timesteps:
        tt = t * torch.ones(len(x), device=x.device)
        if ve is not None:
            s = -net(x, T * tt) / _vp_std(vp, tt).view(-1, *([1] * (x.dim() - 1)))
            x = ve.step_correct(s, x, generator=generator).prev_sample
        x, x_mean = vp.step_pred(net(x, T * tt), x, tt, generator=generator)
    return x_mean


def em_update_check(peer: dict, net: nn.Module, score_fn: score.ScoreFn, x: Tensor, steps: int, seed: int) -> float:
    """max|ours - diffusers| of Euler–Maruyama on one grid with the same noise: ours on linspace(1, 0, N + 1) without
    the final denoising (Δt = 1/N, the network last called at t = 1/N), diffusers' ``step_pred`` with its timesteps
    set to the same N times (its Δt is 1/N), returning its last sample (with noise) as ours does."""
    sde = score.VPSDE(T * BETA_START, T * BETA_END)
    sde.t_min = 0.0
    ours = score.euler_maruyama_sample(sde, score_fn, x, steps, denoise=False, generator=generator(seed))
    vp = peer["VP"](num_train_timesteps=T, beta_min=T * BETA_START, beta_max=T * BETA_END)
    vp.set_timesteps(steps, device=x.device)
    vp.timesteps = torch.linspace(1.0, 0.0, steps + 1, device=x.device)[:-1]
    g, y = generator(seed), x
    for t in vp.timesteps:
        tt = t * torch.ones(len(y), device=y.device)
        y, _ = vp.step_pred(net(y, T * tt), y, tt, generator=g)
    return (ours - y).abs().max().item()


# --------------------------------------------------------------------------- training


def load(args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor, int | None, tuple[int, ...]]:
    """(train, val, test) in the model's units, the number of levels (None for 2D) and the event shape."""
    if args.data == "digits":
        d = data.load_image_data("digits")
        unit = [diffusion.levels_to_unit(s, d.num_levels) for s in (d.train, d.val, d.test)]
        return (d.train, unit[1], unit[2], d.num_levels, d.shape)
    train = data.toy_2d(args.data, 4000, seed=args.seed)
    val = data.toy_2d(args.data, args.n, seed=args.seed + 1)
    return train, val, data.toy_2d(args.data, args.n, seed=args.seed + 2), None, (2,)


def train_ddpm(args: argparse.Namespace, train: Tensor, num_levels: int | None, shape: tuple[int, ...],
               device: torch.device) -> tuple[diffusion.DDPM, float, float]:
    torch.manual_seed(args.seed)
    net = diffusion.UNet(shape[0], args.base) if num_levels is not None else diffusion.TimeMLP(shape[0], args.hidden)
    model = diffusion.DDPM(net.to(device), diffusion.NoiseSchedule.linear(T, BETA_START, BETA_END), shape,
                           num_levels=num_levels)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    train = train.to(device)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = train[torch.randint(len(train), (args.batch,), generator=g).to(device)]
        loss = model.training_loss(batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    seconds = time.perf_counter() - start
    model.eval()
    tail = torch.stack(losses[-100:]).mean().item() if losses else float("nan")
    return model, seconds, tail


# --------------------------------------------------------------------------- timing and quality


def timed(fn: Callable[[], Tensor], device: torch.device, repeats: int) -> tuple[Tensor, float]:
    """The output of the first call and the least wall-clock seconds of ``repeats`` calls."""
    best, out = math.inf, None
    for r in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        out = result if r == 0 else out
    return out, best


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device (dgmlib.device.randn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits", help="digits (UNet) or a 2D toy of dgmlib.data.TOY_NAMES (TimeMLP)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the shared ε-network")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--base", type=int, default=16, help="UNet base channels (digits)")
    parser.add_argument("--hidden", type=int, default=128, help="TimeMLP width (2D toys)")
    parser.add_argument("--n", type=int, default=128, help="samples per sampler (and test points for the distance)")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--ddim-spacing", default="linspace", choices=("linspace", "leading", "trailing"))
    parser.add_argument("--sde-steps", type=int, default=1000, help="Euler–Maruyama and predictor–corrector steps")
    parser.add_argument("--variance", default="beta", choices=("beta", "beta_tilde"),
                        help="DDPM's σ_t²: β_t (diffusers' fixed_large) or β̃_t (fixed_small)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per sampler (the least time is kept)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: dgmlib.device.default_device())")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 steps, n 16, 100 SDE steps")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.n, args.sde_steps = 100, 16, 100
    warnings.filterwarnings("ignore")
    peer = _import_peer()
    device = resolve_device(args.device)
    train, val, test, num_levels, shape = load(args)
    if args.n > min(len(val), len(test)):
        parser.error(f"--n must be at most {min(len(val), len(test))} (validation and test points)")
    images = num_levels is not None
    val, test = val[:args.n], test[:args.n]

    model, train_seconds, train_loss = train_ddpm(args, train, num_levels, shape, device)
    net, betas = model.net, model.schedule.betas
    sde = score.VPSDE(T * BETA_START, T * BETA_END)
    sde.t_min = 1.0 / T  # = diffusers' sampling_eps default: the network never saw steps below 1
    score_model = score.ScoreSDE(DiscreteTimeEps(net, T), sde, shape, num_levels=num_levels).to(device)
    snr = 0.16 if images else 0.05  # ScoreSDE.sample's
    variance_type = "fixed_large" if args.variance == "beta" else "fixed_small"
    n, seed = args.n, args.seed + 1

    def prior(g: torch.Generator) -> Tensor:
        return randn((n, *shape), device=device, dtype=torch.float32, generator=g)  # what ours draws first

    def post(x: Tensor) -> Tensor:
        return x.clamp(-1, 1) if images else x  # as a pipeline's output (ours: DDPM.sample and DDIM already are)

    def peer_ddpm_run() -> Tensor:
        g = generator(seed)
        return peer_ddpm(peer, net, betas, prior(g), images, variance_type, g)

    def peer_sde_run(snr_or_none: float | None) -> Tensor:
        g = generator(seed)
        return peer_sde(peer, net, prior(g), args.sde_steps, sde.t_min, g, snr_or_none)

    samplers = [
        ("DDPM", T, T, lambda: model.sample(n, args.variance, generator=generator(seed)), peer_ddpm_run),
        ("DDIM", args.ddim_steps, args.ddim_steps,
         lambda: model.ddim_sample(n, args.ddim_steps, generator=generator(seed)),
         lambda: peer_ddim(peer, net, betas, prior(generator(seed)), args.ddim_steps, images, args.ddim_spacing)),
        ("Euler-Maruyama", args.sde_steps + 1, args.sde_steps,
         lambda: score_model.sample(n, "euler_maruyama", generator=generator(seed), num_steps=args.sde_steps),
         lambda: peer_sde_run(None)),
        ("PC (1 corrector)", 2 * args.sde_steps + 1, 2 * args.sde_steps,
         lambda: score_model.sample(n, "predictor_corrector", generator=generator(seed), num_steps=args.sde_steps),
         lambda: peer_sde_run(snr)),
    ]
    with torch.no_grad():  # warm-up at the batch size
        for _ in range(3):
            net(prior(generator(0)), torch.full((n,), T // 2, device=device))
    rows = []
    for name, nfe_ours, nfe_peer, ours_fn, peer_fn in samplers:
        x_ours, s_ours = timed(ours_fn, device, args.repeats)
        x_peer, s_peer = timed(peer_fn, device, args.repeats)
        x_ours, x_peer = post(x_ours), post(x_peer)
        sw_ours = diffusion.sliced_wasserstein(x_ours.flatten(1), test.flatten(1))
        sw_peer = diffusion.sliced_wasserstein(x_peer.flatten(1), test.flatten(1))
        rows.append((name, nfe_ours, nfe_peer, s_ours / n, s_peer / n, sw_ours, sw_peer,
                     (x_ours - x_peer).abs().max().item()))
    floor = diffusion.sliced_wasserstein(val.flatten(1), test.flatten(1))

    # DDIM with the same x_T: each of diffusers' spacings at --ddim-steps, and the exact check at S = T
    ddim_gaps = {}
    with torch.no_grad():
        ours_ddim = model.ddim_sample(n, args.ddim_steps, generator=generator(seed))
        for spacing in ("linspace", "leading", "trailing"):
            theirs = peer_ddim(peer, net, betas, prior(generator(seed)), args.ddim_steps, images, spacing)
            ddim_gaps[spacing] = (ours_ddim - theirs).abs().max().item()
        m = min(n, 16)
        full_ours = model.ddim_sample(m, T, generator=generator(seed))
        full_peer = peer_ddim(peer, net, betas, randn((m, *shape), device=device, generator=generator(seed)), T,
                              images, "linspace")
        full_gap = (full_ours - full_peer).abs().max().item()
        x_m = randn((m, *shape), device=device, generator=generator(seed))
        em_gap = em_update_check(peer, net, score_model.score, x_m, args.sde_steps, seed)

    print("command: python " + " ".join(sys.argv))
    print(f"device {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"diffusers {peer['version']}")
    what = f"UNet(base {args.base})" if images else f"TimeMLP(hidden {args.hidden})"
    print(f"data {args.data}, {what} trained {args.steps} steps (batch {args.batch}, lr {args.lr}, seed {args.seed}) "
          f"in {train_seconds:.1f} s, L_simple over the last 100 steps {train_loss:.4f}; linear schedule T = {T}; "
          f"n = {n} samples per sampler; DDPM σ_t² = {args.variance} (diffusers {variance_type}); "
          f"DDIM spacing {args.ddim_spacing}; VP SDE t_min = {sde.t_min}")
    print(f"{'sampler':<17} {'NFE ours':>8} {'NFE peer':>8} {'s/sample ours':>13} {'s/sample peer':>13} "
          f"{'time ours/peer':>14} {'SW ours':>8} {'SW peer':>8} {'SW ours/peer':>12} {'max|Δ| paired':>13}")
    for name, nfe_o, nfe_p, t_o, t_p, sw_o, sw_p, gap in rows:
        print(f"{name:<17} {nfe_o:>8d} {nfe_p:>8d} {t_o:>13.5f} {t_p:>13.5f} {t_o / t_p:>14.2f} {sw_o:>8.4f} "
              f"{sw_p:>8.4f} {sw_o / sw_p:>12.3f} {gap:>13.2e}")
    print(f"SW data floor (n validation vs the same n test points): {floor:.4f}")
    print(f"DDIM {args.ddim_steps} steps, same x_T, max|ours - diffusers| by diffusers' timestep_spacing: "
          + ", ".join(f"{k} {v:.2e}" for k, v in ddim_gaps.items()))
    print(f"DDIM {T} steps (both grids 999..0), same x_T, {m} samples: max|ours - diffusers| = {full_gap:.2e}")
    print(f"Euler-Maruyama {args.sde_steps} steps on one grid (linspace(1, 0, N + 1), no final denoising), same noise, "
          f"{m} samples: max|ours - diffusers| = {em_gap:.2e}")
    print("peer for PC: diffusers' ScoreSdeVeScheduler.step_correct then ScoreSdeVpScheduler.step_pred (composed here; "
          "diffusers has no VP predictor-corrector)")
    print(f"torchvision imported: {'torchvision' in sys.modules}")


if __name__ == "__main__":
    main()
