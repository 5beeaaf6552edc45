# hw2_flows, student 06: terse, returns directly, short names.
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
        s, t = self.scale_and_shift(x * self.mask)
        return x * s.exp() + t, s.flatten(1).sum(1)

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(z * self.mask)
        return (z - t) * (-s).exp(), -s.flatten(1).sum(1)
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u = torch.rand(y.shape, generator=generator).to(y.device)
    return y[0].numel() * math.log(num_levels) - log_prob((y + u) / num_levels)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    return flows.Flow(flows.Compose(flows.Logit(shape, alpha=0.01),
                                    *[AffineCoupling(flows.checkerboard_mask(shape, i % 2),
                                                     flows.ConvConditioner(shape[0], hidden))
                                      for i in range(num_couplings)]),
                      num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                    loss_fn=lambda b: dequantization_bound(model.log_prob, b, images.num_levels))
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
        I = torch.eye(self.lower.size(0)).to(self.lower)
        return self.P @ (self.lower.tril(-1) + I) @ (self.upper.triu(1) + torch.diag(self.sign_s * self.log_s.exp()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.einsum("ij,bjhw->bihw", self.weight(), x), x[0, 0].numel() * self.log_s.sum().expand(len(x))

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight()), z),
                -z[0, 0].numel() * self.log_s.sum().expand(len(z)))
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, lq = dequantizer.sample(y, generator)
    return lq - log_prob((y + u) / num_levels) + y[0].numel() * math.log(num_levels)
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                     loss_fn=lambda b: variational_bound(vmodel.log_prob, vmodel.dequantizer, b, images.num_levels))
