# hw2_flows, student 10: positional arguments, a partial for the loss, the flow's parts named one by one.
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
        z = torch.addcmul(t, x, torch.exp(s))
        log_det = s.sum(tuple(range(1, x.ndim)))
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(z * self.mask)
        x = torch.exp(-s) * (z - t)
        log_det = -s.sum(tuple(range(1, z.ndim)))
        return x, log_det
# ---- cell: bound ----
import functools


def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u = torch.rand(y.shape, generator=generator)
    x = (y + u.to(y.device)) / num_levels
    d = functools.reduce(lambda a, b: a * b, y.shape[1:], 1)
    return d * math.log(num_levels) - log_prob(x)
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    first = flows.Logit(shape, alpha=0.01)
    rest = []
    for j in range(num_couplings):
        rest += [AffineCoupling(flows.checkerboard_mask(shape, j % 2), flows.ConvConditioner(shape[0], hidden))]
    return flows.Flow(flows.Compose(first, *rest), num_levels=num_levels)
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
loss = functools.partial(dequantization_bound, model.log_prob, num_levels=images.num_levels)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=loss)
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
        opts = dict(dtype=self.lower.dtype, device=self.lower.device)
        L = torch.tril(self.lower, -1) + torch.eye(self.lower.shape[0], **opts)
        U = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.P @ L @ U

    def _per_pixel(self, matrix, v):
        # one matrix product per pixel, as a 1x1 convolution
        return torch.einsum("ij,njyx->niyx", matrix, v)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._per_pixel(self.weight(), x)
        log_det = (x.shape[2] * x.shape[3] * self.log_s.sum()).repeat(x.shape[0])
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._per_pixel(torch.linalg.inv(self.weight()), z)
        log_det = (-z.shape[2] * z.shape[3] * self.log_s.sum()).repeat(z.shape[0])
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)
    d = functools.reduce(lambda a, b: a * b, y.shape[1:], 1)
    return d * math.log(num_levels) - log_prob((y + u) / num_levels) + log_q
# ---- cell: vtrain ----
transform = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform
dequantizer = dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16)
vmodel = flows.Flow(transform, num_levels=images.num_levels, dequantizer=dequantizer)
vloss = functools.partial(variational_bound, vmodel.log_prob, vmodel.dequantizer, num_levels=images.num_levels)
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=vloss)
