"""Neural ODEs: the adjoint method written for the course, the ODE block and an ODE-Net classifier.

A neural ODE replaces a stack of residual blocks ``z_{k+1} = z_k + f(z_k, θ)`` by the initial value
problem

    dz/dt = f(z(t), t, θ),   z(t0) = z0,   z(t1) = ODESolve(z0, f, t0, t1, θ),

solved by ``torchdiffeq.odeint`` (Chen et al. 2018, "Neural Ordinary Differential Equations", Eq. 1).
Gradients of a loss L(z(t1)) come from the adjoint a_z(t) = dL/dz(t), which obeys (Pontryagin;
Chen et al. 2018, Eq. 4-5 and Algorithm 1; Appendix B for the times)

    da_z/dt = -a_zᵀ ∂f/∂z,   da_θ/dt = -a_zᵀ ∂f/∂θ,   da_t/dt = -a_zᵀ ∂f/∂t,

solved backward in time from a_z(t1) = ∂L/∂z(t1), a_θ(t1) = 0, together with z(t) itself, so no
activation of the forward solve has to be stored. ``odeint_adjoint`` below is that method as one
``torch.autograd.Function``; every solve in it is a call to ``torchdiffeq.odeint``.

Shapes: a state ``z`` is any tensor, usually ``(B, D)``; times ``t`` are ``(T,)`` and the solution
is ``(T, *z0.shape)``, as in ``torchdiffeq.odeint``. Dynamics are called ``func(t, z)`` with a
0-dim time tensor, as in torchdiffeq.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchdiffeq import odeint

from dgmlib.device import value_checks

__all__ = [
    "SOLVERS", "augmented_dynamics", "odeint_adjoint", "check_times", "check_solver", "ConcatMLP", "ODEBlock",
    "ResidualBlock",
    "ODENetClassifier", "digits_classification_data", "split_labelled", "saved_tensor_bytes",
]

Dynamics = Callable[[Tensor, Tensor], Tensor]

SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun3", "rk4",
           "explicit_adams", "implicit_adams", "fixed_adams")
"""The ``torchdiffeq`` methods that ``odeint_adjoint`` and ``ODEBlock`` accept."""


def check_times(t: Tensor, like: Tensor | None = None) -> None:
    """Check a time grid: a 1-D floating tensor of at least 2 strictly monotone, finite times.

    Raises:
        TypeError: if ``t`` is not a floating tensor, or its dtype differs from ``like``'s.
        ValueError: for a wrong shape, non-finite values or times that are not strictly monotone.
    """
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"t must be a floating torch.Tensor of times, got {type(t).__name__}"
                        + (f" of dtype {t.dtype}" if isinstance(t, Tensor) else ""))
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"t has dtype {t.dtype} but the state has dtype {like.dtype}; use the same dtype")
    if t.dim() != 1 or len(t) < 2:
        raise ValueError(f"t must have shape (T,) with T >= 2, got {tuple(t.shape)}")
    if not value_checks(t):
        return
    if not torch.isfinite(t).all():
        raise ValueError("t contains NaN or inf")
    steps = t[1:] - t[:-1]
    if not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got {t.tolist()}")


def _check_state(z0: Tensor, name: str = "z0") -> None:
    if not isinstance(z0, Tensor) or not z0.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got "
                        + (f"dtype {z0.dtype}" if isinstance(z0, Tensor) else type(z0).__name__))
    if value_checks(z0) and not torch.isfinite(z0).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_solver(method: str, rtol: float, atol: float) -> None:
    """Check a torchdiffeq method name and tolerances.

    Raises:
        ValueError: for a method not in ``SOLVERS`` or non-positive tolerances.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE solver {method!r}; choose one of {', '.join(SOLVERS)}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")


