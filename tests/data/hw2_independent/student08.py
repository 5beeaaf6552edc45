# hw2_flows, student 08: a while loop, in-place style accumulations, tensordot for the 1x1 convolution.
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
        log_s, t = self.scale_and_shift(self.mask * x)
        z = x.mul(log_s.exp()).add(t)
        log_det = log_s.flatten(start_dim=1).sum(dim=1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_s, t = self.scale_and_shift(self.mask * z)
        x = z.sub(t).mul(log_s.neg().exp())
        log_det = log_s.flatten(start_dim=1).sum(dim=1).neg()
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    eps = torch.rand(y.shape, generator=generator)
    y_cont = (y + eps.to(y.device)) / num_levels
    per_example = y.flatten(1).shape[1]
    bound = log_prob(y_cont) - per_example * math.log(num_levels)
    return -bound
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    transforms = [flows.Logit(shape, alpha=0.01)]
    k = 0
    while k < num_couplings:
        net = flows.ConvConditioner(shape[0], hidden)
        transforms.append(AffineCoupling(flows.checkerboard_mask(shape, k % 2), net))
        k += 1
    flow = flows.Flow(flows.Compose(*transforms), num_levels=num_levels)
    return flow
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
levels = images.num_levels
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                    loss_fn=lambda data_batch: dequantization_bound(model.log_prob, data_batch, levels))
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
        size = self.upper.shape[-1]
        L = self.lower.tril(-1) + torch.eye(size, dtype=self.lower.dtype, device=self.lower.device)
        U = self.upper.triu(1)
        U = U + torch.diag_embed(self.sign_s * self.log_s.exp())
        return self.P.mm(L.mm(U))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tensordot(x, self.weight(), dims=([1], [1])).permute(0, 3, 1, 2)
        log_det = self.log_s.sum().mul(x.shape[2] * x.shape[3]).repeat(x.shape[0])
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensordot(z, torch.linalg.inv(self.weight()), dims=([1], [1])).permute(0, 3, 1, 2)
        log_det = self.log_s.sum().mul(-z.shape[2] * z.shape[3]).repeat(z.shape[0])
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    eps, log_q = dequantizer.sample(y, generator)
    y_cont = (y + eps) / num_levels
    per_example = y.flatten(1).shape[1]
    bound = log_prob(y_cont) - log_q - per_example * math.log(num_levels)
    return -bound
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, levels, hidden=16))
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                     loss_fn=lambda data_batch: variational_bound(vmodel.log_prob, vmodel.dequantizer, data_batch,
                                                                  levels))
