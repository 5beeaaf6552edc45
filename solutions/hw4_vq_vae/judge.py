"""The judges of hw4_vq_vae: every test cell's points, decided in the grader (``dgmlib.grading.judge``).

Each judge draws its inputs, states and parameters from ``rng`` (a secret seed per submission), calls the
student's code through the cell's probe, and compares with the reference: ``dgmlib.vq`` (``nearest_code``,
``straight_through``, ``VectorQuantizer``) and the solution's own cells (``REF``: ``ema_update`` and the given
``MyVQVAE`` architecture), both here in the grader. Gradients cannot be taken across the wire, so the test cells of
the straight-through estimator, the loss routing and the VQ-VAE's loss expose small wrappers of their own code that
run the student's function with inputs that require gradients and return the gradients as tensors; the judge sends
the inputs and compares those gradients with the reference's, computed here.

The trained models are measured by loading their ``state_dict()`` into the reference architectures built here
(``REF.MyVQVAE`` with the width of the student's encoder, ``dgmlib.autoregressive.GatedPixelCNN`` for the prior):
codes, perplexity, reconstruction term and bound are computed with the course's code on the digits loaded here,
on the test split and on the validation split (a test metric far below the validation one means the model saw
the test digits). The student's methods are never asked for a number that earns points.

This file is the instructor's: it is never released, and the student's kernel never sees it.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dgmlib import autoregressive, data, vq
from dgmlib.config import fast_mode
from dgmlib.grading.judge import secret_int as _int, secret_float as _uniform
from dgmlib.grading.judge import (JudgeFailure, as_tensor, expect, expect_close, expect_equal, expect_le,
                                  expect_shape, judge, solution_cells)

REF = solution_cells(Path(__file__).with_name("hw4_vq_vae.ipynb"), "quantizer", "ema", "quantizer_module",
                     "vqvae_model")

F64 = torch.float64
NUM_CODES, CODE_DIM, LEVELS = 32, 8, 17  # fixed by the instructions (MyVQVAE's defaults, the prior's 32 levels)

RECON_BOUND = 102.0
"""nats/image on the test digits. A decoder that ignores its code can at best learn the per-pixel marginals: the
level frequencies of each pixel on the 1000 training digits, with one added count per level, cost 107.87 nats on the
447 test digits (106.33 for the test digits' own frequencies; a uniform guess costs 64 ln 17 = 181.3). The reference
solution in fast mode, as graded, over 40 training seeds (0-39): 85.2 to 97.9, mean 91.0, sd 3.2 (89.8 for seed 0).
102 lies 4 nats above the worst seed and 6 below the marginals: a correct solution passes, a code that carries
(almost) nothing does not."""
PERPLEXITY_SHARE = 0.25
"""perplexity of the test codes >= 0.25 K = 8, and at least K / 2 codes in use. The reference solution in fast mode over
the same 40 seeds: perplexity 10.9 to 22.0 (mean 17.2, sd 2.7), 22 to 32 codes in use. The former floor, 0.35 K = 11.2,
failed seed 9 (10.9): a correct solution lost 3 points. A collapsed codebook (a few codes) stays far below 8."""
PRIOR_MARGIN = 0.5
"""the fitted prior's test NLL must beat M log K = 4 ln 32 = 13.86 by half a nat. The reference solution's prior, fitted
as instructed on the code maps of its own model in fast mode, over the same 40 seeds: 9.12 to 11.79 nats (seeds 0-4:
11.08, 10.87, 11.03, 11.78, 11.23), so it beats M log K by 2.07 to 4.74 nats, far from the 0.5 margin. A prior can
come close to M log K only if the codes are nearly uniform and independent across positions (perplexity near K);
4 times the entropy of the pooled training codes was at most 12.45 nats over these seeds, 1.4 below M log K."""
VAL_SLACK = 5.0
"""a test metric more than 5 nats below the validation metric means the model saw the test digits."""


def bound_limit() -> float:
    """The bound's threshold: 115 nats in fast mode (``dgm grade``'s), 95 at full size, as the instructions say."""
    return 115.0 if fast_mode() else 95.0


@functools.lru_cache(maxsize=None)
def _digits(split: str) -> torch.Tensor:
    return data.load_digits(split)


def _spatial(rng: torch.Generator, dims: int) -> tuple[int, ...]:
    return tuple(_int(rng, 1, 5) for _ in range(dims))


def _images(rng: torch.Generator, n: int, split: str = "test") -> torch.Tensor:
    """``n`` digits of ``split`` chosen by ``rng`` (float32 levels, as the notebook's data)."""
    pool = _digits(split)
    return pool[torch.randperm(len(pool), generator=rng)[:n]].clone()


# ------------------------------------------------------------------ Part 1: the quantizer


@judge("test_nearest")
def nearest(k, rng):
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=F64)
    cases = [(torch.tensor([[[[0.9, 0.2, -0.1]], [[0.1, 1.5, -0.3]]]], dtype=F64), codebook)]
    for dims in (0, 1, 2, 2, 1, 0, 2):
        b, d, num = _int(rng, 1, 4), _int(rng, 1, 6), _int(rng, 1, 40)
        z = 1.5 * torch.randn(b, d, *_spatial(rng, dims), generator=rng, dtype=F64)
        cases.append((z, torch.randn(num, d, generator=rng, dtype=F64)))
    z = torch.randn(3, 4, 3, 5, generator=rng)  # float32 too
    cases.append((z, torch.randn(9, 4, generator=rng)))
    for z, e in cases:
        indices = k.nearest_code(z, e)
        expect_shape(indices, (z.shape[0], *z.shape[2:]), f"nearest_code of z_e {tuple(z.shape)} (B, D, *spatial)")
        expect(indices.dtype == torch.int64, f"the indices must be int64, got {indices.dtype}")
        expect_equal(indices, vq.nearest_code(z, e), msg=f"the nearest code of each vector (z_e {tuple(z.shape)}, "
                                                       f"K = {e.shape[0]})")


