# hw2_flows, student 01: plain and literal, a for loop to build the flow, named loss functions.
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
        z = torch.exp(s) * x + t
        log_det = torch.sum(s, dim=list(range(1, s.dim())))
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(z * self.mask)
        x = (z - t) / torch.exp(s)
        log_det = -torch.sum(s, dim=list(range(1, s.dim())))
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    noise = torch.rand(y.shape, generator=generator).to(y.device)
    dims = math.prod(y.shape[1:])
    log_px = log_prob((y + noise) / num_levels)
    return dims * math.log(num_levels) - log_px
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    layers = [flows.Logit(shape, alpha=0.01)]
    for k in range(num_couplings):
        mask = flows.checkerboard_mask(shape, k % 2)
        layers.append(AffineCoupling(mask, flows.ConvConditioner(shape[0], hidden)))
    return flows.Flow(flows.Compose(*layers), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)


def loss_fn(y):
    return dequantization_bound(model.log_prob, y, images.num_levels)


history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=loss_fn)
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
        C = self.lower.shape[0]
        I = torch.eye(C, dtype=self.lower.dtype, device=self.lower.device)
        L = torch.tril(self.lower, -1) + I
        U = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.P @ L @ U

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = self.weight()
        B, C, H, Wd = x.shape
        z = torch.einsum("oc,bchw->bohw", W, x)
        log_det = H * Wd * self.log_s.sum() * torch.ones(B, dtype=x.dtype, device=x.device)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W_inv = torch.linalg.inv(self.weight())
        B, C, H, Wd = z.shape
        x = torch.einsum("oc,bchw->bohw", W_inv, z)
        log_det = -H * Wd * self.log_s.sum() * torch.ones(B, dtype=z.dtype, device=z.device)
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)
    dims = math.prod(y.shape[1:])
    return log_q - log_prob((y + u) / num_levels) + dims * math.log(num_levels)
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))


def vloss_fn(y):
    return variational_bound(vmodel.log_prob, vmodel.dequantizer, y, images.num_levels)


vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=vloss_fn)
