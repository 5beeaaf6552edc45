# hw2_flows, student 14: names of the paper (log_jac, x_a), the inverse first in the reasoning, keyword arguments everywhere.
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
        x_a = self.mask * x                      # conditioning half
        log_jac, offset = self.scale_and_shift(x_a)
        z = x * log_jac.exp() + offset           # identity where mask == 1 since s = t = 0 there
        log_det = log_jac.flatten(start_dim=1).sum(dim=-1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_a = self.mask * z                      # = x_a
        log_jac, offset = self.scale_and_shift(z_a)
        x = (z - offset) / log_jac.exp()
        log_det = log_jac.flatten(start_dim=1).sum(dim=-1) * -1
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    K, D = num_levels, y[0].numel()
    u = torch.rand(size=y.shape, generator=generator).to(device=y.device)
    log_p = log_prob((y + u) / K)
    return D * math.log(K) - log_p
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    chain = [flows.Logit(shape, alpha=0.01)]
    chain.extend(
        AffineCoupling(mask=flows.checkerboard_mask(shape, parity=k % 2),
                       net=flows.ConvConditioner(shape[0], hidden))
        for k in range(num_couplings)
    )
    return flows.Flow(flows.Compose(*chain), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                    loss_fn=lambda y: dequantization_bound(log_prob=model.log_prob, y=y, num_levels=images.num_levels))
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
        n = self.lower.shape[0]
        ident = torch.eye(n, dtype=self.lower.dtype, device=self.lower.device)
        L = torch.tril(self.lower, diagonal=-1) + ident
        U = torch.triu(self.upper, diagonal=1) + torch.diag(self.sign_s * self.log_s.exp())
        return torch.mm(self.P, torch.mm(L, U))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = self.weight()
        z = torch.nn.functional.conv2d(x, W.view(*W.shape, 1, 1))
        log_det = torch.full_like(x[:, 0, 0, 0], 1.0) * self.log_s.sum() * x.shape[2] * x.shape[3]
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W_inv = torch.linalg.inv(self.weight())
        x = torch.nn.functional.conv2d(z, W_inv.view(*W_inv.shape, 1, 1))
        log_det = torch.full_like(z[:, 0, 0, 0], -1.0) * self.log_s.sum() * z.shape[2] * z.shape[3]
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    K, D = num_levels, y[0].numel()
    u, log_q = dequantizer.sample(y, generator)
    log_p = log_prob((y + u) / K)
    return D * math.log(K) - log_p + log_q
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                     loss_fn=lambda y: variational_bound(log_prob=vmodel.log_prob, dequantizer=vmodel.dequantizer,
                                                         y=y, num_levels=images.num_levels))
