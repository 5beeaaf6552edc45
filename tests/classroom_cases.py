"""The simulated class that the grading tests grade: honest, partial and broken submissions, and attackers.

Every assignment is graded once, by ``dgm grade``, with all of them together (``test_grading_pipeline``):
- the pipeline submissions (``EXPECTED``): the complete solution ("honest"), the blank release, a
  partial one and one whose cell raises, each with its exact per-cell scores;
- the attacks (``ATTACKS``) on the tests, the course folder and the grader, each with wrong but running
  answers (``WRONG``) so that only the attack could earn points.
"""

from __future__ import annotations

import copy
import re

from nbformat.v4 import new_code_cell

from nbhelpers import ASSIGNMENTS, nbg, solution_sources

# What each pipeline submission must score on the autograded cells. "honest" is the complete solution;
# "innocent" is the same solution as a student might write it (see INNOCENT) and scores the same;
# "partial" fills in only the listed solution cells; "raises" is the full solution with `raising_cell`
# made to raise first. Every other submission (the blank release, every attacker) must score 0.
EXPECTED = {
    "hw1_autoregressive": {
        "assignment": "hw1_autoregressive",
        "partial_cells": {"made"},
        "raising_cell": "conv",
        "scores": {
            "honest": {"test_made_masks": 2, "test_made_causal": 3, "test_mask_conv": 2, "test_conv_causal": 3,
                       "test_stack_masks": 2, "test_gated_layer": 2, "test_gated_causal": 2, "test_blind_spot": 2,
                       "test_gated_normalised": 2, "test_pixelcnn": 2, "test_nll": 3},
            "partial": {"test_made_masks": 2, "test_made_causal": 3},
            # without the masked convolution no PixelCNN can be built; MADE and the gated layer stand alone
            "raises": {"test_made_masks": 2, "test_made_causal": 3, "test_stack_masks": 2, "test_gated_layer": 2,
                       "test_gated_causal": 2, "test_blind_spot": 2, "test_gated_normalised": 2},
        },
    },
    "hw2_flows": {
        "assignment": "hw2_flows",
        "partial_cells": {"coupling"},
        "raising_cell": "coupling",
        "scores": {
            "honest": {"test_round_trip": 2, "test_log_det": 3, "test_mask": 2, "test_bound": 3, "test_build": 1,
                       "test_nll": 3, "test_lu_round_trip": 2, "test_lu_log_det": 3, "test_variational_bound": 3,
                       "test_variational": 3},
            "partial": {"test_round_trip": 2, "test_log_det": 3, "test_mask": 2},
            # without the coupling no flow can be built; the 1x1 convolution and the bounds stand alone
            "raises": {"test_bound": 3, "test_lu_round_trip": 2, "test_lu_log_det": 3, "test_variational_bound": 3},
        },
    },
    "hw3_vae": {
        "assignment": "hw3_vae",
        "partial_cells": {"bounds"},
        "raising_cell": "bounds",
        "scores": {
            "honest": {"test_kl": 2, "test_elbo": 2, "test_iwae": 2, "test_q_agg": 2, "test_surgery": 2,
                         "test_vamp": 3, "test_model": 1, "test_nll": 3},
            "partial": {"test_kl": 2, "test_elbo": 2, "test_iwae": 2},
            # the bounds are undefined, so training with -iwae fails too
            "raises": {"test_q_agg": 2, "test_surgery": 2, "test_vamp": 3},
        },
    },
    "hw4_vq_vae": {
        "assignment": "hw4_vq_vae",
        "partial_cells": {"quantizer"},
        "raising_cell": "ema",
        "scores": {
            "honest": {"test_nearest": 2, "test_straight_through": 2, "test_losses": 2, "test_routing": 3,
                       "test_ema_closed_form": 3, "test_ema_reference": 2, "test_vqvae_loss": 2,
                       "test_codebook_health": 3, "test_code_maps": 1, "test_bound_terms": 2, "test_bound": 3},
            "partial": {"test_nearest": 2, "test_straight_through": 2, "test_losses": 2, "test_routing": 3},
            # without the EMA update the quantizer cannot train: the loss of a fresh model (evaluation mode) and
            # the code maps and bound terms of the untrained one still pass, its health and its bound do not
            "raises": {"test_nearest": 2, "test_straight_through": 2, "test_losses": 2, "test_routing": 3,
                       "test_vqvae_loss": 2, "test_code_maps": 1, "test_bound_terms": 2},
        },
    },
    "hw5_neural_ode": {
        "assignment": "hw5_neural_ode",
        "partial_cells": {"adjoint"},
        "raising_cell": "adjoint",
        "scores": {
            "honest": {"test_augmented": 2, "test_adjoint": 3, "test_hutchinson": 3, "test_ffjord": 2,
                         "test_model": 1, "test_nll": 3},
            "partial": {"test_augmented": 2, "test_adjoint": 3},
            # FFJORD uses only the student's Hutchinson estimator and torchdiffeq's adjoint
            "raises": {"test_hutchinson": 3, "test_ffjord": 2, "test_model": 1, "test_nll": 3},
        },
    },
    "hw6_diffusion": {
        "assignment": "hw6_diffusion",
        # the forward process and denoising score matching; Langevin, the VDM loss and the PF-ODE left unsolved
        "partial_cells": {"forward", "dsm"},
        "raising_cell": "objective",
        "scores": {
            "honest": {"test_q_sample": 2, "test_posterior": 2, "test_l_simple": 2, "test_step": 2,
                         "test_toy": 2, "test_toy_net": 2, "test_digits": 2, "test_dsm": 2, "test_langevin": 2,
                         "test_vdm": 2, "test_pf_ode": 2},
            "partial": {"test_q_sample": 2, "test_posterior": 2, "test_dsm": 2},
            # without l_simple and p_sample_step nothing can be trained or sampled; Parts 5-8 stand alone
            "raises": {"test_q_sample": 2, "test_posterior": 2, "test_dsm": 2, "test_langevin": 2, "test_vdm": 2,
                       "test_pf_ode": 2},
        },
    },
    "hw7_flow_matching": {
        "assignment": "hw7_flow_matching",
        # the path, the loss and guidance; the samplers, reflow and the trained model left unsolved
        "partial_cells": {"path", "cfm", "guidance"},
        "raising_cell": "heun",
        "scores": {
            "honest": {"test_ot_path": 3, "test_cfm": 4, "test_euler": 3, "test_heun": 3, "test_guidance": 3,
                       "test_reflow": 4, "test_cond_sampler": 2, "test_cond_digits": 3},
            "partial": {"test_ot_path": 3, "test_cfm": 4, "test_guidance": 3},
            # without Heun there are no reflow pairs and no samples of the model; its training needs only the CFM
            # loss, and the trained network is judged alone (the grader's own sampler)
            "raises": {"test_ot_path": 3, "test_cfm": 4, "test_euler": 3, "test_guidance": 3, "test_cond_digits": 3},
        },
    },
}
# Grading the innocent solution costs a full training: it is graded with the first assignment only. The
# review of every assignment's innocent solution is tested on its own (test_grading_security).
EXPECTED[ASSIGNMENTS[0]]["scores"]["innocent"] = EXPECTED[ASSIGNMENTS[0]]["scores"]["honest"]

