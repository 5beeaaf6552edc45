# hw2_flows, student 16: everything through small module-level functions, reused across the cells.
# ---- cell: coupling ----
def per_example_sum(v):
    return v.flatten(1).sum(1)


def affine(v, log_scale, shift, invert=False):
    """v * exp(s) + t, or its inverse (v - t) * exp(-s)."""
    if invert:
        return (v - shift) * torch.exp(-log_scale)
    return v * torch.exp(log_scale) + shift


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
        s, t = self.scale_and_shift(self.mask * x)
        z, log_det = affine(x, s, t), per_example_sum(s)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.scale_and_shift(self.mask * z)
        x, log_det = affine(z, s, t, invert=True), -per_example_sum(s)
        return x, log_det
# ---- cell: bound ----
def event_size(y):
    """Number of entries of one example of a batch y."""
    return y[0].numel()


def scaled_input(y, u, num_levels):
    return (y + u) / num_levels


def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u = torch.rand(y.shape, generator=generator).to(y.device)
    return -log_prob(scaled_input(y, u, num_levels)) + event_size(y) * math.log(num_levels)
# ---- cell: build ----
def coupling_stack(shape, hidden, count):
    return [AffineCoupling(flows.checkerboard_mask(shape, k % 2), flows.ConvConditioner(shape[0], hidden))
            for k in range(count)]


def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    return flows.Flow(flows.Compose(flows.Logit(shape, alpha=0.01), *coupling_stack(shape, hidden, num_couplings)),
                      num_levels=num_levels)
# ---- cell: train ----
def fit_flow(flow, loss):
    return train.fit(flow, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=loss)


model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
history = fit_flow(model, lambda y: dequantization_bound(model.log_prob, y, images.num_levels))
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
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        return self.P @ (torch.tril(self.lower, -1) + eye) @ (torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_mix(self.weight(), x), per_example_sum(torch.ones_like(x[:, 0])) * self.log_s.sum()

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_mix(torch.linalg.inv(self.weight()), z), -per_example_sum(torch.ones_like(z[:, 0])) * self.log_s.sum()


def channel_mix(matrix, v):
    """The same C x C matrix applied to the channels at every pixel of v, (B, C, H, W)."""
    return torch.einsum("ij,bjhw->bihw", matrix, v)
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)
    return -log_prob(scaled_input(y, u, num_levels)) + log_q + event_size(y) * math.log(num_levels)
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
vhistory = fit_flow(vmodel, lambda y: variational_bound(vmodel.log_prob, vmodel.dequantizer, y, images.num_levels))
