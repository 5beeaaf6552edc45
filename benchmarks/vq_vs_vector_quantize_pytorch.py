"""dgmlib's vector quantizer against vector-quantize-pytorch's `VectorQuantize`, in the same VQ-VAE, in one run.

Both quantizers sit in the same `dgmlib.vq.VQVAE` (the same encoder and decoder, initialised identically from one
seed) and are trained by the same `dgmlib.train.fit` loop (Adam, lr 1e-3, batch 64) on the same digits split with
the same objective, -log p(y | z_q) + 0.25 ||z_e - sg[e]||^2 per image. The settings match: 64 codes of dimension
16, EMA codebook updates with decay 0.99, commitment weight 0.25, the plain straight-through gradient (the peer's
rotation trick off), no k-means initialisation, and dead-code restarts either off for both (default) or at the
same EMA count threshold for both (`--restart 1.0`). The peer's commitment loss is a mean over all entries of the
batch; the adapter multiplies it by the entries per image, so that both optimise the same sum per image.

    pip install -e ".[bench]"
    python benchmarks/vq_vs_vector_quantize_pytorch.py --epochs 30

Prints, for both: milliseconds per training step, the codebook perplexity over training (the mean of the batches'
perplexities in each tenth of the run), the codes in use and the reconstruction term -log p(y | z_q) on the test
digits (nats/image), and the time ratio peer / dgmlib measured in this run.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgmlib import data, train, vq


class PeerQuantizer(nn.Module):
    """vector-quantize-pytorch's `VectorQuantize` behind `dgmlib.vq.VectorQuantizer`'s interface (what `VQVAE` calls)."""

    def __init__(self, num_codes: int, dim: int, beta: float, decay: float, restart: float | None) -> None:
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.num_codes, self.dim = num_codes, dim
        self.peer = VectorQuantize(dim=dim, codebook_size=num_codes, decay=decay, commitment_weight=beta,
                                   accept_image_fmap=True, rotation_trick=False, kmeans_init=False,
                                   threshold_ema_dead_code=restart or 0.0)

    @property
    def codebook(self) -> Tensor:
        return self.peer.codebook  # (K, D)

    def _lookup(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.codebook).movedim(-1, 1)

    def forward(self, z_e: Tensor) -> vq.Quantized:
        z_q, indices, loss = self.peer(z_e)  # loss: beta * mean over every entry of the batch (0 in eval mode)
        per_image = loss * z_e[0].numel() * z_e.new_ones(z_e.shape[0])  # the same sum per image as dgmlib's
        zero = z_e.new_zeros(z_e.shape[0])
        return vq.Quantized(z_q, indices, zero, per_image / max(self.peer.commitment_weight, 1e-12), per_image,
                            vq.codebook_perplexity(indices, self.num_codes))


def run(model: vq.VQVAE, name: str, args: argparse.Namespace, splits: tuple[Tensor, Tensor, Tensor]) -> dict:
    train_y, val_y, test_y = splits
    perplexities: list[float] = []
    hook = model.quantizer.register_forward_hook(
        lambda module, inputs, out: perplexities.append(out.perplexity.item()) if module.training else None)
    history = train.fit(model, train_y, val_y, loss_fn=model.training_loss, epochs=args.epochs, lr=1e-3,
                        batch_size=64, seed=args.seed, progress=False)
    hook.remove()
    steps = len(perplexities)
    model.eval()
    with torch.no_grad():
        recon, _ = model.nll_terms(test_y)
        codes = model.codes(test_y)
    tenth = max(1, steps // 10)
    curve = [sum(perplexities[i:i + tenth]) / len(perplexities[i:i + tenth]) for i in range(0, steps, tenth)][:10]
    return {"name": name, "ms_per_step": 1000 * history.seconds / steps, "steps": steps, "curve": curve,
            "perplexity": vq.codebook_perplexity(codes, model.num_codes).item(),
            "codes_used": len(torch.unique(codes)), "recon": recon.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", type=float, default=None,
                        help="restart codes whose EMA count falls below this (both quantizers); default: off")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    splits = (data.load_digits("train"), data.load_digits("val"), data.load_digits("test"))
    ours = vq.VQVAE(num_codes=64, code_dim=16, channels=64, beta=0.25, ema=True, decay=0.99,
                    restart_threshold=args.restart)
    peer = copy.deepcopy(ours)  # the same encoder, decoder and prior weights
    peer.quantizer = PeerQuantizer(64, 16, beta=0.25, decay=0.99, restart=args.restart)
    results = [run(ours, "dgmlib.vq.VectorQuantizer", args, splits),
               run(peer, "vector_quantize_pytorch.VectorQuantize", args, splits)]
    print(f"VQ-VAE on digits, {args.epochs} epochs, 64 codes x 16 dims, EMA decay 0.99, beta 0.25, "
          f"restarts {'at ' + str(args.restart) if args.restart else 'off'}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'quantizer':40s} {'ms/step':>8s} {'perplexity (test)':>18s} {'codes used':>11s} "
          f"{'-log p(y|z_q) nats':>19s} {'bits/dim':>9s}")
    for r in results:
        print(f"{r['name']:40s} {r['ms_per_step']:8.2f} {r['perplexity']:18.1f} {r['codes_used']:11d} "
              f"{r['recon']:19.2f} {r['recon'] / (64 * math.log(2)):9.3f}")
    for r in results:
        print(f"perplexity over training, {r['name']}: " + " ".join(f"{p:.1f}" for p in r["curve"]))
    print(f"time per step, peer / dgmlib: {results[1]['ms_per_step'] / results[0]['ms_per_step']:.2f}")


if __name__ == "__main__":
    main()