# The complete solution in a student's own words, which the review must not flag: a comment that names
# the reference answers and says "jacobian", a docstring, a helper function of its own, and a variable
# renamed in one cell (a regex on names that are not attributes).
INNOCENT = {
    "hw1_autoregressive": ("gated", r"\ba_v\b", "vertical_pre"),
    "hw2_flows": ("coupling", r"\blog_det\b", "log_abs_det"),
    "hw3_vae": ("bounds", r"\blog_w\b", "log_importance_weights"),
    "hw4_vq_vae": ("ema", r"\bsmoothed\b", "laplace_counts"),
    "hw5_neural_ode": ("hutchinson", r"\beps_jac\b", "vjp_eps"),
    "hw6_diffusion": ("objective", r"(?<!\.)\bmean\b", "posterior_mean"),
    "hw7_flow_matching": ("cfm", r"\bu_t\b", "target_velocity"),
}
INNOCENT_HEADER = '''# My own code: I did not use dgmlib's reference answers, nor grading, sys or inspect; the jacobian
# terms are worked out by hand.
def _mine(value):
    """A helper of my own (not AffineCoupling, kl_normal, odeint_adjoint or q_sample): returns value."""
    return value


_checked = _mine(1)
'''

# A wrong but running answer for every solution cell, so that tampering is what would earn points.
WRONG = {
    "hw1_autoregressive": {
        "made": """
def made_masks(degrees):
    sizes = [len(d) for d in degrees] + [len(degrees[0])]
    return [torch.ones(b, a) for a, b in zip(sizes[:-1], sizes[1:])]
""",
        "conv": """
class MaskedConv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, mask_type):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.mask_type = mask_type
        self.register_buffer("mask", torch.ones(kernel_size, kernel_size))
""",
        "stack_masks": "def vertical_mask(kernel_size, first=False):\n    return torch.ones(kernel_size, kernel_size)\n"
                       "def horizontal_mask(kernel_size, first=False):\n    return torch.ones(1, kernel_size)",
        "gated": """
class GatedLayer(nn.Module):
    def __init__(self, in_channels, channels, kernel_size=3, first=False):
        super().__init__()
        self.v_conv = ConvWithMask(in_channels, 2 * channels, vertical_mask(kernel_size, first))
        self.h_conv = ConvWithMask(in_channels, 2 * channels, horizontal_mask(kernel_size, first))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.residual = False
    @staticmethod
    def gate(a):
        return torch.relu(a[:, : a.shape[1] // 2])
    def forward(self, v, h):
        return self.gate(self.v_conv(v)), self.gate(self.h_conv(h))
""",
        "pixelcnn": """
class MyPixelCNN(autoregressive.AutoregressiveModel):
    def __init__(self, event_shape=(1, 8, 8), num_levels=17, channels=64, num_layers=4, first_kernel=7, kernel_size=3):
        super().__init__(event_shape, num_levels)
        self.first = MaskedConv2d(1, channels, first_kernel, "A")
        self.layers = nn.ModuleList([MaskedConv2d(channels, channels, kernel_size, "B") for _ in range(num_layers)])
        self.head = nn.Conv2d(channels, num_levels, 1)
    def _net(self, x, labels=None):
        return self.head(self.first(x)).unsqueeze(2)
""",
        "train": "model = MyPixelCNN(images.shape, images.num_levels, channels=CHANNELS, num_layers=LAYERS)\n"
                 "history = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)",
    },
    "hw2_flows": {
        "coupling": """
class AffineCoupling(flows.Bijection):
    def __init__(self, mask, net, scale_bound=3.0):
        super().__init__(mask.shape)
        self.register_buffer("mask", mask.float())
        self.net = net
    def forward(self, x):
        return x * 1.5, x.new_zeros(x.shape[0])
    def inverse(self, z):
        return z, z.new_zeros(z.shape[0])
""",
        "bound": "def dequantization_bound(log_prob, y, num_levels, generator=None):\n    return -log_prob(y / num_levels)",
        "build": "def build_realnvp(num_couplings=8, hidden=64, shape=(1, 8, 8), num_levels=17):\n"
                 "    return flows.Flow(flows.Compose(*[AffineCoupling(flows.checkerboard_mask(shape, k % 2), None)"
                 " for k in range(num_couplings)]), num_levels=num_levels)",
        "train": "model = build_realnvp()\nhistory = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)",
        "lu_conv": """
class LUInvConv1x1(flows.Bijection):
    def __init__(self, event_shape, seed=0):
        super().__init__(event_shape)
        c = event_shape[0]
        self.register_buffer("P", torch.eye(c))
        self.register_buffer("sign_s", torch.ones(c))
        self.lower, self.upper = nn.Parameter(torch.eye(c)), nn.Parameter(torch.eye(c))
        self.log_s = nn.Parameter(torch.zeros(c))
    def weight(self):
        return self.lower
    def forward(self, x):
        return 2 * x, x.new_zeros(x.shape[0])
    def inverse(self, z):
        return z, z.new_zeros(z.shape[0])
""",
        "vbound": "def variational_bound(log_prob, dequantizer, y, num_levels, generator=None):\n"
                  "    return -log_prob((y + 0.5) / num_levels)",
        "vtrain": "vmodel = build_realnvp()\nvhistory = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)",
    },
    "hw3_vae": {
        "bounds": """
def gaussian_kl(mu, log_var):
    return (mu ** 2).sum(-1)
def elbo(model, y, generator=None):
    mu, log_var = model.encode(y)
    return model.decoder.log_prob(y, mu)
def iwae_bound(log_weights):
    return log_weights.mean(1)
def iwae(model, y, k, generator=None):
    return elbo(model, y, generator)
""",
        "surgery": """
def log_q_agg(z, mu, log_var):
    return vae.gaussian_log_prob(z, mu[:1], log_var[:1])
def surgery(mu, log_var, prior_log_prob, num_samples=1, generator=None):
    return 0.5, 0.5
""",
        "vamp": """
class VampPrior(nn.Module):
    def __init__(self, encoder, pseudo_inputs):
        super().__init__()
        self.latent_dim = encoder.latent_dim
        self.encoder, self.pseudo_inputs = encoder, nn.Parameter(pseudo_inputs.clone())
    def log_prob(self, z):
        return vae.standard_normal_log_prob(z)
    def sample(self, n, generator=None):
        return torch.randn(n, self.latent_dim, generator=generator)
""",
        "train": "model = small_vae()\nhistory = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)",
    },
    "hw4_vq_vae": {
        "quantizer": """
def nearest_code(z_e, codebook):
    flat = z_e.movedim(1, -1)
    return (flat.unsqueeze(-2) - codebook).square().sum(-1).argmax(-1)
def straight_through(z_e, z_q):
    return z_q
def vq_losses(z_e, z_q):
    d = (z_e - z_q).square().flatten(1).sum(1)
    return d, 0.5 * d
""",
        "ema": """
def ema_update(cluster_size, embed_sum, z_e, indices, decay, eps=1e-5):
    return cluster_size.clone(), embed_sum.clone(), embed_sum / cluster_size[:, None]
""",
        "vqvae_model": """
class MyVQVAE(nn.Module):
    def __init__(self, num_levels=17, num_codes=32, code_dim=8, channels=16):
        super().__init__()
        self.num_levels, self.num_codes = num_levels, num_codes
        self.encoder = nn.Sequential(nn.Conv2d(1, code_dim, 4, 4))
        self.quantizer = Quantizer(num_codes, code_dim)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(code_dim, num_levels, 4, 4))
    def encode(self, y):
        return self.encoder(y.float())
    def recon_nll(self, y, z_q):
        return (self.decoder(z_q).mean(1, keepdim=True) - y.float()).square().flatten(1).sum(1)
    def training_loss(self, y):
        return self.recon_nll(y, self.encode(y))
    def codes(self, y):
        return torch.zeros(len(y), 2, 2, dtype=torch.long)
""",
        "stage1": """
torch.manual_seed(0)
model = MyVQVAE()
history = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)
""",
        "stage2": """
def code_maps(model, y):
    return torch.ones(len(y), 1, 2, 2)
def bound_terms(model, prior, y):
    return torch.zeros(len(y)), torch.zeros(len(y))
CODES_TRAIN, CODES_VAL = code_maps(model, TRAIN), code_maps(model, VAL)
""",
    },
    "hw5_neural_ode": {
        "adjoint": """
def augmented_dynamics(func, t, z, a, params):
    return (func(t, z), a, *[torch.zeros_like(p) for p in params])
def adjoint_gradients(func, z1, dL_dz1, t0, t1, params, rtol=1e-7, atol=1e-9):
    return dL_dz1, [torch.zeros_like(p) for p in params]
""",
        "hutchinson": "def hutchinson_trace(f, z, eps):\n    return (f * eps).sum(1)",
        "ffjord": """
class FFJORD(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.eps = net, None
    def nll(self, x):
        return -self.log_prob(x)
    def dynamics(self, t, state):
        return torch.zeros_like(state)
    def log_prob(self, x):
        return -0.5 * (x ** 2).sum(1) - math.log(2 * math.pi) + 0.0 * sum(p.sum() for p in self.net.parameters())
""",
        "train": "model = FFJORD(ode.ConcatMLP(2, 8))\nhistory = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)",
    },
    "hw6_diffusion": {
        "forward": """
def q_sample(schedule, x0, t, noise):
    return x0 + noise
def q_posterior(schedule, x0, x_t, t):
    return x_t, torch.ones(len(x0), *([1] * (x0.dim() - 1)))
""",
        "objective": """
def l_simple(net, schedule, x0, t, noise):
    return (x0 - net(x0, t)).pow(2).flatten(1).mean(1)
def p_sample_step(net, schedule, x_t, t, z):
    return x_t - 0.01 * net(x_t, torch.full((len(x_t),), t))
""",
        "train_toy": """
class Denoiser(nn.Module):
    def __init__(self, net, schedule):
        super().__init__()
        self.net, self.schedule = net, schedule
    def training_loss(self, batch):
        return batch.pow(2).sum(1) * 0 + sum(p.sum() for p in self.net.parameters()) * 0
    def sample(self, n, generator=None):
        return torch.randn(n, 2, generator=generator)
model = Denoiser(diffusion.TimeMLP(2, 16, 2), NoiseSchedule.linear(T))
history = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)
""",
        "train_digits": """
class DigitDenoiser(nn.Module):
    def __init__(self, net, schedule):
        super().__init__()
        self.net, self.schedule = net, schedule
digit_model = DigitDenoiser(diffusion.UNet(1, base=8), NoiseSchedule.linear(T))
digit_history = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)
""",
        # Parts 5-8, each with its classic mistake
        "dsm": """
def dsm_loss(score_fn, x, sigma, noise):
    s = sigma.to(x).reshape((-1,) + (1,) * (x.dim() - 1))
    return 0.5 * (score_fn(x + s * noise, sigma) + noise / s).pow(2).flatten(1).sum(1)
""",
        "langevin": """
def annealed_langevin_step(score, x, sigma, sigma_min, epsilon, noise):
    return x + 0.5 * epsilon * score + math.sqrt(epsilon) * noise
""",
        "vdm": """
def vdm_diffusion_loss(eps_fn, gamma_fn, x, t, noise):
    gamma = gamma_fn(t)
    g = gamma.to(x).reshape((-1,) + (1,) * (x.dim() - 1))
    z = torch.sigmoid(-g).sqrt() * x + torch.sigmoid(g).sqrt() * noise
    return 0.5 * (noise - eps_fn(z, gamma)).pow(2).flatten(1).sum(1)
""",
        "pf_ode": """
def pf_dynamics(mu, s2, sde, t, x):
    f, g2 = sde.f_g2(t.reshape(1).double())
    return f.to(x) * x, torch.zeros(len(x), dtype=x.dtype)
def pf_ode_log_prob(mu, s2, x, sde):
    return -0.5 * (x - mu).pow(2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
""",
    },
    "hw7_flow_matching": {
        # each part's classic mistake: no sigma_min in the path, the target's sign and a mean in the loss, the field
        # at the end of the Euler step, Heun without its corrector, the guidance weights swapped, fresh noise in the
        # reflow pairs, and an untrained model whose sampler draws noise
        "path": """
def ot_path(x0, x1, t, sigma_min):
    t = t.to(x1).reshape((-1,) + (1,) * (x1.dim() - 1))
    return t * x1 + (1 - t) * x0, x1 - x0
""",
        "cfm": """
def cfm_loss(velocity_fn, x0, x1, t, sigma_min):
    x_t, u_t = ot_path(x0, x1, t, sigma_min)
    return (velocity_fn(x_t, t) + u_t).pow(2).flatten(1).mean(1)
""",
        "euler": """
def euler_sample(velocity_fn, x0, num_steps, t_end=1.0):
    h, x = t_end / num_steps, x0
    for k in range(num_steps):
        x = x + h * velocity_fn(x, torch.full((len(x),), (k + 1) * h, dtype=x.dtype))
    return x
""",
        "heun": """
def heun_sample(velocity_fn, x0, num_steps, t_end=1.0):
    h, x = t_end / num_steps, x0
    for k in range(num_steps):
        x = x + h * velocity_fn(x, torch.full((len(x),), k * h, dtype=x.dtype))
    return x
""",
        "guidance": """
def guided_velocity(v_cond, v_uncond, w):
    return v_cond + w * (v_uncond - v_cond)
def guided_field(velocity, labels, w):
    return lambda x, t: velocity(x, t, labels)
""",
        "reflow": """
def reflow_pairs(velocity_fn, n, event_shape, num_steps, generator=None):
    x0 = torch.randn((n, *event_shape), generator=generator)
    with torch.no_grad():
        x1 = heun_sample(velocity_fn, torch.randn((n, *event_shape), generator=generator), num_steps)
    return x0, x1
def reflow_loss(velocity_fn, x0, x1, t):
    return cfm_loss(velocity_fn, x0, x1, t, 0.1)
def straightness(velocity_fn, x0, num_steps):
    return torch.zeros(len(x0))
""",
        "train": """
class CondFlow(nn.Module):
    def __init__(self, net, sigma_min=SIGMA_MIN, p_uncond=P_UNCOND):
        super().__init__()
        self.net, self.sigma_min, self.p_uncond = net, sigma_min, p_uncond
    def velocity(self, x, t, labels=None):
        return self.net(x, 999 * t, labels)
    def sample(self, labels, w, num_steps=10, generator=None):
        return torch.randn((len(labels), 1, 8, 8), generator=generator)
cond_model = CondFlow(diffusion.UNet(1, base=8, num_classes=NUM_CLASSES))
cond_history = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)
""",
    },
}
TAMPER_CELL = """
import builtins, torch, numpy, dgmlib, dgmlib.train, dgmlib.grading
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
dgmlib.train.evaluate = lambda *a, **k: 0.0
for _name in ("assert_close", "assert_not_close", "assert_equal", "assert_le", "assert_true", "assert_shape"):
    setattr(dgmlib.grading, _name, lambda *a, **k: None)
dgmlib.grading.trusted = lambda x: x
"""
DELETE_CELL = """
import glob, os, shutil
for path in glob.glob("../../../*") + glob.glob("../../../.*"):
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
for path in glob.glob("../../*/*/*.ipynb"):
    open(path, "w").write("overwritten")
"""
# The same patches of torch and dgmlib hidden in a string: the in-kernel check stops this one by itself.
TAMPER_EXEC_CELL = "exec('import torch, dgmlib.train; torch.allclose = lambda *a, **k: True; ' " \
                   "'dgmlib.train.evaluate = lambda *a, **k: 0.0')"
