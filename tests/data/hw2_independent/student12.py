# hw2_flows, student 12: torch.where with a boolean mask, the log-det read off the diagonal of U, solve instead of inv.
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
        keep = self.mask.bool()
        s, t = self.scale_and_shift(torch.where(keep, x, torch.zeros_like(x)))
        z = torch.where(keep, x, x * torch.exp(s) + t)
        log_det = s.flatten(1).sum(-1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.mask.bool()
        s, t = self.scale_and_shift(torch.where(keep, z, torch.zeros_like(z)))
        x = torch.where(keep, z, (z - t) * torch.exp(-s))
        log_det = -s.flatten(1).sum(-1)
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    # Jensen: log P(y) >= E_u[log p((y + u) / K)] - D log K; one draw of u
    x = (y + torch.rand(y.shape, generator=generator).to(y.device)) / num_levels
    return y.flatten(1).size(1) * math.log(num_levels) - log_prob(x)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    parities = [k % 2 for k in range(num_couplings)]
    couplings = [AffineCoupling(flows.checkerboard_mask(shape, p), flows.ConvConditioner(shape[0], hidden))
                 for p in parities]
    logit = flows.Logit(shape, alpha=0.01)
    return flows.Flow(flows.Compose(*([logit] + couplings)), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                    loss_fn=lambda y: dequantization_bound(model.log_prob, y, images.num_levels))
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

    def _factors(self):
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        L = torch.tril(self.lower, -1) + eye
        U = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return L, U

    def weight(self) -> torch.Tensor:
        "The C x C matrix W = P L (U + diag(sign_s * exp(log_s)))."
        L, U = self._factors()
        return self.P @ L @ U

    def _log_abs_det(self):
        # det P = +-1 and det L = 1: log|det W| is the sum of log|diag(U)|
        _, U = self._factors()
        return torch.log(torch.abs(torch.diagonal(U))).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        z = (self.weight() @ x.reshape(b, c, -1)).reshape(b, c, h, w)
        log_det = (h * w * self._log_abs_det()) * torch.ones(b, dtype=x.dtype, device=x.device)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        x = torch.linalg.solve(self.weight(), z.reshape(b, c, -1)).reshape(b, c, h, w)
        log_det = -(h * w * self._log_abs_det()) * torch.ones(b, dtype=z.dtype, device=z.device)
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    # -log P(y) <= E_q[-log p((y + u) / K) + log q(u | y)] + D log K; one draw of u
    u, log_q = dequantizer.sample(y, generator)
    return y.flatten(1).size(1) * math.log(num_levels) - log_prob((y + u) / num_levels) + log_q
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                     loss_fn=lambda y: variational_bound(vmodel.log_prob, vmodel.dequantizer, y, images.num_levels))
