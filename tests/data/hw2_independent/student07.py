# hw2_flows, student 07: belt and braces (masks applied again, sums over explicit axes), a module-level helper.
# ---- cell: coupling ----
def sum_except_batch(v):
    """(B, ...) -> (B,): the sum of every entry of each example."""
    return v.sum(dim=tuple(range(1, v.dim())))


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(self.mask * x)
        free = 1 - self.mask
        z = self.mask * x + free * (x * torch.exp(s) + t)
        log_det = sum_except_batch(free * s)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(self.mask * z)
        free = 1 - self.mask
        x = self.mask * z + free * (z - t) * torch.exp(-s)
        log_det = -sum_except_batch(free * s)
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u = torch.rand(y.shape, generator=generator).to(y.device)
    x = (y + u) / num_levels
    D = sum_except_batch(torch.ones_like(y[:1])).item()
    return -log_prob(x) + D * math.log(num_levels)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    channels = shape[0]
    parts = [flows.Logit(shape, alpha=0.01)]
    parity = 0
    for _ in range(num_couplings):
        parts.append(AffineCoupling(flows.checkerboard_mask(shape, parity), flows.ConvConditioner(channels, hidden)))
        parity = 1 - parity
    return flows.Flow(flows.Compose(*parts), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
history = train.fit(
    model,
    train_y,
    val_y,
    epochs=EPOCHS,
    lr=1e-3,
    batch_size=64,
    loss_fn=lambda y: dequantization_bound(model.log_prob, y, images.num_levels),
)
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
        c = self.log_s.numel()
        eye = torch.eye(c, dtype=self.log_s.dtype, device=self.log_s.device)
        strictly_lower = torch.tril(self.lower, -1)
        strictly_upper = torch.triu(self.upper, 1)
        diag = torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.P @ (strictly_lower + eye) @ (strictly_upper + diag)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        z = torch.einsum("bchw,dc->bdhw", x, w)
        hw = x.shape[-2] * x.shape[-1]
        log_det = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) * (hw * self.log_s.sum())
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_inv = torch.linalg.inv(self.weight())
        x = torch.einsum("bchw,dc->bdhw", z, w_inv)
        hw = z.shape[-2] * z.shape[-1]
        log_det = torch.ones(z.shape[0], dtype=z.dtype, device=z.device) * (-hw * self.log_s.sum())
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)
    x = (y + u) / num_levels
    D = sum_except_batch(torch.ones_like(y[:1])).item()
    return -log_prob(x) + log_q + D * math.log(num_levels)
# ---- cell: vtrain ----
vmodel = flows.Flow(
    build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
    num_levels=images.num_levels,
    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16),
)
vhistory = train.fit(
    vmodel,
    train_y,
    val_y,
    epochs=EPOCHS,
    lr=1e-3,
    batch_size=64,
    loss_fn=lambda y: variational_bound(vmodel.log_prob, vmodel.dequantizer, y, images.num_levels),
)
