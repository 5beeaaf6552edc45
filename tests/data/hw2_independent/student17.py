# hw2_flows, student 17: masks by multiplication with triangular ones, sums over dims computed once, comments in the margin.
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

    def _event_dims(self):
        return tuple(range(1, 1 + self.mask.dim()))   # every axis of an event

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(self.mask * x)    # zero where mask == 1
        z = x * torch.exp(s) + t                      # kept entries pass through
        return z, s.sum(self._event_dims())

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(self.mask * z)    # same s, t: mask * z == mask * x
        x = (z - t) * torch.exp(-s)
        return x, -s.sum(self._event_dims())
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    dims = tuple(range(1, y.dim()))
    D = math.prod(y.shape[d] for d in dims)         # entries per example
    u = torch.rand(y.shape, generator=generator)    # U[0, 1) noise, one per entry
    u = u.to(y.device)
    nll = -log_prob((y + u) / num_levels)             # (B,)
    return nll + D * math.log(num_levels)             # scaling jacobian K^-D
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    in_channels = shape[0]
    couplings = []
    for k in range(num_couplings):
        m = flows.checkerboard_mask(shape, parity=k % 2)     # alternate the parity
        couplings += [AffineCoupling(m, flows.ConvConditioner(in_channels, hidden))]
    pre = flows.Logit(shape, alpha=0.01)                      # [0, 1) -> R
    return flows.Flow(flows.Compose(pre, *couplings), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
history = train.fit(model, train_y, val_y, lr=1e-3, batch_size=64, epochs=EPOCHS,
                    loss_fn=lambda y: dequantization_bound(model.log_prob, y, images.num_levels))  # nats/image
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
        ones = torch.ones_like(self.lower)
        strict_lower = self.lower * torch.tril(ones, -1)          # keep below the diagonal only
        strict_upper = self.upper * torch.triu(ones, 1)           # keep above the diagonal only
        eye = torch.eye(ones.shape[0], dtype=ones.dtype, device=ones.device)
        L = strict_lower + eye
        U = strict_upper + eye * (self.sign_s * torch.exp(self.log_s))
        return self.P @ L @ U

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.einsum("ij,bjhw->bihw", self.weight(), x)      # W at every pixel
        n_pixels = x.shape[-2] * x.shape[-1]
        return z, torch.ones_like(x[:, 0, 0, 0]) * n_pixels * self.log_s.sum()

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight()), z)
        n_pixels = z.shape[-2] * z.shape[-1]
        return x, torch.ones_like(z[:, 0, 0, 0]) * -n_pixels * self.log_s.sum()
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)     # q(u | y), differentiable
    D = y[0].numel()
    nll = -log_prob((y + u) / num_levels)             # (B,)
    return nll + log_q + D * math.log(num_levels)
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
vhistory = train.fit(vmodel, train_y, val_y, lr=1e-3, batch_size=64, epochs=EPOCHS,
                     loss_fn=lambda y: variational_bound(vmodel.log_prob, vmodel.dequantizer, y, images.num_levels))
