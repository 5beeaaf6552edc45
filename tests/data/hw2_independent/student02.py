# hw2_flows, student 02: helper methods with docstrings, reshape, a generator expression, conv2d for the 1x1 convolution.
# ---- cell: coupling ----
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

    @staticmethod
    def _sum_per_example(v: torch.Tensor) -> torch.Tensor:
        """Sum over every axis but the batch axis: (B, ...) -> (B,)."""
        return v.reshape(v.shape[0], -1).sum(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(self.mask * x)
        # kept entries have s = t = 0, so the same formula leaves them alone
        z = x * s.exp() + t
        log_det = self._sum_per_example(s)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(self.mask * z)  # m * z == m * x
        x = (z - t) * (-s).exp()
        log_det = -self._sum_per_example(s)
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    """One-sample estimate of the negative uniform-dequantization bound, (B,) nats."""
    batch = y.shape[0]
    d = y.numel() // batch
    u = torch.rand(y.shape, generator=generator)
    u = u.to(y.device)
    x = (y + u) / num_levels
    nll = -log_prob(x)
    return nll + d * math.log(num_levels)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    def coupling(k):
        parity = k % 2
        return AffineCoupling(flows.checkerboard_mask(shape, parity), flows.ConvConditioner(shape[0], hidden))

    logit = flows.Logit(shape, alpha=0.01)
    transform = flows.Compose(logit, *(coupling(k) for k in range(num_couplings)))
    return flows.Flow(transform, num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
K = images.num_levels
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                    loss_fn=lambda batch: dequantization_bound(model.log_prob, batch, K))
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
        n = self.log_s.shape[0]
        ones_diag = torch.eye(n, dtype=self.log_s.dtype, device=self.log_s.device)
        lower_unit = self.lower.tril(diagonal=-1) + ones_diag
        s = self.sign_s * self.log_s.exp()
        upper_full = self.upper.triu(diagonal=1) + torch.diag_embed(s)
        return torch.matmul(self.P, torch.matmul(lower_unit, upper_full))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight()
        z = torch.nn.functional.conv2d(x, weight[:, :, None, None])
        pixels = x.shape[2] * x.shape[3]
        log_det = (pixels * self.log_s.sum()).expand(x.shape[0])
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_weight = torch.linalg.inv(self.weight())
        x = torch.nn.functional.conv2d(z, inv_weight[:, :, None, None])
        pixels = z.shape[2] * z.shape[3]
        log_det = (-pixels * self.log_s.sum()).expand(z.shape[0])
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    """Flow++'s one-sample bound with a learned q(u | y), (B,) nats."""
    u, log_q = dequantizer.sample(y, generator)
    d = y.numel() // y.shape[0]
    nll = -log_prob((y + u) / num_levels)
    return nll + log_q + d * math.log(num_levels)
# ---- cell: vtrain ----
flow = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
q = dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16)
vmodel = flows.Flow(flow.transform, num_levels=images.num_levels, dequantizer=q)
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                     loss_fn=lambda batch: variational_bound(vmodel.log_prob, vmodel.dequantizer, batch, q.num_levels))