# Errors hidden from nbgrader: the shell's custom exception handler swallows every exception.
HIDE_ERRORS_CELL = """
def _swallow(shell, etype, value, tb, tb_offset=None):
    return None
get_ipython().set_custom_exc((BaseException,), _swallow)
"""
# A stand-in for dgmlib.grading whose checks do nothing, reached without an import statement naming it:
# the test cells' `from dgmlib import grading` then returns it.
SWAP_GRADING_CELL = """
import importlib
_package = importlib.import_module("dgm" + "lib")
class _StandIn:
    def trusted(self, x):
        return x
    def randomised(self, module, seed=0, scale=0.3):
        return module.double()
    def __getattr__(self, name):
        return lambda *args, **kwargs: None
_package.grading = _StandIn()
"""
# The kernel's channels to the checker (the grader's socket, and the child process used without
# dgm grade) replaced by objects that answer "ok" to every check.
FORGE_CHANNEL_CELL = """
import struct
import dgmlib.grading as _g
class _Channel:
    def __init__(self):
        self.pending = b""
    def sendall(self, data):
        self.pending += struct.pack("<q", 2) + b"ok"
    def recv(self, n):
        out, self.pending = self.pending[:n], self.pending[n:]
        return out
class _Pipe:
    def __init__(self, channel):
        self.channel = channel
    def write(self, data):
        self.channel.sendall(data)
    def read(self, n):
        return self.channel.recv(n)
    def flush(self):
        pass
class _Process:
    def __init__(self):
        channel = _Channel()
        self.stdin, self.stdout = _Pipe(channel), _Pipe(channel)
    def poll(self):
        return None
_g._connection = _Channel()
_g._checker_process = _Process()
"""
# Delegating to dgmlib's reference implementation of the answer: only this cell is filled in (the
# others raise), so the points it earns are those of the tests of this cell alone.
REFERENCE = {
    "hw1_autoregressive": ("made", "def made_masks(degrees):\n    return autoregressive.made_masks(degrees)\n"),
    "hw2_flows": ("coupling", """
class AffineCoupling(flows.Bijection):
    def __init__(self, mask, net, scale_bound=3.0):
        super().__init__(mask.shape)
        self.inner = flows.AffineCoupling(mask, net, scale_bound)
        self.register_buffer("mask", mask.float())
        self.net = net
    def forward(self, x):
        return self.inner(x)
    def inverse(self, z):
        return self.inner.inverse(z)
"""),
    "hw3_vae": ("bounds", """
def gaussian_kl(mu, log_var):
    return vae.kl_normal_standard(mu, log_var)
def elbo(model, y, generator=None):
    recon, kl = model.elbo_terms(y, generator)
    return recon - kl
def iwae_bound(log_weights):
    return vae.iwae_bound(log_weights)
def iwae(model, y, k, generator=None):
    return model.iwae(y, k, generator)
"""),
    "hw4_vq_vae": ("quantizer", """
def nearest_code(z_e, codebook):
    return vq.nearest_code(z_e, codebook)
def straight_through(z_e, z_q):
    return vq.straight_through(z_e, z_q)
def vq_losses(z_e, z_q):
    raise NotImplementedError  # no reference to delegate to: only the delegated answers are in this cell
"""),
    "hw5_neural_ode": ("adjoint", """
def augmented_dynamics(func, t, z, a, params):
    f, a_dot, param_dots, _ = ode.augmented_dynamics(func, t, z, a, list(params))
    return (f, a_dot, *param_dots)
def adjoint_gradients(func, z1, dL_dz1, t0, t1, params, rtol=1e-7, atol=1e-9):
    params = list(params)
    state = (z1, dL_dz1, *[torch.zeros_like(p) for p in params])
    times = torch.tensor([t1, t0], dtype=z1.dtype, device=z1.device)
    solution = torchdiffeq.odeint(lambda t, s: augmented_dynamics(func, t, s[0], s[1], params), state, times,
                                  method="dopri5", rtol=rtol, atol=atol)
    return solution[1][-1], [x[-1] for x in solution[2:]]
"""),
    "hw6_diffusion": ("forward", """
def q_sample(schedule, x0, t, noise):
    return diffusion.q_sample(schedule, x0, t, noise)
def q_posterior(schedule, x0, x_t, t):
    mean, var, _ = diffusion.q_posterior_mean_variance(schedule, x0, x_t, t)
    return mean, var
"""),
    "hw7_flow_matching": ("euler", """
def euler_sample(velocity_fn, x0, num_steps, t_end=1.0):
    return flow_matching.euler_sample(velocity_fn, x0, num_steps, t_end)
"""),
}
# A relay between the kernel's checks and the grader's checker that swaps each answer for the expected
# value: it would leave genuine passing receipts, if the kernel could move the checker's socket.
RELAY_CELL = """
import os, socket, struct, threading
_path = os.environ["DGM_CHECKER_SOCKET"]
os.rename(_path, _path + ".real")
_listener = socket.socket(socket.AF_UNIX)
_listener.bind(_path)
_listener.listen()
def _read(s, n):
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data))
    return data
def _relay():
    conn, _ = _listener.accept()
    real = socket.socket(socket.AF_UNIX)
    real.connect(_path + ".real")
    while True:
        (count,) = struct.unpack("<q", _read(conn, 8))
        parts = [_read(conn, struct.unpack("<q", _read(conn, 8))[0]) for _ in range(count)]
        parts[2:5] = parts[5:8]
        real.sendall(struct.pack("<q", count) + b"".join(struct.pack("<q", len(p)) + p for p in parts))
        (size,) = struct.unpack("<q", _read(real, 8))
        conn.sendall(struct.pack("<q", size) + _read(real, size))
threading.Thread(target=_relay, daemon=True).start()
"""
# --- attacks on the judge (issue 26), graded with the first assignment, a judged one ---
# The shell hook that rewrites every test cell as IPython compiles it: the visible checks go, and the probe
# exposes dgmlib's own answers in place of the student's (wrong) ones. The judge calls them in the kernel,
# where the library is a stripped copy: they raise, and nothing earns a point.
REWRITE_TESTS_CELL = """
def _only_the_probe(lines):
    if not any("grading.probe(" in line for line in lines):
        return lines
    return (["from dgmlib import grading\\n"] + ANSWER_IMPORTS
            + [line for line in lines if line.startswith("grading.probe(")])
get_ipython().input_transformers_post.append(_only_the_probe)
"""
# Forged probes: a thread that claims every test cell's judge and answers every request itself, and tells the
# judge the test passed. A probe is judged only on the student's answers to the judge's own requests.
FORGE_PROBE_CELL = """
import os, socket, threading, time
import torch
from dgmlib.grading import wire
_NAMES = TEST_CELLS
def _forge():
    path = os.environ.get("DGM_JUDGE_SOCKET")
    while path:
        for name in _NAMES:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                wire.send(s, wire.encode({"op": "probe", "name": name, "exposed": ["model", "made_masks", "q_sample"]}))
                wire.send(s, wire.encode({"op": "verdict", "passed": True}))
                while True:
                    request = wire.decode(wire.receive(s))
                    if request.get("op") == "done":
                        break
                    wire.send(s, wire.encode({"ok": True, "value": [torch.ones(3, 3)] * 4, "passed": True}))
            except Exception:
                pass
        time.sleep(0.02)
threading.Thread(target=_forge, daemon=True).start()
"""
# Reading the instructor's files from inside the kernel: the solutions and the judge next to the installed
# dgmlib (an editable install from the instructor's checkout) or anywhere on the file system, then running
# every solution cell found. The kernel sees no such file: the wrong answers stay.
READ_SOLUTIONS_CELL = """
import json, os
import dgmlib
_roots = [os.path.dirname(os.path.dirname(os.path.abspath(dgmlib.__file__))), os.environ.get("DGM_COURSE_ROOT", "/")]
_found = []
for _top in _roots + ["/"]:
    for _dir, _subdirs, _files in os.walk(_top):
        _subdirs[:] = [d for d in _subdirs if d not in ("proc", "sys", "dev")]
        _found += [os.path.join(_dir, f) for f in _files if "solutions" in _dir and (f == "judge.py" or f.endswith(".ipynb"))]
print("instructor files found:", len(_found))
for _path in _found:
    if _path.endswith(".ipynb"):
        for _cell in json.load(open(_path))["cells"]:
            if "BEGIN SOLUTION" in "".join(_cell["source"]):
                try:
                    exec("".join(_cell["source"]), globals())
                except Exception:
                    pass
"""
# Root escape: unmount the sandbox's tmpfs, remount the file system writable, make a new mount namespace,
# and plant code where the grader will import it. Every attempt must fail.
ESCAPE_CELL = """
import ctypes, os, subprocess
import dgmlib
_libc = ctypes.CDLL(None, use_errno=True)
_won = {"umount /tmp": _libc.umount2(b"/tmp", 2) == 0,
        "unshare(CLONE_NEWNS)": _libc.unshare(0x00020000) == 0,
        "unshare(CLONE_NEWUSER)": _libc.unshare(0x10000000) == 0}
try:
    _won["mount -o remount,rw /"] = subprocess.run(["mount", "-o", "remount,rw", "/"], capture_output=True).returncode == 0
except OSError:
    _won["mount -o remount,rw /"] = False
for _target in (os.path.dirname(dgmlib.__file__), os.path.dirname(os.__file__), "/usr/lib", "/etc"):
    try:
        with open(os.path.join(_target, "dgm_planted.py"), "w") as _fh:
            _fh.write("raise SystemExit('planted')")
        _won["write " + _target] = True
    except OSError:
        _won["write " + _target] = False
print("escape won:", sorted(k for k, v in _won.items() if v))
"""
# Links and FIFOs where the grader might read or write: the kernel's own folder, named like the notebook, the
# gradebook and a classmate's notebook. The grader never reads the kernel's folder.
PLANT_LINKS_CELL = """
import os
for _name, _target in (("NOTEBOOK", "../../honest/ASSIGNMENT/NOTEBOOK"), ("gradebook.db", "../../../gradebook.db"),
                       ("feedback", "../../../feedback"), ("honest.ipynb", "/proc/self/fd/0")):
    try:
        os.symlink(_target, _name)
    except OSError:
        pass
for _name in ("fifo.ipynb", "NOTEBOOK.fifo"):
    try:
        os.mkfifo(_name)
    except OSError:
        pass
print("planted:", sorted(os.listdir(".")))
"""
# A probe that answers from a cache: a shell hook keeps only the probe of every test cell (the visible checks go),
# and the probe exposes, in place of the student's (wrong) functions, ones that return values cached in a file
# beforehand: the reference's values on the visible tests' inputs, worked out at home with the full library (hard-coded
# outputs). The judge draws its inputs from a secret seed per submission and computes what each answer must be itself,
# in the grader: no cached value fits. Graded with hw6, whose Parts 5-8 have small, fixed visible tests, and hw7, whose
# path, loss, samplers and guidance do (ASSIGNMENT_ONLY); CACHED_CELLS are the cells whose judge must say no.
CACHED_PROBE_CELL = """
import re
import torch
_CACHE = {"dsm_loss_of": torch.zeros(6), "annealed_langevin_step": torch.zeros(2, 2), "vdm_loss_of": torch.zeros(5),
          "pf_dynamics_of": (torch.zeros(4, 2), torch.zeros(4)), "pf_ode_log_prob_of": torch.full((4,), -2.5),
          "ot_path": (torch.zeros(4, 3), torch.zeros(4, 3)), "cfm_loss_of": torch.zeros(6), "euler_of": torch.zeros(32, 3),
          "heun_of": torch.zeros(32, 3), "guided_velocity": torch.zeros(4, 1, 8, 8), "guided_field_of": torch.zeros(3, 2),
          "reflow_pairs_of": (torch.zeros(4000, 2), torch.zeros(4000, 2)), "straightness_of": torch.zeros(4000)}
torch.save(_CACHE, "expected.pt")
def _cached(name):
    return lambda *args, **kwargs: torch.load("expected.pt").get(name, torch.zeros(1))
def _probe_from_cache(lines):
    text = "".join(lines)
    if "grading.probe(" not in text:
        return lines
    probe = text[text.index("grading.probe("):]
    grade_id = re.search(r"grading[.]probe[(]'(\\w+)'", probe).group(1)
    names = re.findall(r"[(,]\\s*(\\w+)=", probe)
    return ["from dgmlib import grading\\n", f"grading.probe({grade_id!r}, **{{n: _cached(n) for n in {names!r}}})\\n"]
get_ipython().input_transformers_post.append(_probe_from_cache)
print("cached values for:", sorted(torch.load("expected.pt")))
"""
# Output of every kind: a 5 MB display and a 20 MB cell result (not a printed stream).
HUGE_RESULT_CELL = """
from IPython.display import HTML, display
display(HTML("<b>" + "x" * 5_000_000 + "</b>"))
"y" * 20_000_000
"""
# A trained model whose own methods lie: its nll says 0 nats for every image (so the visible check in the
# kernel passes), while its parameters, in the instructed layout, were never trained. The judge loads the
# parameters into the reference architecture and measures the NLL itself.
LYING = {
    "hw1_autoregressive": """
def _mask(k, kind):
    m = torch.ones(k, k)
    m[k // 2, k // 2 + (kind == "B"):] = 0
    m[k // 2 + 1:] = 0
    return m
def _conv(cin, cout, k, kind):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    conv.register_buffer("mask", _mask(k, kind))
    return conv
class _Lying(autoregressive.AutoregressiveModel):
    def __init__(self):
        super().__init__(images.shape, images.num_levels)
        self.first = _conv(1, CHANNELS, 7, "A")
        self.layers = nn.ModuleList([_conv(CHANNELS, CHANNELS, 3, "B") for _ in range(LAYERS)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(CHANNELS, CHANNELS, 1), nn.ReLU(),
                                  nn.Conv2d(CHANNELS, images.num_levels, 1))
    def nll(self, y, labels=None):
        return torch.zeros(len(y))
    def log_prob(self, y, labels=None):
        return torch.zeros(len(y))
model = _Lying()
history = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)
""",
    # hw7: a sampler that returns real test digits of the asked labels, which the classifier reads right, from an
    # untrained network. The judge replays the sampler with the network's parameters, and samples and measures the
    # network itself.
    "hw7_flow_matching": """
_real = diffusion.levels_to_unit(images.test, images.num_levels)
_real_labels = data.load_digit_labels("test")
class CondFlow(nn.Module):
    def __init__(self, net, sigma_min=SIGMA_MIN, p_uncond=P_UNCOND):
        super().__init__()
        self.net, self.sigma_min, self.p_uncond = net, sigma_min, p_uncond
    def velocity(self, x, t, labels=None):
        return self.net(x, 999 * t, labels)
    def sample(self, labels, w, num_steps=10, generator=None):
        picks = [int(torch.nonzero(_real_labels == int(c))[i % 20]) for i, c in enumerate(labels)]
        return _real[picks]
cond_model = CondFlow(diffusion.UNet(1, base=BASE, num_classes=NUM_CLASSES))
cond_history = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)
""",
}
# The lying sampler's test cells reduced to their probes by a shell hook, so that its samples, real digits, reach the
# judge without the visible replay that would give them away (hw7, with LYING's model and wrong answers elsewhere).
PROBE_ONLY_CELL = """
def _probe_only(lines):
    text = "".join(lines)
    if "grading.probe(" not in text:
        return lines
    return ["from dgmlib import grading\\n", text[text.index("grading.probe("):]]
get_ipython().input_transformers_post.append(_probe_only)
"""
ATTACKS = {
    "hide_errors": (HIDE_ERRORS_CELL, "wrong"),
    "swap_grading": (SWAP_GRADING_CELL, "wrong"),
    "forge_channel": (FORGE_CHANNEL_CELL, "wrong"),
    "reference": (None, "reference"),
    "tamper": (TAMPER_CELL, "wrong"),
    "tamper_exec": (TAMPER_EXEC_CELL, "wrong"),
    "delete": (DELETE_CELL, "blank"),
    "infinite_loop": ("while True:\n    pass", "blank"),
    "kill_kernel": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "complete"),
    "relay_checker": (RELAY_CELL, "wrong"),
    "huge_output": ("for i in range(200_000):\n    print('spam ' * 40)", "blank"),
    "edited_tests": (None, "wrong"),
    "rewrite_tests": (REWRITE_TESTS_CELL, "wrong"),
    "forge_probe": (FORGE_PROBE_CELL, "wrong"),
    "read_solutions": (READ_SOLUTIONS_CELL, "wrong"),
    "escape": (ESCAPE_CELL, "wrong"),
    "plant_links": (PLANT_LINKS_CELL, "wrong"),
    "huge_result": (HUGE_RESULT_CELL, "blank"),
    "lying_model": (None, "lying"),
    "cached_probe": (CACHED_PROBE_CELL, "wrong"),
    "lying_sampler": (PROBE_ONLY_CELL, "lying"),
}
# Attacks that leave no passing receipt for any test cell: stopped by the receipts alone, before the review.
RECEIPT_ATTACKS = ("hide_errors", "swap_grading", "forge_channel")
# Attacks on the grader rather than on an assignment's tests: the attack cell runs before any answer,
# so the outcome cannot depend on the assignment. They are graded with the first assignment only
# (the infinite loop alone holds a grading slot for the whole cell timeout); the attacks on the
# tests (tampering, edited tests) are graded with every assignment, against its own wrong answers.
GRADER_ATTACKS = ("delete", "infinite_loop", "kill_kernel", "huge_output", "relay_checker", "plant_links", "huge_result")
# Attacks on the judge (a judged first assignment): forged probes, test cells rewritten to expose the reference,
# the instructor's files read from inside, a root escape, a model whose methods lie about its NLL.
JUDGE_ATTACKS = ("rewrite_tests", "forge_probe", "read_solutions", "escape", "lying_model")
# Graded with the first assignment only: the attacks on the grader, and those on the receipts. A receipt attack
# (errors swallowed, a stand-in grading module, a forged channel) leaves no passing receipt whatever the answers, so
# what it needs from an assignment is only that every test cell makes a check through dgmlib.grading, which
# test_grading_security.test_every_test_cell_makes_a_check asserts for every assignment. Each costs a kernel
# (about 10 s), so grading them once keeps the suite under its 15 minutes as assignments are added.
# The attacks on the judge run on every assignment (each has its own judges, answers and probes), but the lying model,
# which needs a model written for one assignment's trusted architecture (hw1's PixelCNN).
FIRST_ASSIGNMENT_ONLY = GRADER_ATTACKS + RECEIPT_ATTACKS + ("lying_model",)
# Attacks graded with the named assignments only: the cached probe, on hw6's Parts 5-8 and on hw7; hw7's lying sampler.
ASSIGNMENT_ONLY = {"cached_probe": ("hw6_diffusion", "hw7_flow_matching"), "lying_sampler": ("hw7_flow_matching",)}
# The test cells whose judge must be reached, and say no, under the cached probe.
CACHED_CELLS = {"hw6_diffusion": ("test_dsm", "test_langevin", "test_vdm", "test_pf_ode"),
                "hw7_flow_matching": ("test_ot_path", "test_cfm", "test_euler", "test_heun", "test_guidance",
                                      "test_reflow", "test_cond_sampler", "test_cond_digits")}


