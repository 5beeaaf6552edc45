# hw2_flows, student 05: verbose, a comment on every step, explicit intermediate names.
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
        # the conditioner only sees the kept half of the input
        kept = self.mask * x
        log_scale, shift = self.scale_and_shift(kept)
        # transformed half: x * exp(s) + t; on the kept half s = t = 0 so x passes through
        scale = torch.exp(log_scale)
        z = x * scale + shift
        # triangular jacobian: log|det| is the sum of the log-scales of each example
        batch_size = x.shape[0]
        log_det = log_scale.reshape(batch_size, -1).sum(dim=1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # m * z = m * x, so the same scale and shift can be recomputed from z
        kept = self.mask * z
        log_scale, shift = self.scale_and_shift(kept)
        # undo the affine map: subtract the shift, then divide by the scale
        x = (z - shift) * torch.exp(-log_scale)
        batch_size = z.shape[0]
        log_det = -log_scale.reshape(batch_size, -1).sum(dim=1)
        return x, log_det
# ---- cell: bound ----
def dequantization_bound(log_prob, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    # uniform noise in [0, 1), one independent draw per pixel, from the given generator
    noise = torch.rand(y.shape, generator=generator)
    noise = noise.to(y.device)
    # dequantized input in [0, 1)
    x = (y + noise) / num_levels
    # number of entries in one example
    num_entries = 1
    for size in y.shape[1:]:
        num_entries *= size
    # negative bound: -log p(x) + D log K
    log_px = log_prob(x)
    correction = num_entries * math.log(num_levels)
    return correction - log_px
# ---- cell: build ----
def build_realnvp(num_couplings: int = 8, hidden: int = 64, shape: tuple[int, int, int] = (1, 8, 8),
                  num_levels: int = 17) -> flows.Flow:
    # the logit layer maps [0, 1) to the real line
    logit_layer = flows.Logit(shape, alpha=0.01)
    # couplings with alternating checkerboard parities
    coupling_layers = []
    for index in range(num_couplings):
        parity = index % 2
        mask = flows.checkerboard_mask(shape, parity)
        conditioner = flows.ConvConditioner(shape[0], hidden)
        coupling_layers.append(AffineCoupling(mask, conditioner))
    # compose the layers in order and wrap them in a flow
    composed = flows.Compose(logit_layer, *coupling_layers)
    return flows.Flow(composed, num_levels=num_levels)
# ---- cell: train ----
# build the model for the chosen data set
model = build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels)


# the training loss: my uniform dequantization bound, in nats per image
def uniform_bound_loss(batch):
    return dequantization_bound(model.log_prob, batch, images.num_levels)


# train with the settings given in the instructions
history = train.fit(model, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=uniform_bound_loss)
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
        # parameters and identity in the same dtype and device
        num_channels = self.lower.shape[0]
        identity = torch.eye(num_channels, dtype=self.lower.dtype, device=self.lower.device)
        # unit lower triangular factor: strictly lower part of `lower` plus ones on the diagonal
        lower_factor = torch.tril(self.lower, -1) + identity
        # upper factor: strictly upper part of `upper` plus the signed scales on the diagonal
        diagonal = self.sign_s * torch.exp(self.log_s)
        upper_factor = torch.triu(self.upper, 1) + torch.diag(diagonal)
        # W = P L U
        return self.P @ (lower_factor @ upper_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # apply W to the channel vector at every pixel
        matrix = self.weight()
        z = torch.einsum("ij,bjkl->bikl", matrix, x)
        # H W copies of W on the diagonal of the jacobian
        height, width = x.shape[2], x.shape[3]
        log_det_one = height * width * torch.sum(self.log_s)
        log_det = log_det_one * x.new_ones(x.shape[0])
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # apply the inverse matrix at every pixel
        matrix_inverse = torch.linalg.inv(self.weight())
        x = torch.einsum("ij,bjkl->bikl", matrix_inverse, z)
        # opposite log-det
        height, width = z.shape[2], z.shape[3]
        log_det_one = height * width * torch.sum(self.log_s)
        log_det = -log_det_one * z.new_ones(z.shape[0])
        return x, log_det
# ---- cell: vbound ----
def variational_bound(log_prob, dequantizer, y: torch.Tensor, num_levels: int, generator=None) -> torch.Tensor:
    # one draw of the learned noise and its log-density (both kept in the graph)
    noise, log_q = dequantizer.sample(y, generator)
    # dequantized input
    x = (y + noise) / num_levels
    # number of entries per example
    num_entries = 1
    for size in y.shape[1:]:
        num_entries *= size
    # -log p(x) + log q(u | y) + D log K
    log_px = log_prob(x)
    correction = num_entries * math.log(num_levels)
    return correction + log_q - log_px
# ---- cell: vtrain ----
# the same RealNVP, now with a learned dequantizer trained jointly
vmodel = flows.Flow(build_realnvp(hidden=HIDDEN, shape=images.shape, num_levels=images.num_levels).transform,
                    num_levels=images.num_levels,
                    dequantizer=dequantization.VariationalDequantizer(images.shape, images.num_levels, hidden=16))


# the training loss: my variational bound
def variational_bound_loss(batch):
    return variational_bound(vmodel.log_prob, vmodel.dequantizer, batch, images.num_levels)


vhistory = train.fit(vmodel, train_y, val_y, epochs=EPOCHS, lr=1e-3, batch_size=64, loss_fn=variational_bound_loss)
