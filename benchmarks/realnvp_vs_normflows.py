"""dgmlib's RealNVP against normflows' RealNVP: same data, same architecture, same run.

Both models are logit -> 8 masked affine couplings (checkerboard masks, alternating) -> N(0, I),
with the same ConvConditioner (3x3 convs, `--hidden` channels) producing the log-scale and shift,
the same bounded scale, trained by the same dgmlib.train.fit loop (Adam, lr 1e-3, batch 64) on the
same digits split with the same uniform-dequantization loss. Only the flow code differs: dgmlib's
AffineCoupling/Compose/Flow against normflows' MaskedAffineFlow/NormalizingFlow/DiagGaussian.
normflows asks for separate `s` and `t` modules; an adapter evaluates the shared conditioner once
per call so that neither side does extra work.

    pip install -e ".[bench]"
    python benchmarks/realnvp_vs_normflows.py --epochs 30

Prints seconds per epoch, test NLL (nats/image and bits/dim, dequantization bound, 4 noise draws)
and parameter counts for both, and the time ratio normflows / dgmlib measured in this run.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import Tensor, nn

from dgmlib import data, dequantization, flows, train, units


class _SharedConditioner(nn.Module):
    """Presents one ConvConditioner as normflows' separate s and t modules, computing it once per input."""

    def __init__(self, net: flows.ConvConditioner, scale_bound: float = 3.0) -> None:
        super().__init__()
        self.net, self.scale_bound = net, scale_bound
        self._cache: tuple[Tensor, Tensor] | None = None

    def output(self, x: Tensor) -> Tensor:
        if self._cache is None or self._cache[0] is not x:
            self._cache = (x, self.net(x))
        return self._cache[1]


class _Scale(nn.Module):
    def __init__(self, shared: _SharedConditioner) -> None:
        super().__init__()
        self.shared = shared

    def forward(self, x: Tensor) -> Tensor:
        b = self.shared.scale_bound
        return b * torch.tanh(self.shared.output(x)[:, 0] / b)


class _Shift(nn.Module):
    def __init__(self, shared: _SharedConditioner) -> None:
        super().__init__()
        self.shared = shared

    def forward(self, x: Tensor) -> Tensor:
        return self.shared.output(x)[:, 1]


class NormflowsRealNVP(nn.Module):
    """The same RealNVP written with normflows (its flows run latent -> data, so the list is reversed)."""

    def __init__(self, shape: tuple[int, int, int], num_couplings: int, hidden: int, num_levels: int) -> None:
        super().__init__()
        import normflows as nf

        self.logit = flows.Logit(shape, alpha=0.01)
        layers = []
        for k in range(num_couplings):
            shared = _SharedConditioner(flows.ConvConditioner(shape[0], hidden))
            mask = flows.checkerboard_mask(shape, k % 2)  # (C, H, W); normflows adds the batch dim
            layers.append(nf.flows.MaskedAffineFlow(mask, t=_Shift(shared), s=_Scale(shared)))
        base = nf.distributions.DiagGaussian(shape, trainable=False)
        self.flow = nf.NormalizingFlow(q0=base, flows=layers[::-1])
        self.num_levels = num_levels

    def log_prob(self, x: Tensor) -> Tensor:
        z, log_det = self.logit(x)
        return self.flow.log_prob(z) + log_det

    def nll(self, y: Tensor) -> Tensor:
        return dequantization.dequantized_nll(self.log_prob, y, self.num_levels)


def run(name: str, model: nn.Module, digits: data.ImageData, epochs: int, seed: int) -> dict:
    history = train.fit(model, digits.train, digits.val, epochs=epochs, lr=1e-3, batch_size=64, seed=seed,
                        progress=False)
    nll = train.evaluate(model, digits.test, num_samples=4)
    return {"name": name, "sec_per_epoch": history.seconds / len(history.train_loss), "test_nll": nll,
            "bpd": units.nats_to_bits_per_dim(nll, digits.num_dims),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--couplings", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    digits = data.load_image_data("digits")
    results = []
    for name in ("dgmlib", "normflows"):
        torch.manual_seed(args.seed)
        if name == "dgmlib":
            model = flows.realnvp(digits.shape, args.couplings, args.hidden, num_levels=digits.num_levels)
        else:
            model = NormflowsRealNVP(digits.shape, args.couplings, args.hidden, digits.num_levels)
        results.append(run(name, model, digits, args.epochs, args.seed))
    print(f"RealNVP on digits, {args.couplings} couplings, hidden {args.hidden}, {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads")
    print(f"{'library':<10} {'s/epoch':>8} {'test NLL (nats)':>16} {'bits/dim':>9} {'params':>8}")
    for r in results:
        print(f"{r['name']:<10} {r['sec_per_epoch']:>8.3f} {r['test_nll']:>16.2f} {r['bpd']:>9.3f} {r['params']:>8d}")
    print(f"time per epoch, normflows / dgmlib: {results[1]['sec_per_epoch'] / results[0]['sec_per_epoch']:.2f}")


if __name__ == "__main__":
    main()
