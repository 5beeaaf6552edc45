# hw2_flows, student 03: the coupling written out with the mask as in the formula, permute and matmul for Glow's layer.
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
        m = self.mask
        s, t = self.scale_and_shift(m * x)
        z = m * x + (1 - m) * (x * torch.exp(s) + t)
        log_det = s.view(s.size(0), -1).sum(1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.mask
        s, t = self.scale_and_shift(m * z)
        x = m * z + (1 - m) * ((z - t) * torch.exp(-s))
        log_det = -s.view(s.size(0), -1).sum(1)
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    D = y[0].numel()
    log_K = math.log(num_levels)
    u = torch.rand(y.shape, generator=generator).to(y.device)  # one U[0,1) per entry
    return D * log_K - log_prob((y + u) / num_levels)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    masks = [flows.checkerboard_mask(shape, parity) for parity in [k % 2 for k in range(num_couplings)]]
    nets = [flows.ConvConditioner(shape[0], hidden) for _ in masks]
    couplings = [AffineCoupling(m, net) for m, net in zip(masks, nets)]
    return flows.Flow(flows.Compose(flows.Logit(shape, alpha=0.01), *couplings), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(shape=images.shape, hidden=HIDDEN, num_levels=images.num_levels)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                    loss_fn=lambda yb: dequantization_bound(model.log_prob, yb, images.num_levels))
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
        eye = torch.eye(len(self.log_s), dtype=self.upper.dtype, device=self.upper.device)
        L = eye + self.lower.tril(-1)
        U = self.upper.triu(1) + eye * (self.sign_s * self.log_s.exp())
        return self.P.matmul(L).matmul(U)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = self.weight()
        z = (x.permute(0, 2, 3, 1) @ W.T).permute(0, 3, 1, 2)
        log_det = x.new_ones(x.shape[0]) * (x.shape[-1] * x.shape[-2]) * self.log_s.sum()
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W_inv = torch.linalg.inv(self.weight())
        x = (z.permute(0, 2, 3, 1) @ W_inv.T).permute(0, 3, 1, 2)
        log_det = -z.new_ones(z.shape[0]) * (z.shape[-1] * z.shape[-2]) * self.log_s.sum()
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    D = y[0].numel()
    u, log_q = dequantizer.sample(y, generator)
    # -log p((y+u)/K) + log q(u|y) + D log K
    return D * math.log(num_levels) + log_q - log_prob((y + u) / num_levels)
# ---- cell: vtrain ----
deq = dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16)
realnvp = build_realnvp(shape=images.shape, hidden=HIDDEN, num_levels=images.num_levels)
vmodel = flows.Flow(realnvp.transform, num_levels=images.num_levels, dequantizer=deq)
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                     loss_fn=lambda yb: variational_bound(vmodel.log_prob, vmodel.dequantizer, yb, images.num_levels))