def attacks_for(assignment: str) -> list[str]:
    """The attacks graded with ``assignment``: all of them with the first assignment, but those of ASSIGNMENT_ONLY
    that name other assignments; with the others, the attacks on the tests and the judge, and their own."""
    first = assignment == ASSIGNMENTS[0]
    return [a for a in ATTACKS if (first or a not in FIRST_ASSIGNMENT_ONLY)
            and assignment in ASSIGNMENT_ONLY.get(a, (assignment,))]


def _answer_imports(source) -> list[str]:
    """``from dgmlib.MODULE import NAME, ...`` lines for every module-level dgmlib answer the notebook declares."""
    by_module: dict[str, set[str]] = {}
    for names in source.metadata.get("dgm_grading", {}).get("answers", {}).values():
        for answer in names:
            parts = answer.split(".")
            if parts[0] == "dgmlib" and len(parts) == 3:
                by_module.setdefault(parts[1], set()).add(parts[2])
    return [f"from dgmlib.{module} import {', '.join(sorted(names))}\n" for module, names in sorted(by_module.items())]


def _build_submission(release, source, answers: str, assignment: str, attack_cell: str | None, edit_tests: bool):
    nb = copy.deepcopy(release)
    solutions = solution_sources(source)
    for cell in nb.cells:
        meta = nbg(cell)
        if meta.get("solution") and cell.cell_type == "code":
            if answers == "complete":
                cell.source = solutions[meta["grade_id"]]
            elif answers == "wrong":
                cell.source = WRONG[assignment][meta["grade_id"]]
            elif answers == "reference" and meta["grade_id"] == REFERENCE[assignment][0]:
                cell.source = REFERENCE[assignment][1]
            elif answers == "lying":
                cell.source = LYING[assignment] if meta["grade_id"] == "train" else WRONG[assignment][meta["grade_id"]]
        if edit_tests and meta.get("grade") and not meta.get("solution"):
            cell.source = "pass  # tests removed"
    if attack_cell:
        attack_cell = attack_cell.replace("NOTEBOOK", f"{assignment}.ipynb").replace("ASSIGNMENT", assignment)
        attack_cell = attack_cell.replace("ANSWER_IMPORTS", repr(_answer_imports(source)))
        attack_cell = attack_cell.replace("TEST_CELLS", repr(sorted(
            nbg(c)["grade_id"] for c in source.cells if nbg(c).get("grade") and not nbg(c).get("solution"))))
        first_solution = next(i for i, c in enumerate(nb.cells) if nbg(c).get("solution"))
        nb.cells.insert(first_solution, new_code_cell(attack_cell))
    return nb