@judge("test_straight_through")
def straight_through(k, rng):
    """The value and both Jacobians of the student's ``straight_through`` (the test cell's wrapper takes them with
    ``torch.autograd.functional.jacobian`` in the kernel): the value is ``z_q``, d/dz_e the identity, d/dz_q zero."""
    for shape in ((2, 3, 2, 2), (3, 2, 4), (4, 5), (1, 2, 3, 2)):
        shape = tuple(s + _int(rng, 0, 1) for s in shape)
        z_e = torch.randn(shape, generator=rng, dtype=F64)
        z_q = torch.randn(shape, generator=rng, dtype=F64)
        out = k.straight_through(z_e, z_q)
        expect_close(out, z_q, atol=1e-12, rtol=0, msg="the value of straight_through(z_e, z_q) is z_q")
        result = k.straight_through_jacobians(z_e, z_q)
        expect(isinstance(result, (tuple, list)) and len(result) == 3, "restore the test cell (its wrapper)")
        value, jac_e, jac_q = result
        n = z_e.numel()
        expect_close(value, z_q, atol=1e-12, rtol=0, msg="the value is z_q")
        expect_close(as_tensor(jac_e, "d out / d z_e").reshape(-1), torch.eye(n, dtype=F64).reshape(-1), atol=1e-12,
                     rtol=0, msg="d out / d z_e must be the identity")
        expect_close(as_tensor(jac_q, "d out / d z_q").reshape(-1), torch.zeros(n * n, dtype=F64), atol=1e-12, rtol=0,
                     msg="no gradient may flow to z_q")