def augmented_dynamics(func: Dynamics, t: Tensor, z: Tensor, a_z: Tensor,
                       params: Sequence[Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
    """Right-hand side of the adjoint system, solved backward in time (Chen et al. 2018, Eq. 4, Alg. 1).

    For the state ``[z, a_z, a_θ, a_t]`` it returns

        dz/dt = f(z, t, θ),   da_z/dt = -a_zᵀ ∂f/∂z,   da_θ/dt = -a_zᵀ ∂f/∂θ,   da_t/dt = -a_zᵀ ∂f/∂t,

    all three vector-Jacobian products from one reverse-mode pass through ``f`` with cotangent
    ``-a_z``. A parameter or a time that ``f`` does not use gets a zero derivative.

    Args:
        func: the dynamics ``f(t, z)``.
        t: the current time, a 0-dim tensor.
        z: the state ``z(t)``, e.g. ``(B, D)``.
        a_z: the adjoint ``dL/dz(t)``, same shape as ``z``.
        params: the parameters θ of ``func`` whose gradient is wanted.

    Returns:
        ``(f, da_z, da_params, da_t)``: ``f`` and ``da_z`` shaped like ``z``, ``da_params`` one
        tensor per parameter shaped like it, and ``da_t`` a 0-dim tensor.

    Raises:
        ValueError: if ``a_z`` and ``z`` differ in shape, or ``f(t, z)`` is not shaped like ``z``.
    """
    if a_z.shape != z.shape:
        raise ValueError(f"a_z must have the shape of z {tuple(z.shape)}, got {tuple(a_z.shape)}")
    params = tuple(params)
    with torch.enable_grad():
        t = t.detach().requires_grad_(True)
        z = z.detach().requires_grad_(True)
        f = func(t, z)
        if not isinstance(f, Tensor) or f.shape != z.shape:
            raise ValueError(f"the dynamics must return a tensor shaped like z {tuple(z.shape)}, "
                             f"got {tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
        if not f.requires_grad:  # f depends on neither z, t nor θ
            return f, torch.zeros_like(z), tuple(torch.zeros_like(p) for p in params), torch.zeros_like(t)
        grads = torch.autograd.grad(f, (z, t, *params), -a_z, allow_unused=True)
    da_z, da_t, *da_params = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, (z, t, *params)))
    return f.detach(), da_z, tuple(da_params), da_t


class _AdjointODE(torch.autograd.Function):
    """z(t) = ODESolve(z0, f, t) with gradients from the adjoint system solved backward in time."""

    @staticmethod
    def forward(ctx, func: Dynamics, solver: dict, z0: Tensor, t: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            zs = odeint(func, z0, t, **solver)  # (T, *z0.shape)
        ctx.func, ctx.solver = func, solver
        ctx.save_for_backward(t, zs, *params)
        return zs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_zs: Tensor):
        t, zs, *params = ctx.saved_tensors
        func, solver = ctx.func, ctx.solver
        want_t = ctx.needs_input_grad[3]
        a_z = grad_zs[-1]
        a_params = tuple(torch.zeros_like(p) for p in params)
        a_t = t.new_zeros(())
        grad_t = torch.zeros_like(t)

        def rhs(s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            z, a = state[0], state[1]
            f, da_z, da_params, da_t = augmented_dynamics(func, s, z, a, params)
            return (f, da_z, da_t, *da_params)

        for i in range(len(t) - 1, 0, -1):
            if want_t:  # z(t_i) moves with t_i at speed f: dL/dt_i = a_z(t_i) · f(z(t_i), t_i)
                with torch.no_grad():
                    dl_dti = (func(t[i], zs[i]) * grad_zs[i]).sum()
                grad_t[i] = dl_dti
                a_t = a_t - dl_dti
            state = (zs[i], a_z, a_t, *a_params)
            solution = odeint(rhs, state, t[i - 1:i + 1].flip(0), **solver)  # from t_i back to t_{i-1}
            _, a_z, a_t, *a_params = (s[-1] for s in solution)
            a_z = a_z + grad_zs[i - 1]  # the loss may also read z(t_{i-1}) directly
        grad_t[0] = a_t
        return (None, None, a_z, grad_t if want_t else None, *a_params)


def odeint_adjoint(func: Dynamics, z0: Tensor, t: Tensor, *, params: Sequence[Tensor] | None = None,
                   method: str = "dopri5", rtol: float = 1e-6, atol: float = 1e-8,
                   options: dict | None = None) -> Tensor:
    """Solve dz/dt = f(t, z) from ``z(t[0]) = z0`` at the times ``t``, with adjoint gradients.

    The forward pass is ``torchdiffeq.odeint`` under ``no_grad``: nothing but the outputs is stored.
    The backward pass solves the augmented system ``[z, a_z, a_t, a_θ]`` (``augmented_dynamics``)
    from each output time back to the previous one with ``torchdiffeq.odeint``, adding the loss's
    direct gradient at every output time (Chen et al. 2018, Algorithm 1 and Appendix B). Memory
    is O(1) in the number of solver steps; the price is a second solve of z(t) backward in time
    and the error that solve makes. Gradients flow to ``z0``, ``t`` and ``params``.

    Args:
        func: the dynamics ``f(t, z)``; an ``nn.Module`` unless ``params`` is given.
        z0: initial state, any floating shape, e.g. ``(B, D)``.
        t: output times ``(T,)``, strictly monotone, same dtype as ``z0``; ``t[0]`` is the start.
        params: the tensors θ to differentiate (default: ``func``'s parameters that require grad).
        method, rtol, atol, options: passed to ``torchdiffeq.odeint`` for every solve.

    Returns:
        ``z`` of shape ``(T, *z0.shape)`` with ``z[i] = z(t[i])``, as ``torchdiffeq.odeint`` returns.

    Raises:
        TypeError: for a non-callable ``func``, a non-floating ``z0`` or ``t``, or no ``params``
            for a ``func`` that is not an ``nn.Module``.
        ValueError: for a bad time grid, non-finite ``z0``, an unknown ``method`` or bad tolerances.
    """
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, z), got {type(func).__name__}")
    _check_state(z0)
    check_times(t, like=z0)
    check_solver(method, rtol, atol)
    if params is None:
        if not isinstance(func, nn.Module):
            raise TypeError("func is not an nn.Module: pass its parameters as params=...")
        params = [p for p in func.parameters() if p.requires_grad]
    params = tuple(params)
    if not all(isinstance(p, Tensor) for p in params):
        raise TypeError("params must be tensors")
    solver = {"method": method, "rtol": rtol, "atol": atol, "options": options}
    return _AdjointODE.apply(func, solver, z0, t, *params)


class ConcatMLP(nn.Module):
    """Time-dependent dynamics ``f(t, z)``: an MLP that sees ``t`` concatenated to every layer's input.

    ``(B, D) -> (B, D)``. Smooth activations (tanh or softplus) keep ``f`` Lipschitz and
    differentiable, which the existence theorem for ODE solutions and the CNF trace need
    (Grathwohl et al. 2019, FFJORD, Sec. 4 use the same "concat" layers).

    Raises:
        ValueError: for non-positive sizes or an unknown activation.
    """

    def __init__(self, dim: int, hidden: int = 64, num_layers: int = 3, activation: str = "tanh") -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or num_layers < 1:
            raise ValueError(f"dim, hidden and num_layers must be positive, got {dim}, {hidden}, {num_layers}")
        acts = {"tanh": torch.tanh, "softplus": F.softplus}
        if activation not in acts:
            raise ValueError(f"activation must be one of {', '.join(acts)}, got {activation!r}")
        self.dim = dim
        self.act = acts[activation]
        sizes = [dim] + [hidden] * (num_layers - 1) + [dim]
        self.layers = nn.ModuleList(nn.Linear(a + 1, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        """``f(t, z)``: ``t`` a 0-dim (or ``(B,)``) time, ``z`` of shape ``(B, D)``; returns ``(B, D)``."""
        h = z
        tt = t.expand(z.shape[0], 1) if t.dim() == 0 else t.reshape(-1, 1).expand(z.shape[0], 1)
        for k, layer in enumerate(self.layers):
            h = layer(torch.cat([h, tt.to(h.dtype)], dim=1))  # (B, width + 1) -> (B, width')
            if k < len(self.layers) - 1:
                h = self.act(h)
        return h


class ODEBlock(nn.Module):
    """``z -> z(t1)`` for dz/dt = f(t, z), z(0) = z: a continuous-depth residual network (Chen et al. 2018).

    ``forward(z)`` maps ``(B, D)`` to ``(B, D)``. ``nfe`` counts calls of ``f`` since the last
    ``reset_nfe()`` (forward and backward together); ``adjoint=True`` differentiates with
    ``odeint_adjoint`` (O(1) memory), ``False`` backpropagates through the solver's operations.

    Raises:
        TypeError: if ``func`` is not an ``nn.Module``. ValueError: for ``t1 == 0``, an unknown
        method or bad tolerances.
    """

    def __init__(self, func: nn.Module, t1: float = 1.0, method: str = "dopri5", rtol: float = 1e-3,
                 atol: float = 1e-4, options: dict | None = None, adjoint: bool = True) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(f"func must be an nn.Module f(t, z), got {type(func).__name__}")
        if t1 == 0:
            raise ValueError("t1 must differ from the start time 0")
        check_solver(method, rtol, atol)
        self.func = func
        self.t1, self.method, self.rtol, self.atol, self.options, self.adjoint = t1, method, rtol, atol, options, adjoint
        self.nfe = 0

    def reset_nfe(self) -> None:
        """Set the function-evaluation counter to zero."""
        self.nfe = 0

    def _counted(self, t: Tensor, z: Tensor) -> Tensor:
        self.nfe += 1
        return self.func(t, z)

    def forward(self, z: Tensor) -> Tensor:
        """Return ``z(t1)``, shape of ``z``."""
        _check_state(z, "z")
        t = torch.tensor([0.0, self.t1], dtype=z.dtype, device=z.device)
        kwargs = {"method": self.method, "rtol": self.rtol, "atol": self.atol, "options": self.options}
        if self.adjoint:
            params = [p for p in self.func.parameters() if p.requires_grad]
            return odeint_adjoint(self._counted, z, t, params=params, **kwargs)[-1]
        return odeint(self._counted, z, t, **kwargs)[-1]


class ResidualBlock(nn.Module):
    """``z -> z + f(t, z)``: the residual block that one Euler step of size 1 reproduces (He et al. 2016).

    Shapes ``(B, D) -> (B, D)``; ``t`` is the fixed time at which ``f`` is evaluated.
    """

    def __init__(self, func: nn.Module, t: float = 0.0) -> None:
        super().__init__()
        self.func, self.t = func, t

    def forward(self, z: Tensor) -> Tensor:
        """Return ``z + f(t, z)``."""
        return z + self.func(torch.tensor(self.t, dtype=z.dtype, device=z.device), z)


class ODENetClassifier(nn.Module):
    """An ODE-Net for the 8×8 digits: ``Linear -> ODEBlock -> Linear``, 64 features to 10 logits.

    ``logits(x)`` maps ``(B, 64)`` pixel intensities in [0, 1] to ``(B, 10)``. ``nll(batch)`` is the
    cross-entropy in nats per example for a batch ``(B, 65)`` of 64 features followed by the label
    (the layout of ``digits_classification_data``), so ``dgmlib.train.fit`` trains it unchanged.
    ``accuracy`` and the block's ``nfe`` are what the lecture reports (Chen et al. 2018, Sec. 7.1).

    Raises:
        ValueError: for a batch that is not ``(B, in_dim)`` / ``(B, in_dim + 1)`` or labels out of range.
    """

    def __init__(self, in_dim: int = 64, hidden: int = 32, num_classes: int = 10, adjoint: bool = True,
                 method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-4) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.embed = nn.Linear(in_dim, hidden)
        self.block = ODEBlock(ConcatMLP(hidden, hidden, num_layers=2), method=method, rtol=rtol, atol=atol,
                              adjoint=adjoint)
        self.head = nn.Linear(hidden, num_classes)

    def logits(self, x: Tensor) -> Tensor:
        """``(B, in_dim) -> (B, num_classes)`` unnormalised log-probabilities."""
        _check_state(x, "x")
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape (B, {self.in_dim}), got {tuple(x.shape)}")
        return self.head(self.block(torch.tanh(self.embed(x))))

    def nll(self, batch: Tensor) -> Tensor:
        """Cross-entropy ``-log p(label | x)`` in nats, shape ``(B,)``."""
        x, labels = split_labelled(batch, self.in_dim, self.num_classes)
        return F.cross_entropy(self.logits(x), labels, reduction="none")

    @torch.no_grad()
    def accuracy(self, batch: Tensor) -> float:
        """Fraction of a ``(B, in_dim + 1)`` batch classified correctly."""
        x, labels = split_labelled(batch, self.in_dim, self.num_classes)
        return (self.logits(x).argmax(1) == labels).float().mean().item()


def split_labelled(batch: Tensor, num_features: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Split a ``(B, num_features + 1)`` batch (features, then the label; the layout of
    ``digits_classification_data``) into features ``(B, num_features)`` and integer labels ``(B,)``.

    Raises:
        ValueError: for a batch that is not a 2-D tensor of that width, or labels outside
        ``[0, num_classes - 1]``.
    """
    if not isinstance(batch, Tensor) or batch.dim() != 2 or batch.shape[1] != num_features + 1:
        shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(f"batch must have shape (B, {num_features + 1}): {num_features} features then the label, "
                         f"got {shape}")
    labels = batch[:, -1].long()
    if value_checks(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    return batch[:, :-1], labels


def digits_classification_data(split: str = "train") -> Tensor:
    """The digits split as ``(N, 65)``: 64 intensities in [0, 1] (levels / 16) and the label last.

    Uses the fixed 1000/350/447 split of ``dgmlib.data``. Raises ``ValueError`` for an unknown split.
    """
    from dgmlib.data import DIGITS_LEVELS, load_digit_labels, load_digits

    x = load_digits(split, flat=True).float() / (DIGITS_LEVELS - 1)
    return torch.cat([x, load_digit_labels(split).float()[:, None]], dim=1)


def saved_tensor_bytes(loss_fn: Callable[[], Tensor]) -> tuple[Tensor, int]:
    """Run ``loss_fn()`` and count the bytes autograd saves for its backward pass.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is counted once per distinct
    storage, so views and repeats of the same tensor (parameters, ``z0``) are not double-counted.
    This is the activation memory that backpropagation must keep alive: a deterministic stand-in
    for peak memory (``benchmarks/adjoint_memory.py`` measures peak RSS and time).

    Returns:
        ``(loss, bytes)``.
    """
    seen: dict[int, int] = {}

    def pack(x: Tensor) -> Tensor:
        storage = x.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = loss_fn()
    return loss, sum(seen.values())