def pipeline_submission(kind: str, release, source, spec: dict):
    """One submission of ``EXPECTED``: "honest" (every solution cell), "innocent" (the same in a student's
    own words), "partial" (only ``spec["partial_cells"]``) or "raises" (every solution cell,
    ``spec["raising_cell"]`` raising first)."""
    nb = copy.deepcopy(release)
    solutions = solution_sources(source)
    fill = spec["partial_cells"] if kind == "partial" else set(solutions)
    first = True
    for cell in nb.cells:
        meta = nbg(cell)
        if meta.get("solution") and meta["grade_id"] in fill:
            cell.source = solutions[meta["grade_id"]]
            if kind == "innocent":
                renamed, pattern, new_name = INNOCENT[spec["assignment"]]
                if meta["grade_id"] == renamed:
                    cell.source = re.sub(pattern, new_name, cell.source)
                if first:
                    cell.source = INNOCENT_HEADER + "\n\n" + cell.source
                first = False
        if kind == "raises" and meta.get("grade_id") == spec["raising_cell"]:
            cell.source = 'raise RuntimeError("a bug in the student\'s cell")\n' + cell.source
    return nb


def attack_submission(release, source, assignment: str, attack: str):
    """The submission of ``ATTACKS[attack]``: its answers, its attack cell before the first answer, and
    for "edited_tests" every test cell emptied."""
    cell, answers = ATTACKS[attack]
    return _build_submission(release, source, answers, assignment, cell, attack == "edited_tests")
