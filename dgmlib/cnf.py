"""Continuous normalizing flows: the instantaneous change of variables, trace estimators and FFJORD.

For dz/dt = f(z(t), t, θ) with f Lipschitz in z and continuous in t, the log-density along a
trajectory obeys the instantaneous change of variables (Chen et al. 2018, Theorem 1)

    d log p(z(t)) / dt = -tr(∂f/∂z(t)),

so with the data at t1 and the base N(0, I) at t0 = 0 (Grathwohl et al. 2019, FFJORD, Eq. 4)

    log p(x) = log N(z(t0); 0, I) - ∫_{t0}^{t1} tr(∂f/∂z(t)) dt,   z(t1) = x.

The exact trace costs D reverse-mode passes; Hutchinson's estimator tr(A) = E[εᵀ A ε] for noise
with E[ε] = 0, Cov(ε) = I (Rademacher or Gaussian) costs one, and FFJORD keeps one ε per solve,
so the integral of the estimate is an unbiased estimate of the integral (FFJORD, Eq. 7-8).

Direction, as in ``dgmlib.flows``: ``forward(x) -> (z, log_det)`` maps data to latent with
``log_det = log |det ∂z/∂x| = -∫ tr(∂f/∂z) dt`` of shape ``(B,)``, so
``log_prob(x) = log N(z; 0, I) + log_det`` (nats). ``inverse(z) -> (x, log_det)`` integrates
from t0 to t1 with ``log_det = log |det ∂x/∂z|``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from dgmlib.device import DeviceLike, module_device, module_dtype, randint, randn
from dgmlib.flows import check_batch
from dgmlib.ode import ConcatMLP, check_solver, odeint_adjoint

__all__ = ["TRACES", "sample_noise", "exact_trace", "hutchinson_trace", "CNFDynamics", "PlanarDynamics",
           "CNF", "ffjord"]

TRACES = ("exact", "rademacher", "gaussian")
"""How ``CNFDynamics`` computes tr(∂f/∂z): exactly, or by Hutchinson with that noise."""


def sample_noise(shape: tuple[int, ...], kind: str = "rademacher", generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device: DeviceLike | None = None) -> Tensor:
    """Noise ε with E[ε] = 0 and Cov(ε) = I for Hutchinson's estimator, of the given ``shape``.

    ``kind="rademacher"``: ±1 with probability 1/2 each; ``"gaussian"``: N(0, I). With S = (A + Aᵀ)/2,
    Rademacher noise has the smaller variance, Var[εᵀAε] = 2 Σ_{i≠j} S_ij², against 2 ||S||_F² for
    Gaussian noise (Hutchinson 1990; Grathwohl et al. 2019, Sec. 3.1).

    The noise lands on ``device`` (default: the generator's device, else the CPU); a seeded
    generator gives the same numbers on every device (``dgmlib.device.randn``).

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if device is None:
        device = "cpu" if generator is None else generator.device
    if kind == "rademacher":
        return randint(0, 2, shape, device=device, generator=generator).to(dtype) * 2 - 1
    if kind == "gaussian":
        return randn(shape, device=device, dtype=dtype, generator=generator)
    raise ValueError(f"noise kind must be 'rademacher' or 'gaussian', got {kind!r}")


def _check_pair(f: Tensor, z: Tensor) -> None:
    if not isinstance(f, Tensor) or not isinstance(z, Tensor):
        raise TypeError("f and z must be tensors")
    if f.shape != z.shape or z.dim() != 2:
        raise ValueError(f"f and z must both have shape (B, D), got {tuple(f.shape)} and {tuple(z.shape)}")
    if not z.requires_grad or f.grad_fn is None:
        raise ValueError("f must be computed from z with autograd on: call z.requires_grad_() before f = net(t, z)")


def exact_trace(f: Tensor, z: Tensor, create_graph: bool = True) -> Tensor:
    """tr(∂f/∂z) per example, exactly: D reverse-mode passes, one per diagonal entry.

    Args:
        f: ``(B, D)``, computed from ``z`` with autograd; example b depends only on ``z[b]``.
        z: ``(B, D)`` with ``requires_grad``.
        create_graph: keep the graph so the trace itself can be differentiated (training).

    Returns:
        ``(B,)``.

    Raises:
        ValueError: for mismatched shapes or an ``f`` not computed from ``z``.
    """
    _check_pair(f, z)
    diag = []
    for i in range(z.shape[1]):
        (g,) = torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        diag.append(g[:, i])
    return torch.stack(diag, dim=1).sum(dim=1)


def hutchinson_trace(f: Tensor, z: Tensor, eps: Tensor, create_graph: bool = True) -> Tensor:
    """Hutchinson's estimate εᵀ (∂f/∂z) ε per example, from one vector-Jacobian product.

    E_ε[εᵀ A ε] = tr(A) whenever E[ε] = 0 and Cov(ε) = I (Hutchinson 1990; FFJORD, Eq. 7).

    Args:
        f, z: ``(B, D)`` as in ``exact_trace``.
        eps: ``(B, D)`` noise (``sample_noise``).
        create_graph: keep the graph for training.

    Returns:
        ``(B,)``, an unbiased estimate of the trace.

    Raises:
        ValueError: for mismatched shapes or an ``f`` not computed from ``z``.
    """
    _check_pair(f, z)
    if eps.shape != z.shape:
        raise ValueError(f"eps must have the shape of z {tuple(z.shape)}, got {tuple(eps.shape)}")
    (eps_jac,) = torch.autograd.grad(f, z, eps, create_graph=create_graph)  # εᵀ ∂f/∂z, (B, D)
    return (eps_jac * eps).sum(dim=1)


class CNFDynamics(nn.Module):
    """The augmented dynamics ``[dz/dt, d log p/dt] = [f(t, z), -tr(∂f/∂z)]`` on a state ``(B, D + 1)``.

    The last column of the state carries the log-density change. ``trace`` picks the exact trace or
    Hutchinson's estimate; for Hutchinson, ``noise`` (set by ``CNF`` once per solve, shape
    ``(B, D)``) is kept fixed during the solve, as FFJORD requires. ``nfe`` counts evaluations.

    Raises:
        ValueError: for an unknown ``trace``.
    """

    def __init__(self, net: nn.Module, dim: int, trace: str = "rademacher") -> None:
        super().__init__()
        if trace not in TRACES:
            raise ValueError(f"trace must be one of {', '.join(TRACES)}, got {trace!r}")
        self.net, self.dim, self.trace = net, dim, trace
        self.noise: Tensor | None = None
        self.exact = False  # set by CNF for evaluation with the exact trace
        self.nfe = 0

    def velocity(self, t: Tensor, z: Tensor) -> Tensor:
        """f(t, z): ``(B, D) -> (B, D)``."""
        return self.net(t, z)

    def divergence(self, f: Tensor, z: Tensor, create_graph: bool) -> Tensor:
        """tr(∂f/∂z) as configured: ``(B,)``."""
        if self.exact or self.trace == "exact":
            return exact_trace(f, z, create_graph)
        if self.noise is None or self.noise.shape != z.shape:
            raise RuntimeError("Hutchinson noise is not set for this batch; CNF sets it before each solve")
        return hutchinson_trace(f, z, self.noise.to(z.dtype), create_graph)

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        """``(B, D + 1) -> (B, D + 1)``: ``[f(t, z), -tr(∂f/∂z)]``."""
        self.nfe += 1
        create_graph = torch.is_grad_enabled()  # off in a no-grad solve: no graph for the trace
        with torch.enable_grad():
            z = state[:, :self.dim]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f = self.velocity(t, z)
            div = self.divergence(f, z, create_graph)
        return torch.cat([f, -div[:, None]], dim=1)


class PlanarDynamics(nn.Module):
    """The continuous planar flow of the slides: f(z) = u h(wᵀz + b), with h = tanh.

    Its Jacobian is the rank-one matrix u h'(wᵀz + b) wᵀ, so tr(∂f/∂z) = h'(wᵀz + b) uᵀw in closed
    form, O(D) with no estimator (Chen et al. 2018, Sec. 4, "planar CNF"; Rezende & Mohamed 2015,
    Eq. 10 for the discrete planar flow). ``(B, D) -> (B, D)``; ``t`` is ignored.
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.randn(dim) * scale)
        self.w = nn.Parameter(torch.randn(dim) * scale)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        """f(z) = u tanh(wᵀz + b): ``(B, D)``."""
        return torch.tanh(z @ self.w + self.b)[:, None] * self.u

    def trace(self, z: Tensor) -> Tensor:
        """tr(∂f/∂z) = (1 - tanh²(wᵀz + b)) uᵀw, shape ``(B,)``."""
        return (1 - torch.tanh(z @ self.w + self.b) ** 2) * (self.u @ self.w)


class CNF(nn.Module):
    """A continuous normalizing flow with base N(0, I) at t = 0 and the data at t = t1 (FFJORD).

    ``forward(x) -> (z, log_det)`` solves the augmented ODE from t1 back to 0 (data -> latent);
    ``inverse(z) -> (x, log_det)`` from 0 to t1. Training (``nll``) uses ``trace`` (Hutchinson by
    default, fresh noise each call); in eval mode, with ``exact_eval``, the exact trace gives the
    log-likelihood without estimator noise. ``adjoint=True`` differentiates with
    ``dgmlib.ode.odeint_adjoint``. ``nfe`` of ``dynamics`` counts function evaluations.

    Args:
        net: the velocity field ``f(t, z)``, ``(B, D) -> (B, D)``.
        dim: D.
        t1: integration time (may be a learned quantity in FFJORD; fixed here).
        trace: ``"exact"``, ``"rademacher"`` or ``"gaussian"``.
        method, rtol, atol: the torchdiffeq solver and tolerances.

    Raises:
        ValueError: for an unknown trace or solver, ``t1 <= 0`` or bad tolerances.
    """

    def __init__(self, net: nn.Module, dim: int, t1: float = 1.0, trace: str = "rademacher",
                 method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, adjoint: bool = True,
                 exact_eval: bool = True) -> None:
        super().__init__()
        check_solver(method, rtol, atol)
        if not t1 > 0:
            raise ValueError(f"t1 must be positive, got {t1}")
        self.dynamics = CNFDynamics(net, dim, trace)
        self.dim, self.t1, self.method, self.rtol, self.atol = dim, t1, method, rtol, atol
        self.adjoint, self.exact_eval = adjoint, exact_eval

    def _transport(self, x: Tensor, start: float, end: float) -> tuple[Tensor, Tensor]:
        """Solve [z, log p] from ``(x, 0)`` at ``start`` to ``end``; return ``(z(end), -Δ log p)``, ``(B, D)`` and ``(B,)``."""
        dyn = self.dynamics
        dyn.exact = self.exact_eval and not self.training
        if not dyn.exact and dyn.trace != "exact":
            dyn.noise = sample_noise((len(x), self.dim), dyn.trace, dtype=x.dtype, device=x.device)
        state = torch.cat([x, x.new_zeros(len(x), 1)], dim=1)  # (B, D + 1)
        t = torch.tensor([start, end], dtype=x.dtype, device=x.device)
        kwargs = {"method": self.method, "rtol": self.rtol, "atol": self.atol}
        if self.adjoint and torch.is_grad_enabled():
            params = [p for p in dyn.parameters() if p.requires_grad]
            final = odeint_adjoint(dyn, state, t, params=params, **kwargs)[-1]
        else:
            final = odeint(dyn, state, t, **kwargs)[-1]
        return final[:, :self.dim], -final[:, self.dim]

    def forward(self, x: Tensor, t1: float | None = None) -> tuple[Tensor, Tensor]:
        """Data ``x`` at time ``t1`` (default ``self.t1``) to the base: ``(z, log|det ∂z/∂x|)``, ``(B, D)`` and ``(B,)``."""
        check_batch(x, (self.dim,), "x")
        return self._transport(x, self.t1 if t1 is None else t1, 0.0)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Base ``z`` to data at t1: ``(x, log|det ∂x/∂z|)``, ``(B, D)`` and ``(B,)``."""
        check_batch(z, (self.dim,), "z")
        return self._transport(z, 0.0, self.t1)

    def base_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, I) in nats, ``(B,)``."""
        return -0.5 * (z ** 2).sum(dim=1) - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob(self, x: Tensor, t1: float | None = None) -> Tensor:
        """log p(x) in nats, ``(B,)`` (the density of the flow run to time ``t1``, default ``self.t1``)."""
        z, log_det = self(x, t1)
        return self.base_log_prob(z) + log_det

    def nll(self, x: Tensor) -> Tensor:
        """-log p(x) in nats, ``(B,)``: the training loss."""
        return -self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``(n, D)``: z ~ N(0, I), then the ODE from 0 to t1."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        z = randn((n, self.dim), device=module_device(self), dtype=module_dtype(self), generator=generator)
        was = self.training
        self.eval()
        x, _ = self.inverse(z)
        self.train(was)
        return x

    @torch.no_grad()
    def trajectory(self, z: Tensor, times: Tensor) -> Tensor:
        """The path of base points ``z`` ``(B, D)`` at ``times`` ``(T,)`` in [0, t1]: ``(T, B, D)``."""
        check_batch(z, (self.dim,), "z")
        return odeint(self.dynamics.velocity, z, times.to(device=z.device, dtype=z.dtype), method=self.method, rtol=self.rtol,
                      atol=self.atol)

    def count_nfe(self, x: Tensor) -> tuple[int, int]:
        """Function evaluations of one training step on ``x``: ``(forward solve, backward solve)``."""
        was = self.training
        self.train()
        self.dynamics.nfe = 0
        loss = self.nll(x).mean()
        forward = self.dynamics.nfe
        loss.backward()
        backward = self.dynamics.nfe - forward
        self.zero_grad(set_to_none=True)
        self.train(was)
        return forward, backward


def ffjord(dim: int = 2, hidden: int = 64, num_layers: int = 4, trace: str = "rademacher",
           activation: str = "tanh", t1: float = 1.0, rtol: float = 1e-5, atol: float = 1e-5) -> CNF:
    """FFJORD (Grathwohl et al. 2019, Sec. 3-4): a ``ConcatMLP`` velocity, Hutchinson's trace, adjoint training.

    The model of ``dgm train ffjord``: ``log_prob(x)`` maps ``(B, dim)`` to ``(B,)`` nats; ``sample(n)``
    returns ``(n, dim)``. The defaults (width 64, 4 layers, tanh, t1 = 1) fit the 2D toys.

    Raises:
        ValueError: for bad sizes, an unknown trace or activation, ``t1 <= 0`` or bad tolerances.
    """
    return CNF(ConcatMLP(dim, hidden, num_layers, activation), dim, t1=t1, trace=trace, rtol=rtol, atol=atol)
