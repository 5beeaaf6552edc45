# hw2_flows, student 15: defensive (asserts on shapes and arguments), f-strings in the messages.
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
        assert x.shape[1:] == self.mask.shape, f"expected events of shape {tuple(self.mask.shape)}, got {tuple(x.shape)}"
        s, t = self.scale_and_shift(self.mask * x)
        z = x * torch.exp(s) + t
        log_det = s.reshape(x.shape[0], -1).sum(1)
        assert log_det.shape == (x.shape[0],)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert z.shape[1:] == self.mask.shape, f"expected events of shape {tuple(self.mask.shape)}, got {tuple(z.shape)}"
        s, t = self.scale_and_shift(self.mask * z)
        x = (z - t) * torch.exp(-s)
        log_det = -s.reshape(z.shape[0], -1).sum(1)
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    assert num_levels > 1, f"need at least two levels, got {num_levels}"
    u = torch.rand(y.shape, generator=generator).to(y.device)
    x = (y + u) / num_levels
    assert bool((x >= 0).all()) or bool((y < 0).any()), "levels should be non-negative"
    log_px = log_prob(x)
    assert log_px.shape == (y.shape[0],), f"log_prob must return (B,), got {tuple(log_px.shape)}"
    return -log_px + math.log(num_levels) * y[0].numel()
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    assert num_couplings >= 1 and len(shape) == 3, f"bad arguments {num_couplings}, {shape}"
    c = shape[0]
    modules = [flows.Logit(shape, alpha=0.01)]
    for layer_index in range(num_couplings):
        modules.append(AffineCoupling(flows.checkerboard_mask(shape, layer_index % 2), flows.ConvConditioner(c, hidden)))
    flow = flows.Flow(flows.Compose(*modules), num_levels=num_levels)
    assert len(flow.transform.transforms) == num_couplings + 1
    return flow
# ---- cell: train ----
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)
assert isinstance(model, flows.Flow)
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                    loss_fn=lambda y_batch: dequantization_bound(model.log_prob, y_batch, images.num_levels))
print(f"best validation bound: {min(history.val_loss):.2f} nats/image")
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
        C = self.P.shape[0]
        eye = torch.eye(C, dtype=self.lower.dtype, device=self.lower.device)
        L = torch.tril(self.lower, -1) + eye
        U = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        W = self.P @ L @ U
        assert W.shape == (C, C)
        return W

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dim() == 4, f"expected (B, C, H, W), got {tuple(x.shape)}"
        B, C, H, W_ = x.shape
        z = torch.einsum("ij,bjhw->bihw", self.weight(), x)
        log_det = (H * W_ * self.log_s.sum()).expand(B)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert z.dim() == 4, f"expected (B, C, H, W), got {tuple(z.shape)}"
        B, C, H, W_ = z.shape
        x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight()), z)
        log_det = (-H * W_ * self.log_s.sum()).expand(B)
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    u, log_q = dequantizer.sample(y, generator)
    assert u.shape == y.shape, f"u must have y's shape {tuple(y.shape)}, got {tuple(u.shape)}"
    log_px = log_prob((y + u) / num_levels)
    return -log_px + log_q + math.log(num_levels) * y[0].numel()
# ---- cell: vtrain ----
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))
vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64,
                     loss_fn=lambda y_batch: variational_bound(vmodel.log_prob, vmodel.dequantizer, y_batch,
                                                               images.num_levels))
print(f"best validation bound: {min(vhistory.val_loss):.2f} nats/image")
