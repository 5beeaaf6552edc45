# hw2_flows, student 13: small callable classes for the losses, an nn.ModuleList, the inverse cached as a method.
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift_scale = self.scale_and_shift(self.mask * x)
        s, t = shift_scale
        z = t + x * torch.exp(s)
        log_det = s.sum(dim=list(range(1, s.ndim)))
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(self.mask * z)
        x = torch.exp(-s) * z - torch.exp(-s) * t
        log_det = (-s).sum(dim=list(range(1, s.ndim)))
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    noise = torch.rand(y.shape, generator=generator).to(device=y.device)
    scaled = (y + noise) / num_levels
    entries_per_image = y.shape[1:].numel()
    jacobian_term = entries_per_image * math.log(num_levels)
    return jacobian_term - log_prob(scaled)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    nets = nn.ModuleList(flows.ConvConditioner(shape[0], hidden) for _ in range(num_couplings))
    steps = [AffineCoupling(flows.checkerboard_mask(shape, k % 2), nets[k]) for k in range(num_couplings)]
    return flows.Flow(flows.Compose(flows.Logit(shape, alpha=0.01), *steps), num_levels=num_levels)
# ---- cell: train ----
class UniformLoss:
    """loss_fn for train.fit: my dequantization bound of a flow, in nats per image."""

    def __init__(self, flow, levels):
        self.flow, self.levels = flow, levels

    def __call__(self, batch):
        return dequantization_bound(self.flow.log_prob, batch, self.levels)


model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                    loss_fn=UniformLoss(model, images.num_levels))
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
        channels = self.log_s.shape[0]
        unit = torch.eye(channels, dtype=self.log_s.dtype, device=self.log_s.device)
        lower = torch.tril(self.lower, -1) + unit
        upper = torch.triu(self.upper, 1) + unit * (self.sign_s * torch.exp(self.log_s)).unsqueeze(0)
        return self.P @ lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        return torch.linalg.inv(self.weight())

    def _log_det(self, v):
        pixels = v.shape[-1] * v.shape[-2]
        return v.new_ones(v.shape[0]) * self.log_s.sum() * pixels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.einsum("kc,bcij->bkij", self.weight(), x)
        log_det = self._log_det(x)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.einsum("kc,bcij->bkij", self.inverse_weight(), z)
        log_det = -self._log_det(z)
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    noise, log_q = dequantizer.sample(y, generator)
    scaled = (y + noise) / num_levels
    entries_per_image = y.shape[1:].numel()
    return entries_per_image * math.log(num_levels) + log_q - log_prob(scaled)
# ---- cell: vtrain ----
class VariationalLoss:
    """loss_fn for train.fit: my variational bound of a flow with its own dequantizer, in nats per image."""

    def __init__(self, flow, levels):
        self.flow, self.levels = flow, levels

    def __call__(self, batch):
        return variational_bound(self.flow.log_prob, self.flow.dequantizer, batch, self.levels)


vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                     loss_fn=VariationalLoss(vmodel, images.num_levels))
