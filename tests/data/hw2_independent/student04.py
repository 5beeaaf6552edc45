# hw2_flows, student 04: numpy for sizes, one private helper shared by forward and inverse, multi_dot.
# ---- cell: coupling ----
import numpy as np


class AffineCoupling(flows.Bijection):
    "RealNVP affine coupling, data -> latent. Shapes: (B, *event_shape) in and out, log_det (B,)."

    def __init__(self, mask: torch.Tensor, net: nn.Module, scale_bound: float = 3.0) -> None:
        super().__init__(mask.shape)
        self.register_buffer("mask", mask.float())
        self.net = net  # maps (B, *event) to (B, 2, *event): raw log-scale and shift
        self.scale_bound = scale_bound

    def scale_and_shift(self, x_masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, t = self.net(x_masked).unbind(1)  # each (B, *event)
        s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
        return (1 - self.mask) * s, (1 - self.mask) * t

    def _affine(self, v, direction):
        """Apply the coupling (direction=+1) or undo it (direction=-1) to v; also the log-det."""
        s, t = self.scale_and_shift(self.mask * v)
        if direction > 0:
            out = v * torch.exp(s) + t
        else:
            out = (v - t) * torch.exp(-s)
        return out, direction * s.flatten(1).sum(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = self._affine(x, +1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det = self._affine(z, -1)
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    n_dims = int(np.prod(y.shape[1:]))
    uniform = torch.rand(y.shape, generator=generator).to(y.device)
    log_density = log_prob((y + uniform) / num_levels)
    return -log_density + n_dims * np.log(num_levels)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    masks = [flows.checkerboard_mask(shape, parity=i % 2) for i in range(num_couplings)]
    couplings = [AffineCoupling(mask, flows.ConvConditioner(shape[0], hidden)) for mask in masks]
    logit = flows.Logit(shape, alpha=0.01)
    return flows.Flow(flows.Compose(logit, *couplings), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
uniform_loss = lambda y: dequantization_bound(model.log_prob, y, images.num_levels)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=uniform_loss)
# ---- cell: lu_conv ----
class LUInvConv1x1(flows.Bijection):
    "Glow's invertible 1x1 convolution, LU form, data -> latent. Shapes: (B, C, H, W) in and out, log_det (B,)."

    def __init__(self, event_shape: tuple[int, int, int], seed: int = 0) -> None:
        super().__init__(event_shape)
        c = event_shape[0]
        generator = torch.Generator().manual_seed(seed)
        rotation = torch.linalg.qr(torch.randn(c, c, generator=generator))[0]  # orthogonal: |det| = 1
        p, lower, upper = torch.linalg.lu(rotation)  # rotation = P L U
        s = torch.diagonal(upper)
        self.register_buffer("P", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(lower)  # only the strictly lower triangle is used
        self.upper = nn.Parameter(upper)  # only the strictly upper triangle is used
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        "The C x C matrix W = P L (U + diag(sign_s * exp(log_s)))."
        identity = torch.eye(self.P.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        l_matrix = torch.tril(self.lower, diagonal=-1) + identity
        u_matrix = torch.triu(self.upper, diagonal=1) + torch.diag(self.sign_s * self.log_s.exp())
        return torch.linalg.multi_dot([self.P, l_matrix, u_matrix])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = (self.weight() @ x.flatten(2)).reshape(x.shape)
        spatial = int(np.prod(x.shape[2:]))
        log_det = spatial * self.log_s.sum() * torch.ones_like(x[:, 0, 0, 0])
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (torch.linalg.inv(self.weight()) @ z.flatten(2)).reshape(z.shape)
        spatial = int(np.prod(z.shape[2:]))
        log_det = -spatial * self.log_s.sum() * torch.ones_like(z[:, 0, 0, 0])
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)
    n_dims = int(np.prod(y.shape[1:]))
    log_density = log_prob((y + u) / num_levels)
    return -log_density + log_q + n_dims * np.log(num_levels)
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
variational_loss = lambda y: variational_bound(vmodel.log_prob, vmodel.dequantizer, y, images.num_levels)
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=variational_loss)