def _losses_expected(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    return (z_e - z_q).square().flatten(1).sum(1)


@judge("test_losses")
def losses(k, rng):
    z_e = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [0.5, 0.5]]], dtype=F64)
    z_q = torch.tensor([[[1.0, 1.0], [1.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=F64)
    cases = [(z_e, z_q)]
    for dims in (1, 2, 0, 2, 1):
        shape = (_int(rng, 1, 5), _int(rng, 1, 6), *_spatial(rng, dims))
        cases.append((torch.randn(shape, generator=rng, dtype=F64), torch.randn(shape, generator=rng, dtype=F64)))
    for z_e, z_q in cases:
        out = k.vq_losses(z_e, z_q)
        expect(isinstance(out, (tuple, list)) and len(out) == 2, "vq_losses returns (codebook_loss, commitment_loss)")
        expected = _losses_expected(z_e, z_q)
        expect_close(expect_shape(out[0], (z_e.shape[0],), "codebook_loss, one per example"), expected,
                     atol=1e-10, msg="codebook_loss: ||sg[z_e] - e||^2 summed over the dimension and the positions")
        expect_close(expect_shape(out[1], (z_e.shape[0],), "commitment_loss, one per example"), expected,
                     atol=1e-10, msg="commitment_loss: ||z_e - sg[e]||^2 summed over the dimension and the positions")


@judge("test_routing")
def routing(k, rng):
    """The gradients of the student's two losses with respect to the codebook and to z_e, taken by the test cell's
    wrapper for z_q = codebook[indices] (attached to the codebook) and per-example weights drawn here."""
    for dims in (1, 2, 0, 1):
        b, d, num = _int(rng, 2, 4), _int(rng, 1, 5), _int(rng, 3, 9)
        spatial = _spatial(rng, dims)
        codebook = torch.randn(num, d, generator=rng, dtype=F64)
        z_e = torch.randn(b, d, *spatial, generator=rng, dtype=F64)
        indices = torch.randint(0, num, (b, *spatial), generator=rng)
        weights = 0.5 + torch.rand(b, generator=rng, dtype=F64)
        out = k.loss_gradients(codebook, z_e, indices, weights)
        expect(isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(g, (tuple, list)) and len(g) == 2
                                                                     for g in out), "restore the test cell (its wrapper)")
        (cb_codebook, cb_z_e), (cm_codebook, cm_z_e) = out
        z_q = codebook[indices].movedim(-1, 1)  # (B, D, *spatial)
        w = weights.view(b, *[1] * (z_e.dim() - 1))
        grad_codes = torch.zeros(num, d, dtype=F64).index_add_(
            0, indices.flatten(), (2 * w * (z_q - z_e)).movedim(1, -1).reshape(-1, d))
        expect_close(cb_codebook, grad_codes, atol=1e-10, msg="the codebook loss's gradient with respect to the codes")
        expect_close(cb_z_e, torch.zeros_like(z_e), atol=1e-12, msg="the codebook loss must not move the encoder")
        expect_close(cm_codebook, torch.zeros_like(codebook), atol=1e-12, msg="the commitment loss must not move the codes")
        expect_close(cm_z_e, 2 * w * (z_e - z_q), atol=1e-10, msg="the commitment loss's gradient with respect to z_e")


# ------------------------------------------------------------------ Part 2: the EMA update


def _ema_case(rng: torch.Generator, dims: int, zero_counts: bool = True):
    num, d = _int(rng, 2, 10), _int(rng, 1, 5)
    cluster_size = 3 * torch.rand(num, generator=rng, dtype=F64)
    if zero_counts:
        cluster_size[torch.randint(0, num, (1,), generator=rng)] = 0.0  # a code nobody picked for long
    embed_sum = torch.randn(num, d, generator=rng, dtype=F64) * cluster_size[:, None]
    z_e = torch.randn(_int(rng, 1, 4), d, *_spatial(rng, dims), generator=rng, dtype=F64)
    used = torch.randperm(num, generator=rng)[:max(1, num - _int(rng, 0, 2))]  # some codes receive no vector
    indices = used[torch.randint(0, len(used), (z_e.shape[0], *z_e.shape[2:]), generator=rng)]
    return cluster_size, embed_sum, z_e, indices


def _ema_expected(cluster_size, embed_sum, z_e, indices, decay, eps):
    num, d = embed_sum.shape
    flat = z_e.movedim(1, -1).reshape(-1, d)
    n = torch.zeros(num, dtype=F64).index_add_(0, indices.flatten(), torch.ones(len(flat), dtype=F64))
    s = torch.zeros(num, d, dtype=F64).index_add_(0, indices.flatten(), flat)
    big_n = decay * cluster_size + (1 - decay) * n
    m = decay * embed_sum + (1 - decay) * s
    total = big_n.sum()
    return big_n, m, m / ((big_n + eps) / (total + num * eps) * total)[:, None]


@judge("test_ema_closed_form")
def ema_closed_form(k, rng):
    """One step of the student's ``ema_update`` on states drawn here, through the test cell's wrapper ``ema_step``
    (which also returns the inputs after the call): Part 2's formulas with Laplace smoothing, the default eps, a code
    with N_k = 0 that no vector picks (finite), and no input modified in place."""
    cases = [(torch.tensor([1.0, 2.0, 0.5], dtype=F64), torch.tensor([[1.0], [4.0], [0.5]], dtype=F64),
              torch.tensor([[[3.0, 5.0, 1.0, 7.0]]], dtype=F64), torch.tensor([[0, 1, 0, 1]]), 0.5, 1e-5),
             (torch.tensor([0.0, 3.0], dtype=F64), torch.tensor([[0.0, 0.0], [3.0, 3.0]], dtype=F64),
              torch.ones(2, 2, 3, dtype=F64), torch.ones(2, 3, dtype=torch.long), 0.9, None)]  # 0 / 0 unsmoothed
    for dims, eps in ((1, None), (2, 0.1), (0, 1e-3), (2, None), (1, 0.5)):
        cases.append((*_ema_case(rng, dims), _uniform(rng, 0.5, 0.999), eps))
    for cluster_size, embed_sum, z_e, indices, decay, eps in cases:
        kwargs = {"decay": decay} if eps is None else {"decay": decay, "eps": eps}
        result = k.ema_step(cluster_size, embed_sum, z_e, indices, **kwargs)
        expect(isinstance(result, (tuple, list)) and len(result) == 2, "restore the test cell (its wrapper)")
        out, after = result
        expect(isinstance(out, (tuple, list)) and len(out) == 3, "ema_update returns (cluster_size, embed_sum, codebook)")
        num, d = embed_sum.shape
        n, m, e = (expect_shape(t, shape, name) for t, shape, name in
                   zip(out, ((num,), (num, d), (num, d)), ("cluster_size", "embed_sum", "codebook")))
        want = _ema_expected(cluster_size, embed_sum, z_e, indices, decay, 1e-5 if eps is None else eps)
        what = f"K = {num}, D = {d}, decay = {decay:.3f}, eps = {'default' if eps is None else eps}"
        expect_close(n, want[0], atol=1e-10, rtol=1e-9, msg=f"N = decay N + (1 - decay) n ({what})")
        expect_close(m, want[1], atol=1e-10, rtol=1e-9, msg=f"m = decay m + (1 - decay) s ({what})")
        expect(bool(torch.isfinite(as_tensor(e, "codebook")).all()), "the codes must stay finite (Laplace smoothing)")
        expect_close(e, want[2], atol=1e-10, rtol=1e-9, msg=f"e = m / N~ with the Laplace-smoothed counts ({what})")
        expect(isinstance(after, (tuple, list)) and len(after) == 4, "restore the test cell (its wrapper)")
        for before, now, name in zip((cluster_size, embed_sum, z_e, indices), after,
                                     ("cluster_size", "embed_sum", "z_e", "indices")):
            expect_equal(now, before, msg=f"ema_update must not modify its input {name} in place")


@judge("test_ema_reference")
def ema_reference(k, rng):
    """Ten (or more) EMA steps in a row, each on the previous step's outputs of the student's ``ema_update``, against
    ``dgmlib.vq.VectorQuantizer``'s training-mode update from the same state, on codes it chooses."""
    for num, d, decay, eps, dims, steps in ((6, 3, 0.9, None, 2, 10), (4, 2, 0.99, 1e-3, 1, 6),
                                            (_int(rng, 3, 12), _int(rng, 1, 5), _uniform(rng, 0.6, 0.98), 0.05, 2, 12)):
        reference = vq.VectorQuantizer(num, d, ema=True, decay=decay, eps=1e-5 if eps is None else eps,
                                       restart_threshold=None).double()
        with torch.no_grad():
            reference.cluster_size.copy_(0.2 + 2 * torch.rand(num, generator=rng, dtype=F64))
            reference.embed_sum.copy_(torch.randn(num, d, generator=rng, dtype=F64) * reference.cluster_size[:, None])
            reference.codebook.copy_(reference.embed_sum / reference.cluster_size[:, None])
        n, m = reference.cluster_size.clone(), reference.embed_sum.clone()
        kwargs = {"decay": decay} if eps is None else {"decay": decay, "eps": eps}
        shift = torch.randn(d, generator=rng, dtype=F64)
        for step in range(steps):
            shape = (_int(rng, 2, 5), d, *_spatial(rng, dims))
            z_e = torch.randn(shape, generator=rng, dtype=F64) + shift.view(1, d, *[1] * dims)
            indices = reference(z_e).indices  # the reference's codes, and its training-mode update
            out = k.ema_update(n, m, z_e, indices, **kwargs)
            expect(isinstance(out, (tuple, list)) and len(out) == 3,
                   "ema_update returns (cluster_size, embed_sum, codebook)")
            n, m, e = (as_tensor(t, name) for t, name in zip(out, ("cluster_size", "embed_sum", "codebook")))
        what = f"after {steps} steps (K = {num}, D = {d}, decay = {decay:.3f})"
        expect_close(n, reference.cluster_size, atol=1e-9, rtol=1e-9, msg=f"the counts N {what}")
        expect_close(m, reference.embed_sum, atol=1e-9, rtol=1e-9, msg=f"the sums m {what}")
        expect_close(e, reference.codebook, atol=1e-9, rtol=1e-9, msg=f"the codebook {what}")


# ------------------------------------------------------------------ Part 3: the VQ-VAE


def _init(module: torch.nn.Module, rng: torch.Generator) -> torch.nn.Module:
    """Weights ~ N(0, 1 / fan_in) and biases ~ N(0, 0.1^2), from ``rng`` (a network of sane scale, unlike ``randomise``)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=rng) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=rng))
    return module


def _random_vqvae(rng: torch.Generator, channels: int):
    """A reference MyVQVAE with random weights, and codes placed near its own encodings of digits (so that many
    codes are used), with random EMA statistics; in evaluation mode."""
    ref = _init(REF.MyVQVAE(channels=channels), rng)
    with torch.no_grad():
        z = ref.encode(_images(rng, 64, "train")).movedim(1, -1).reshape(-1, CODE_DIM)
        codebook = z[torch.randperm(len(z), generator=rng)[:NUM_CODES]]
        codebook = codebook + 0.05 * codebook.std() * torch.randn(codebook.shape, generator=rng)
        q = ref.quantizer
        q.codebook.copy_(codebook)
        q.cluster_size.copy_(0.5 + torch.rand(NUM_CODES, generator=rng))
        q.embed_sum.copy_(codebook * q.cluster_size[:, None])
        q.restarts.fill_(_int(rng, 0, 50))
    return ref.eval()


def _state(remote, what: str) -> dict[str, torch.Tensor]:
    state = remote.state_dict()
    expect(isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
           f"{what} must be a module with a state_dict of tensors")
    return dict(state)


def _same_layout(state: dict, reference: torch.nn.Module, what: str) -> None:
    want = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if got != want:
        odd = sorted(set(got.items()) ^ set(want.items()))[:4]
        raise JudgeFailure(f"{what} must keep the given architecture (encoder, quantizer with K = 32 codes of "
                           f"D = 8, decoder) and its names; differences: {odd}")


def _student_vqvae(k, ref: torch.nn.Module, channels: int):
    """The student's MyVQVAE(channels=...) in the kernel with the reference's state (weights and codebook)."""
    net = k.MyVQVAE(channels=channels)
    _same_layout(_state(net, "MyVQVAE(channels=...)"), ref, "MyVQVAE")
    net.load_state_dict({name: t.clone() for name, t in ref.state_dict().items()}, strict=True)
    return net


def _codes(ref: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The reference's codes of images ``y``: the nearest code of each encoder output (``dgmlib.vq``)."""
    with torch.no_grad():
        return vq.nearest_code(ref.encode(y), ref.quantizer.codebook)


TIE = 1e-4
"""Two codes whose squared distances to a vector differ by less than TIE (1 + ||z||^2 + max_k ||e_k||^2) are tied:
either is a right answer (the instructions: "ties may go to any of the tied codes"), since float32 arithmetic
(the expansion of the square, or not) may pick either."""


def _distances(ref: torch.nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The squared distances (B, h, w, K) of the reference's encoder outputs to its codes, in float64, and the
    tolerance (B, h, w) under which two of them are tied."""
    with torch.no_grad():
        z = ref.encode(y).movedim(1, -1).double()  # (B, h, w, D)
        e = ref.quantizer.codebook.double()
        d2 = (z.unsqueeze(-2) - e).square().sum(-1)
        return d2, TIE * (1 + z.square().sum(-1) + e.square().sum(-1).max())


def _clear(ref: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """(B,) booleans: the images whose every vector has one nearest code, with no other tied to it."""
    d2, tol = _distances(ref, y)
    two = d2.topk(2, dim=-1, largest=False).values
    return ((two[..., 1] - two[..., 0]) > tol).flatten(1).all(1)


def _clear_images(ref: torch.nn.Module, rng: torch.Generator, n: int, split: str) -> torch.Tensor:
    """``n`` digits of ``split`` (fewer if the split has no more) whose codes under ``ref`` have no ties."""
    candidates = _images(rng, 16 * n, split)
    return candidates[_clear(ref, candidates)][:n]


def _expect_codes(got, ref: torch.nn.Module, y: torch.Tensor, msg: str) -> None:
    """``got`` (B, h, w), from the kernel, must be a nearest code of every encoder output of ``ref`` (ties: any)."""
    d2, tol = _distances(ref, y)
    got = expect_shape(got, tuple(d2.shape[:-1]), msg)
    integral = not got.is_floating_point() or bool((got == got.round()).all())
    expect(integral and not got.is_complex() and bool((got >= 0).all()) and bool((got < d2.shape[-1]).all()),
           f"{msg}: codes are integers in [0, {d2.shape[-1] - 1}]")
    chosen = d2.gather(-1, got.long().unsqueeze(-1)).squeeze(-1)
    wrong = chosen > d2.min(-1).values + tol
    expect(not bool(wrong.any()), f"{msg}: {int(wrong.sum())} of {wrong.numel()} codes are not the nearest code")


def _recon(ref: torch.nn.Module, y: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """-log p(y | z_q) (B,) in nats with the reference's decoder: the categorical NLL of every pixel, summed."""
    return F.cross_entropy(ref.decoder(z_q), y[:, 0].long(), reduction="none").flatten(1).sum(1)


def _own_loss(ref: torch.nn.Module, y: torch.Tensor):
    """Eq. 3 for an EMA codebook: recon(straight_through(z_e, z_q)) + beta ||z_e - sg[e]||^2, with its parts."""
    z_e = ref.encode(y)
    idx = vq.nearest_code(z_e.detach(), ref.quantizer.codebook)
    z_q = ref.quantizer.codebook[idx].movedim(-1, 1)
    recon = _recon(ref, y, vq.straight_through(z_e, z_q))
    return recon + 0.25 * (z_e - z_q.detach()).square().flatten(1).sum(1), idx


@judge("test_vqvae_loss")
def vqvae_loss(k, rng):
    """A fresh MyVQVAE of the student's, in evaluation mode, with random weights and codebook chosen here:
    ``recon_nll`` on random z_q, ``codes``, ``training_loss`` and the gradients of a weighted sum of it with respect to
    every parameter (the test cell's wrapper ``loss_and_gradients``), against the judge's own Eq. 3."""
    for channels, n, split in ((_int(rng, 6, 12), 6, "test"), (16, 9, "train"), (_int(rng, 4, 20), 5, "val")):
        for _ in range(8):  # a random encoder can send many digits to tied codes: draw another one then
            ref = _random_vqvae(rng, channels)
            y = _clear_images(ref, rng, n, split)  # no tied codes: the loss and its gradients are then unambiguous
            if len(y) >= 3:
                break
        net = _student_vqvae(k, ref, channels).eval()
        n = len(y)
        expect(n >= 3, "the grader found too few images without tied codes (a judge error: report it)")
        z_q = ref.quantizer.codebook[torch.randint(0, NUM_CODES, (n, 2, 2), generator=rng)].movedim(-1, 1)
        z_q = z_q + 0.1 * torch.randn(z_q.shape, generator=rng)
        with torch.no_grad():
            expect_close(expect_shape(net.recon_nll(y, z_q), (n,), "recon_nll(y, z_q), one per image"),
                         _recon(ref, y, z_q), atol=1e-3, rtol=1e-5,
                         msg="recon_nll: the decoder's categorical NLL of every pixel, summed")
        codes = net.codes(y)
        expect_shape(codes, (n, 2, 2), "codes(y) (B, h, w)")
        expect(codes.dtype == torch.int64, "codes(y) must be int64")
        _expect_codes(codes, ref, y, "codes(y): the nearest code of each encoder output")
        weights = 0.5 + torch.rand(n, generator=rng)
        result = k.loss_and_gradients(net, y, weights)
        expect(isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], dict),
               "restore the test cell (its wrapper)")
        loss, grads = result
        expected, _ = _own_loss(ref, y)
        expect_close(expect_shape(loss, (n,), "training_loss(y), one per image"), expected.detach(), atol=1e-3,
                     rtol=1e-5, msg="training_loss: -log p(y | z_q) + beta ||z_e - sg[e]||^2 (Eq. 3, EMA codebook)")
        named = dict(ref.named_parameters())
        want = torch.autograd.grad((expected * weights).sum(), list(named.values()))
        expect(sorted(grads) == sorted(named), "the gradients of every parameter of the encoder and the decoder")
        for (name, p), g in zip(named.items(), want):
            expect_close(grads[name], g, atol=1e-4, rtol=1e-3,
                         msg=f"the gradient of the training loss with respect to {name} (straight-through to the "
                             f"encoder, plus the commitment term)")


def _trained_vqvae(state: dict) -> torch.nn.Module:
    """The student's trained parameters in the reference architecture (its width read from the encoder)."""
    try:
        channels = int(state["encoder.0.weight"].shape[0])
        ref = REF.MyVQVAE(channels=channels)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise JudgeFailure(f"model must be the trained MyVQVAE() of the instructions ({str(err)[:200]})") from None
    _same_layout(state, ref, "model")
    ref.load_state_dict({name: t.clone() for name, t in state.items()}, strict=True)
    for name, t in ref.state_dict().items():
        expect(bool(torch.isfinite(t.double()).all()), f"model's {name} holds NaN or infinity")
    return ref.float().eval()


def _recon_mean(ref: torch.nn.Module, y: torch.Tensor) -> float:
    with torch.no_grad():
        codes = _codes(ref, y)
        return float(_recon(ref, y, ref.quantizer.codebook[codes].movedim(-1, 1)).mean())


@judge("test_codebook_health")
def codebook_health(k, rng):
    """The trained ``model``'s parameters in the reference MyVQVAE: perplexity of its test codes >= 0.25 K, at least
    K / 2 codes used, reconstruction term <= 102 nats on the test digits and not far below the validation one;
    ``model.codes`` agrees with them; and ``codes()`` of a fresh model in training mode changes nothing."""
    ref = _trained_vqvae(_state(k.model, "model"))
    test = _digits("test")
    codes = _codes(ref, test)
    perplexity = float(vq.codebook_perplexity(codes, NUM_CODES))
    expect(perplexity >= PERPLEXITY_SHARE * NUM_CODES,
           f"the perplexity of the test codes is {perplexity:.1f}, below {PERPLEXITY_SHARE} K = "
           f"{PERPLEXITY_SHARE * NUM_CODES:.1f}")
    used = int(torch.unique(codes).numel())
    expect(used >= NUM_CODES // 2, f"only {used} codes of {NUM_CODES} are used on the test digits (at least half)")
    recon_test = expect_le(_recon_mean(ref, test), RECON_BOUND,
                           "the reconstruction term -log p(y | z_q) (nats/image) of your trained parameters on the "
                           "test digits")
    recon_val = _recon_mean(ref, _digits("val"))
    expect(recon_test >= recon_val - VAL_SLACK, f"the test reconstruction ({recon_test:.1f}) lies far below the "
                                                f"validation one ({recon_val:.1f}): train on the training digits only")
    y = _images(rng, 40)
    _expect_codes(k.model.codes(y), ref, y, "model.codes(y) must be the nearest codes of the trained model")
    # codes() must not update anything, even in training mode
    fresh_ref = _random_vqvae(rng, _int(rng, 6, 16))
    fresh = _student_vqvae(k, fresh_ref, fresh_ref.encoder[0].out_channels).train()
    y = _images(rng, 30, "train")
    before = fresh_ref.state_dict()
    for _ in range(2):
        codes = fresh.codes(y)
        after = _state(fresh, "MyVQVAE")
        for name, t in before.items():
            expect_equal(after[name], t, msg=f"codes() must not update anything, even in training mode ({name} changed)")
        _expect_codes(codes, fresh_ref, y, "codes(y) in training mode: the nearest codes")


# ------------------------------------------------------------------ Part 4: the prior and the bound


def _trained_prior(state: dict) -> torch.nn.Module:
    """The fitted prior's parameters in the given GatedPixelCNN over (1, 2, 2) maps of 32 levels, its masks fresh."""
    try:
        channels = int(state["layers.0.h_out.weight"].shape[0])
        ref = autoregressive.GatedPixelCNN((1, 2, 2), num_levels=NUM_CODES, channels=channels, num_layers=3,
                                           first_kernel=3)
        masks = {name: b.clone() for name, b in ref.named_buffers()}
        ref.load_state_dict({name: t.clone() for name, t in state.items()}, strict=True)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise JudgeFailure(f"prior must be the given GatedPixelCNN((1, 2, 2), num_levels=32, ...) "
                           f"({str(err)[:200]})") from None
    for name, mask in masks.items():
        expect_equal(dict(ref.named_buffers())[name], mask, msg=f"the prior's {name} must stay as given")
    return ref.float().eval()


def _prior_nll(prior: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return prior.nll(codes.unsqueeze(1).float())


@judge("test_code_maps")
def code_maps(k, rng):
    """``code_maps`` of the trained model on the validation and training digits equals the reference's codes as
    float maps (N, 1, 2, 2); on a fresh model in training mode and in evaluation mode it changes no state and
    leaves the mode as it was."""
    model = k.model.eval()  # a handle on the trained model (an exposed name cannot be passed as an argument)
    ref = _trained_vqvae(_state(model, "model"))
    for y in (_digits("val"), _digits("train"), _images(rng, _int(rng, 5, 40))):
        maps = k.code_maps(model, y)
        expect_shape(maps, (len(y), 1, 2, 2), "code_maps(model, y) (N, 1, h, w)")
        expect(maps.is_floating_point(), "the prior's data are float levels")
        _expect_codes(maps[:, 0], ref, y, "code_maps: the codes of the images")
    fresh_ref = _random_vqvae(rng, _int(rng, 6, 16))
    fresh = _student_vqvae(k, fresh_ref, fresh_ref.encoder[0].out_channels)
    before = fresh_ref.state_dict()
    for training in (True, False, True):
        fresh.train(training)
        y = _images(rng, _int(rng, 5, 30), "train")
        maps = k.code_maps(fresh, y)
        after = _state(fresh, "MyVQVAE")
        for name, t in before.items():
            expect_equal(after[name], t, msg=f"code_maps must not change the model ({name} changed)")
        expect_equal(fresh.attr("training"), training,
                     msg="code_maps must leave the model in the train/eval mode it was in")
        expect_shape(maps, (len(y), 1, 2, 2), "code_maps(model, y) (N, 1, h, w)")
        _expect_codes(maps[:, 0], fresh_ref, y, "code_maps of a fresh model (in training mode too): its codes")


@judge("test_bound_terms")
def bound_terms(k, rng):
    """``bound_terms(model, prior, y)`` on digits and images drawn here, for the trained model and for a fresh one of
    random weights, against the reconstruction and the prior's NLL computed here with the reference architectures
    loaded with the student's parameters."""
    model, prior = k.model.eval(), k.prior.eval()
    ref = _trained_vqvae(_state(model, "model"))
    ref_prior = _trained_prior(_state(prior, "prior"))
    fresh_ref = _random_vqvae(rng, _int(rng, 6, 16))
    fresh = _student_vqvae(k, fresh_ref, fresh_ref.encoder[0].out_channels).eval()
    random_levels = torch.randint(0, LEVELS, (7, 1, 8, 8), generator=rng).float()
    for net, net_ref, y in ((model, ref, _images(rng, _int(rng, 20, 60))), (model, ref, random_levels),
                            (fresh, fresh_ref, _images(rng, 25, "val"))):
        out = k.bound_terms(net, prior, y)
        expect(isinstance(out, (tuple, list)) and len(out) == 2, "bound_terms returns (recon, prior_nll)")
        codes = _codes(net_ref, y)
        with torch.no_grad():
            want_recon = _recon(net_ref, y, net_ref.quantizer.codebook[codes].movedim(-1, 1))
        recon = expect_shape(out[0], (len(y),), "recon, one per image")
        prior_nll = expect_shape(out[1], (len(y),), "prior_nll, one per image")
        clear = _clear(net_ref, y)  # images with tied codes may use either: compared on the others
        expect(bool(clear.any()) or net_ref is ref, "the grader found no image without tied codes (a judge error)")
        expect_close(recon[clear], want_recon[clear], atol=1e-3, rtol=1e-5,
                     msg="recon: -log p(y | z_q) of the model's codes, in nats per image")
        expect_close(prior_nll[clear], _prior_nll(ref_prior, codes)[clear], atol=1e-3, rtol=1e-5,
                     msg="prior_nll: the prior's nll of the code maps, in nats per image")


@judge("test_bound")
def bound(k, rng):
    """The bound -log p(y | z_q) - log p(c) of the trained model and prior, both loaded into the reference
    architectures, on the 447 test digits: the prior beats M log K by half a nat, the bound is below 115 nats (fast
    mode; 95 at full size), and neither lies far below its value on the validation digits."""
    ref = _trained_vqvae(_state(k.model, "model"))
    ref_prior = _trained_prior(_state(k.prior, "prior"))

    def terms(y):
        codes = _codes(ref, y)
        with torch.no_grad():
            recon = _recon(ref, y, ref.quantizer.codebook[codes].movedim(-1, 1))
        return float(recon.mean()), float(_prior_nll(ref_prior, codes).mean())

    recon, prior_nll = terms(_digits("test"))
    uniform = vq.uniform_prior_nll(4, NUM_CODES)
    expect_le(prior_nll, uniform - PRIOR_MARGIN, f"the fitted prior's test NLL (nats/image) must beat M log K = "
                                                 f"{uniform:.2f} by {PRIOR_MARGIN}")
    test_bound = expect_le(recon + prior_nll, bound_limit(), "the bound -log p(y | z_q) - log p(c) (nats/image) of "
                                                             "your trained model and prior on the test digits")
    val_recon, val_prior = terms(_digits("val"))
    expect(prior_nll >= val_prior - VAL_SLACK and test_bound >= val_recon + val_prior - VAL_SLACK,
           f"the test bound ({test_bound:.1f}) lies far below the validation one ({val_recon + val_prior:.1f}): "
           f"train on the training digits only")
    expect(math.isfinite(test_bound), "a finite bound")
