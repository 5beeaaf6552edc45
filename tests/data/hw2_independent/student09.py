# hw2_flows, student 09: the complement of the mask kept once, map() to build, the log-scale sum written with torch.sum.
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
        conditioning = x * self.mask
        s, t = self.scale_and_shift(conditioning)
        z = conditioning + (1.0 - self.mask) * (torch.exp(s) * x + t)
        log_det = torch.sum(s.reshape(len(s), -1), dim=1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conditioning = z * self.mask
        s, t = self.scale_and_shift(conditioning)
        x = conditioning + (1.0 - self.mask) * (torch.exp(-s) * (z - t))
        log_det = -torch.sum(s.reshape(len(s), -1), dim=1)
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u = torch.rand(y.shape, generator=generator).to(y.device)
    log_levels = torch.log(torch.tensor(float(num_levels)))
    dim = y.numel() / len(y)
    return dim * log_levels - log_prob((u + y) / num_levels)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    def make(k):
        return AffineCoupling(flows.checkerboard_mask(shape, k % 2), flows.ConvConditioner(shape[0], hidden))

    couplings = list(map(make, range(num_couplings)))
    return flows.Flow(flows.Compose(flows.Logit(shape, alpha=0.01), *couplings), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=0.001, batch_size=64,
                    loss_fn=lambda y: dequantization_bound(model.log_prob, y, num_levels=images.num_levels))
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
        c = self.lower.shape[0]
        eye = torch.eye(c, dtype=self.lower.dtype, device=self.lower.device)
        low = eye + torch.tril(self.lower, diagonal=-1)
        up = torch.triu(self.upper, diagonal=1) + torch.diag_embed(torch.exp(self.log_s) * self.sign_s)
        return self.P @ low @ up

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        z = (self.weight() @ x.reshape(b, c, h * w)).reshape(b, c, h, w)
        log_det = torch.sum(self.log_s) * h * w * torch.ones(b, dtype=x.dtype, device=x.device)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        x = (torch.linalg.inv(self.weight()) @ z.reshape(b, c, h * w)).reshape(b, c, h, w)
        log_det = -torch.sum(self.log_s) * h * w * torch.ones(b, dtype=z.dtype, device=z.device)
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)
    log_levels = math.log(num_levels)
    dim = y.numel() // len(y)
    return dim * log_levels + log_q - log_prob((u + y) / num_levels)
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=0.001, batch_size=64,
                     loss_fn=lambda y: variational_bound(vmodel.log_prob, vmodel.dequantizer, y,
                                                         num_levels=images.num_levels))
