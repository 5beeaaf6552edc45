# hw2_flows, student 11: loops where they are cheap to read (pixels of the 1x1 convolution, sizes), branches on the generator.
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
        log_scale, shift = self.scale_and_shift(self.mask * x)
        z = x * torch.exp(log_scale) + shift
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(x.shape[0]):
            log_det[i] = log_scale[i].sum()
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift = self.scale_and_shift(self.mask * z)
        x = (z - shift) * torch.exp(-log_scale)
        log_det = torch.stack([-log_scale[i].sum() for i in range(z.shape[0])])
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    if generator is None:
        u = torch.rand(y.shape)
    else:
        u = torch.rand(y.shape, generator=generator)
    u = u.to(y.device)
    D = 1
    for n in y.shape[1:]:
        D = D * n
    return -log_prob((y + u) / num_levels) + D * math.log(num_levels)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    layers = []
    layers.append(flows.Logit(shape, alpha=0.01))
    for i in range(num_couplings):
        if i % 2 == 0:
            mask = flows.checkerboard_mask(shape, 0)
        else:
            mask = flows.checkerboard_mask(shape, 1)
        layers.append(AffineCoupling(mask, flows.ConvConditioner(shape[0], hidden)))
    return flows.Flow(flows.Compose(*layers), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)


def my_loss(y):
    return dequantization_bound(model.log_prob, y, images.num_levels)


history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=my_loss)
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
        L = torch.tril(self.lower, -1)
        U = torch.triu(self.upper, 1)
        diagonal = self.sign_s * torch.exp(self.log_s)
        L = L + torch.eye(C, dtype=L.dtype, device=L.device)
        U = U + torch.diag(diagonal)
        return self.P @ L @ U

    def _pixelwise(self, matrix, v):
        out = torch.zeros_like(v)
        for i in range(v.shape[2]):
            for j in range(v.shape[3]):
                out[:, :, i, j] = v[:, :, i, j] @ matrix.T
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._pixelwise(self.weight(), x)
        H, W = x.shape[2], x.shape[3]
        log_det = torch.stack([H * W * self.log_s.sum() for _ in range(x.shape[0])])
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._pixelwise(torch.linalg.inv(self.weight()), z)
        H, W = z.shape[2], z.shape[3]
        log_det = torch.stack([-H * W * self.log_s.sum() for _ in range(z.shape[0])])
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)
    D = 1
    for n in y.shape[1:]:
        D = D * n
    return -log_prob((y + u) / num_levels) + log_q + D * math.log(num_levels)
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))


def my_vloss(y):
    return variational_bound(vmodel.log_prob, vmodel.dequantizer, y, images.num_levels)


vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=my_vloss)
