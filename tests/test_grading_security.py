"""Trustworthy autograding, one mechanism at a time: the checks, the receipts, the static review, the
similarity report and the sandbox.

The end-to-end grading of a class under attack is in ``test_grading_pipeline.test_grading_a_class``:
each assignment's honest, partial and broken submissions and its attackers are graded in one
``dgm grade`` pass (the class is in ``classroom_cases``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from dgmlib import grading
from dgmlib.grading import classroom, limits, receipts, review, sandbox, similarity, strip, untrusted

from classroom_cases import EXPECTED, pipeline_submission
from nbhelpers import ASSIGNMENTS, ROOT, make_course
HAS_BWRAP = sandbox.bwrap_path() is not None

# ---------------------------------------------------------------- fast unit tests of the mechanism


def test_checks_compare_in_a_clean_process():
    grading.assert_close(torch.ones(3), torch.ones(3) + 1e-9)
    grading.assert_equal(torch.arange(4), torch.arange(4))
    grading.assert_le(100.0, 115.0)
    grading.assert_shape(torch.zeros(2, 3), (2, 3))
    for bad in (lambda: grading.assert_close(torch.ones(3), torch.zeros(3)),
                lambda: grading.assert_equal(torch.ones(2), torch.ones(3)),
                lambda: grading.assert_le(float("nan"), 115.0),
                lambda: grading.assert_not_close(torch.ones(3), torch.ones(3)),
                lambda: grading.assert_true(torch.tensor(True))):
        with pytest.raises(AssertionError):
            bad()


def test_tensor_subclasses_are_refused():
    class Liar(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return True

    liar = torch.zeros(3).as_subclass(Liar)
    with pytest.raises(AssertionError, match="Liar"):
        grading.assert_close(liar, torch.ones(3))
    with pytest.raises(AssertionError, match="Liar"):
        grading.trusted(liar)


def test_code_swap_is_detected(monkeypatch):
    import dgmlib.units
    monkeypatch.setattr(dgmlib.units.nats_to_bits_per_dim, "__code__", (lambda nats, num_dims: 0.0).__code__)
    with pytest.raises(grading.TamperingError, match="nats_to_bits_per_dim"):
        grading.assert_true(True)


@pytest.mark.parametrize("target, attr", [(torch, "allclose"), (torch.testing, "assert_close"),
                                          (torch.Tensor, "__eq__"), (__import__("builtins"), "all"),
                                          (__import__("dgmlib.train").train, "evaluate"),
                                          (__import__("dgmlib.autoregressive").autoregressive, "receptive_field"),
                                          (__import__("dgmlib.dequantization").dequantization,
                                           "variational_dequantization_nll"),
                                          (__import__("dgmlib.vq").vq.VectorQuantizer, "forward"),
                                          (__import__("dgmlib.vq").vq, "codebook_perplexity"),
                                          (grading, "_ask_checker")])
def test_replaced_machinery_is_detected(monkeypatch, target, attr):
    monkeypatch.setattr(target, attr, lambda *a, **k: True)
    with pytest.raises(grading.TamperingError, match=attr):
        grading.assert_close(torch.ones(2), torch.ones(2))


# ---------------------------------------------------------------- receipts: verdicts kept by the grader


@pytest.fixture
def grader_checker(tmp_path, monkeypatch):
    """A CheckerServer, as ``dgm grade`` runs it, with this process's ``dgmlib.grading`` talking to it."""
    server = receipts.CheckerServer(tmp_path / "checker")
    monkeypatch.setattr(grading, "_SOCKET_PATH", server.path)
    monkeypatch.setitem(grading._OWN_GLOBALS, "_SOCKET_PATH", server.path)  # the kernel reads it at import
    monkeypatch.setattr(grading, "_connection", None)
    yield server
    server.close()


def test_every_check_leaves_a_receipt_with_its_line(grader_checker):
    cell = ("x = torch.ones(3)\n"
            "grading.assert_close(x, x + 1e-9)\n"
            "grading.assert_shape(x,\n"
            "                     (3,))\n"
            "grading.assert_true(bool(x.sum() == 3))\n")
    exec(compile(cell, "<cell>", "exec"), {"torch": torch, "grading": grading})
    got = grader_checker.since(0)
    assert [(r.api, r.line, r.passed) for r in got] == [("assert_close", 2, True), ("assert_shape", 3, True),
                                                        ("assert_true", 5, True)]
    assert receipts.verify_cell(cell, got) is None
    with pytest.raises(AssertionError, match="values differ"):
        grading.assert_close(torch.ones(2), torch.zeros(2))
    assert not grader_checker.since(3)[0].passed


def test_unverified_cells():
    cell = "\n\ngrading.assert_close(a, b)\nfor i in range(2):\n    grading.assert_le(i, 5)\n"
    ok = [receipts.Receipt("assert_close", 1, True, "ok"), receipts.Receipt("assert_le", 3, True, "ok")]
    # IPython drops the leading blank lines before it compiles the cell: line 1 is the first call
    assert [(s.api, s.first_line) for s in receipts.call_sites(cell)] == [("assert_close", 1), ("assert_le", 3)]
    assert receipts.verify_cell(cell, ok + ok[1:]) is None
    assert "no receipt for assert_le" in receipts.verify_cell(cell, ok[:1])  # a stand-in module or a hidden error
    assert "no receipt" in receipts.verify_cell(cell, [receipts.Receipt("assert_close", 7, True, "ok")] + ok[1:])
    assert "out of order" in receipts.verify_cell(cell, ok[::-1])
    failed = receipts.Receipt("assert_le", 3, False, "9 is not <= 5")
    assert "failed: 9 is not <= 5" in receipts.verify_cell(cell, ok + [failed])  # passed once, failed later
    assert "makes no dgmlib.grading check" in receipts.verify_cell("print(1)", [])
    # a check inside a function of the cell only needs its receipt, wherever it was called from
    helper = "def check(v):\n    grading.assert_le(v, 1)\ngrading.assert_true(True)\ncheck(0)\n"
    assert receipts.verify_cell(helper, [receipts.Receipt("assert_true", 3, True, "ok"),
                                         receipts.Receipt("assert_le", 2, True, "ok")]) is None


def test_every_test_cell_makes_a_check():
    """A test cell without a grading check could not be vouched for by receipts, and would always score 0."""
    for name in ASSIGNMENTS:
        for path in sorted((ROOT / "solutions" / name).glob("*.ipynb")):
            for cell in nbformat.read(path, as_version=4).cells:
                meta = cell.metadata.get("nbgrader", {})
                if meta.get("grade") and not meta.get("solution"):
                    assert receipts.call_sites(cell.source), f"{name} {meta['grade_id']} makes no check"


def test_malformed_requests_are_failed_checks(tmp_path):
    server = receipts.CheckerServer(tmp_path / "checker")
    try:
        assert server.decide([b"close", b"short"]).startswith(b"malformed check")
        assert not server.receipts[0].passed
    finally:
        server.close()
    assert not (tmp_path / "checker").exists()


# ---------------------------------------------------------------- static review by allowlist

HW2 = review.Policy(("dgmlib.flows", "dgmlib.train"), {"*": ("dgmlib.flows.AffineCoupling",)})
HW2 = review.Policy(("dgmlib.flows", "dgmlib.train"), {"*": ("dgmlib.flows.AffineCoupling",)})
INNOCENT = '''
# Like flows.AffineCoupling in dgmlib, but my own: the jacobian is triangular, so its log-det is a sum.
import math
from torch import nn
from dgmlib import flows


def _bounded(raw, bound):
    """Soft clamp of the log-scale; my helper, not AffineCoupling's."""
    return bound * torch.tanh(raw / bound)


class AffineCoupling(flows.Bijection):
    def __init__(self, mask, net, scale_bound=3.0):
        super().__init__(mask.shape)
        self.register_buffer("mask", mask.float())
        self.net, self._bound = net, scale_bound

    def forward(self, x):
        log_scale, shift = self.net(self.mask * x).unbind(1)
        log_scale = (1 - self.mask) * _bounded(log_scale, self._bound)
        for _ in range(1):
            pass
        return x * torch.exp(log_scale) + (1 - self.mask) * shift, log_scale.flatten(1).sum(1)
'''


def test_innocent_code_is_never_flagged():
    extra = ("%%time\nplt.rcParams['figure.dpi'] = 80\nkind = type(plt).__name__\n%time total = sum([1, 2])\n"
             "x = (3\n     % 2)\n")
    assert review.review_source([("coupling", "", INNOCENT), (None, "#9", extra)], HW2) == []


def test_cells_disguised_as_the_instructors_are_reviewed(tmp_path):
    """A cell the student adds with nbgrader metadata but no grade_id of the source is still theirs."""
    release = nbformat.read(ROOT / "assignments" / "hw2_flows" / "hw2_flows.ipynb", as_version=4)
    source = nbformat.read(ROOT / "solutions" / "hw2_flows" / "hw2_flows.ipynb", as_version=4)
    cell = nbformat.v4.new_code_cell("import sys")
    cell.metadata["nbgrader"] = {"schema_version": 3, "grade": False, "solution": False, "locked": False}
    release.cells.insert(3, cell)
    nbformat.write(release, tmp_path / "nb.ipynb")
    theirs = {c.metadata["nbgrader"]["grade_id"] for c in source.cells
              if "nbgrader" in c.metadata and not c.metadata["nbgrader"].get("solution")}
    assert any("imports sys" in f for f in review.review_notebook(tmp_path / "nb.ipynb", HW2, theirs))


@pytest.mark.parametrize("code, flag", [
    ("import os", "imports os, which this assignment does not allow"),
    ("from dgmlib import grading", "imports dgmlib.grading"),
    ("x = grading.assert_close", "uses grading (the test machinery)"),
    ("import importlib\nm = importlib.import_module('dgmlib')", "imports importlib"),
    ("m = torch.sys.modules", "reaches torch.sys"),
    ("f = getattr(torch, 'sys')", "names 'sys' in a string"),
    ("f = getattr(torch, name)", "with a name that is not a literal string"),
    ("v = vars(flows)", "calls vars()"),
    ("get_ipython().set_custom_exc((Exception,), None)", "uses get_ipython"),
    ("!rm -rf /", "IPython magic or shell command"),
    ("c = model.__class__", "reads the private attribute model.__class__"),
    ("b = __builtins__", "uses the name __builtins__"),
    ("torch.allclose = None", "assigns torch.allclose"),
    ("from . import x", "relative import"),
    ("layer = flows.AffineCoupling(mask, net)", "an answer of this assignment (dgmlib.flows.AffineCoupling)"),
    ("F = flows\nlayer = F.AffineCoupling(mask, net)", "refers to F.AffineCoupling"),
    ("from dgmlib.flows import AffineCoupling as Mine", "imports AffineCoupling, an answer"),
    ("c = getattr(flows, 'AffineCoupling')", "names 'AffineCoupling' in getattr()"),
    # found by a second reader: aliases of exec, `self` rebound, the student's own names as cover
    ("run = [exec][0]\nrun('x = 1')", "uses exec without calling it"),
    ("from dgmlib import flows as self\nC = self.AffineCoupling", "imports dgmlib.flows as self"),
    ("self = torch\nm = self.__dict__", "assigns self"),
    ("def f(grading=None):\n    return grading", "uses grading (the test machinery)"),
    ("def g(__builtins__=None):\n    return __builtins__", "uses the name __builtins__"),
    ("%time exec('x = 1')", "calls exec()"),
])
def test_review_flags(code, flag):
    setup = {"math", "plt", "torch", "nn", "data", "flows", "grading", "plots", "train", "fast_mode", "pick"}
    flags = review.review_source([("coupling", "", code)], HW2, imported=setup)
    assert any(flag in f for f in flags), flags


def test_policies_of_the_assignments(tmp_path):
    """Every assignment declares its policy; its solution, its release and its solution in a student's own
    words (a comment naming the answers, a helper, a renamed variable) pass their own review."""
    for name in ASSIGNMENTS:
        for path in sorted((ROOT / "solutions" / name).glob("*.ipynb")):
            policy = review.Policy.from_notebook(json.loads(path.read_text()))
            assert policy.imports and policy.answers["*"], name
            assert review.review_notebook(path, policy) == [], name
            release = ROOT / "assignments" / name / path.name
            assert review.review_notebook(release, policy) == [], name
            innocent = pipeline_submission("innocent", nbformat.read(release, as_version=4),
                                           nbformat.read(path, as_version=4), EXPECTED[name])
            nbformat.write(innocent, tmp_path / path.name)
            assert "_mine(" in (tmp_path / path.name).read_text()
            assert review.review_notebook(tmp_path / path.name, policy) == [], name
    with pytest.raises(TypeError, match="dgm_grading"):
        review.Policy.from_notebook({"metadata": {"dgm_grading": {"imports": "torch"}}})



@pytest.mark.parametrize("cell, code, answer", [
    ("lu_conv", "class LUInvConv1x1(flows.InvConv1x1):\n    pass", "dgmlib.flows.InvConv1x1"),
    ("lu_conv", "from dgmlib.flows import InvConv1x1 as Mine", "dgmlib.flows.InvConv1x1"),
    ("vbound", "def variational_bound(lp, q, y, k, generator=None):\n"
               "    return dequantization.variational_dequantization_nll(lp, y, k, q, generator)",
     "dgmlib.dequantization.variational_dequantization_nll"),
    ("vbound", "bound = getattr(dequantization, 'importance_weighted_dequantization_nll')",
     "dgmlib.dequantization.importance_weighted_dequantization_nll"),
    ("bound", "def dequantization_bound(lp, y, k, generator=None):\n    return units.dequantized_nll(lp, y, k, generator)",
     "dgmlib.units.dequantized_nll"),
    ("bound", "from dgmlib.dequantization import dequantized_nll", "dgmlib.dequantization.dequantized_nll"),
])
def test_hw2_policy_flags_the_answers_of_glow_and_dequantization(cell, code, answer):
    """hw2's own policy (from its source notebook) flags a cell that delegates to dgmlib's 1x1 convolution or
    to its dequantization bounds, under either of the names they are importable by."""
    policy = review.Policy.from_notebook(json.loads((ROOT / "solutions" / "hw2_flows" / "hw2_flows.ipynb").read_text()))
    flags = review.review_source([(cell, "", code)], policy)
    assert any(answer in f for f in flags), flags
    # dgmlib's dequantizers are tools the assignment hands out, not answers
    assert review.review_source([("vtrain", "", "q = dequantization.VariationalDequantizer((1, 8, 8), 17, hidden=16)\n"
                                                "u, log_q = q.sample(train_y[:4])")], policy) == []

@pytest.mark.parametrize("cell, code, answer", [
    ("made", "def made_masks(degrees):\n    return autoregressive.made_masks(degrees)", "made_masks"),
    ("made", "masks = autoregressive.MADE((1, 2, 2), 3, hidden=4).masks()", "MADE"),
    ("conv", "class MaskedConv2d(autoregressive.MaskedConv2d):\n    pass", "MaskedConv2d"),
    ("conv", "from dgmlib.vae import MaskedConv2d as Mine", "MaskedConv2d"),
    ("stack_masks", "vertical_mask = getattr(autoregressive, 'vertical_mask')", "vertical_mask"),
    ("stack_masks", "from dgmlib.autoregressive import horizontal_mask", "horizontal_mask"),
    ("gated", "GatedLayer = autoregressive.GatedPixelCNNLayer", "GatedPixelCNNLayer"),
    ("pixelcnn", "class MyPixelCNN(autoregressive.PixelCNN):\n    pass", "PixelCNN"),
    ("train", "model = autoregressive.GatedPixelCNN()", "GatedPixelCNN"),
])
def test_hw1_policy_flags_the_answers_of_the_autoregressive_models(cell, code, answer):
    """hw1's own policy (from its source notebook) flags a cell that delegates to dgmlib's masks, masked
    convolutions or models, by any route."""
    policy = review.Policy.from_notebook(
        json.loads((ROOT / "solutions" / "hw1_autoregressive" / "hw1_autoregressive.ipynb").read_text()))
    flags = review.review_source([(cell, "", code)], policy)
    # MaskedConv2d is one object under two names: the flag may give either
    assert any("an answer" in f and answer in f for f in flags), flags
    # the helpers the assignment hands out are tools, not answers
    tools = ("degrees = autoregressive.made_degrees(6, [8], 'random')\nlayer = autoregressive.MaskedLinear(6, 8)\n"
             "class Mine(autoregressive.AutoregressiveModel):\n    pass")
    assert review.review_source([("pixelcnn", "", tools)], policy) == []


@pytest.mark.parametrize("cell, code, answer", [
    ("quantizer", "def nearest_code(z_e, codebook):\n    return vq.nearest_code(z_e, codebook)", "nearest_code"),
    ("quantizer", "from dgmlib.vq import straight_through as st", "straight_through"),
    ("quantizer", "def vq_losses(z_e, z_q):\n    out = vq.VectorQuantizer(4, 2)(z_e)\n"
                  "    return out.codebook_loss, out.commitment_loss", "VectorQuantizer"),
    ("ema", "update = getattr(vq, 'VectorQuantizer')", "VectorQuantizer"),
    ("vqvae_model", "class MyVQVAE(vq.VQVAE):\n    pass", "VQVAE"),
    ("stage1", "model = vq.VQVAE2()", "VQVAE2"),
    ("stage2", "CODES_TRAIN = vq.encode_codes(model, TRAIN)", "encode_codes"),
    ("stage2", "from dgmlib.vq import fit_prior", "fit_prior"),
])
def test_hw4_policy_flags_the_answers_of_the_quantizer_and_the_vqvae(cell, code, answer):
    """hw4's own policy (from its source notebook) flags a cell that delegates to dgmlib's quantizer, its VQ-VAEs or
    their two-stage helpers, by any route."""
    policy = review.Policy.from_notebook(json.loads((ROOT / "solutions" / "hw4_vq_vae" / "hw4_vq_vae.ipynb").read_text()))
    flags = review.review_source([(cell, "", code)], policy)
    assert any("an answer" in f and answer in f for f in flags), flags
    # the helpers the assignment hands out are tools, not answers
    tools = ("p = vq.codebook_perplexity(codes, 32)\nu = vq.uniform_prior_nll(4, 32)\n"
             "prior = autoregressive.GatedPixelCNN((1, 2, 2), num_levels=32)")
    assert review.review_source([("stage2", "", tools)], policy) == []

@pytest.mark.parametrize("cell, code, answer", [
    ("dsm", "def dsm_loss(score_fn, x, sigma, noise):\n    return score.denoising_score_matching_loss(score_fn, x, sigma, noise)",
     "denoising_score_matching_loss"),
    ("langevin", "from dgmlib.score import annealed_langevin_step", "annealed_langevin_step"),
    ("langevin", "def annealed_langevin_step(score, x, sigma, sigma_min, epsilon, noise):\n"
                 "    return dgmlib_score.langevin_step(score, x, epsilon * sigma ** 2 / sigma_min ** 2, noise)", "langevin_step"),
    ("vdm", "loss = score.VDM(net, (2,), schedule='fixed').diffusion_loss(x, t)", "diffusion_loss"),
    ("pf_ode", "velocity = score.reverse_drift(sde, score_fn, x, t, probability_flow=True)", "reverse_drift"),
    ("pf_ode", "flow = getattr(score, 'ProbabilityFlow')", "ProbabilityFlow"),
    ("pf_ode", "from dgmlib.score import probability_flow_log_prob as mine", "probability_flow_log_prob"),
])
def test_hw6_policy_flags_the_answers_of_the_score_based_parts(cell, code, answer):
    """hw6's own policy (from its source notebook) flags a cell of Parts 5-8 that delegates to dgmlib.score's denoising
    score matching, Langevin steps, VDM loss or probability-flow ODE, by any route."""
    policy = review.Policy.from_notebook(
        json.loads((ROOT / "solutions" / "hw6_diffusion" / "hw6_diffusion.ipynb").read_text()))
    flags = review.review_source([(cell, "", "from dgmlib import score\ndgmlib_score = score\n" + code)], policy)
    assert any("an answer" in f and answer in f for f in flags), flags
    # the tools Parts 5-8 hand out: the VP SDE's coefficients and torchdiffeq
    tools = ("import torchdiffeq\nfrom dgmlib.score import VPSDE\nsde = VPSDE(0.1, 20.0)\nf, g2 = sde.f_g2(t)\n"
             "alpha, sigma = sde.alpha_sigma(t)\nout = torchdiffeq.odeint(rhs, state, times, rtol=1e-8, atol=1e-8)")
    assert review.review_source([("pf_ode", "", tools)], policy) == []



@pytest.mark.parametrize("cell, code, answer", [
    ("path", "x_t = flow_matching.OTPath(sigma_min).interpolate(x0, x1, t)", "OTPath"),
    ("path", "path = flow_matching.make_path('ot')", "make_path"),
    ("path", "u_t = path.conditional_velocity(x0, x1, t)", "conditional_velocity"),
    ("cfm", "from dgmlib.flow_matching import cfm_loss as reference", "cfm_loss"),
    ("euler", "def euler_sample(velocity_fn, x0, num_steps, t_end=1.0):\n"
              "    return flow_matching.euler_sample(velocity_fn, x0, num_steps, t_end)", "euler_sample"),
    ("heun", "step = getattr(flow_matching, 'heun_sample')", "heun_sample"),
    ("heun", "x, nfe = flow_matching.sample_ode(velocity_fn, x0, 'heun', num_steps)", "sample_ode"),
    ("heun", "x = fm.odeint(lambda t, x: velocity_fn(x, t.expand(len(x))), x0, times, method='rk4')[-1]", "odeint"),
    ("guidance", "guided_velocity = flow_matching.guided_velocity", "guided_velocity"),
    ("guidance", "net = flow_matching.GuidedNet(net, labels, w)", "GuidedNet"),
    ("reflow", "x0, x1 = flow_matching.reflow_pairs(velocity_fn, x0, 'heun', num_steps)", "reflow_pairs"),
    ("reflow", "s = flow_matching.straightness(velocity_fn, x0, num_steps)", "straightness"),
    ("train", "cond_model = flow_matching.FlowMatching(net, (1, 8, 8), num_classes=10)", "FlowMatching"),
])
def test_hw7_policy_flags_the_answers_of_flow_matching(cell, code, answer):
    """hw7's own policy (from its source notebook) flags a cell that delegates to dgmlib.flow_matching's path, loss,
    samplers (torchdiffeq's odeint among them, by a module that imported it), guidance, reflow or model, by any route."""
    policy = review.Policy.from_notebook(
        json.loads((ROOT / "solutions" / "hw7_flow_matching" / "hw7_flow_matching.ipynb").read_text()))
    flags = review.review_source([(cell, "", "from dgmlib import flow_matching\nfm = flow_matching\n" + code)], policy)
    assert any("an answer" in f and answer in f for f in flags), flags
    # the tools hw7 hands out: the closed-form marginal field, the label packing, the U-Net and the classifier
    tools = ("from dgmlib import diffusion, flow_matching, vq\n"
             "u = flow_matching.gaussian_marginal_velocity(path, x, t, m, s)\n"
             "packed = flow_matching.pack_labels(images, labels)\nnet = diffusion.UNet(1, base=16, num_classes=10)\n"
             "x1 = diffusion.levels_to_unit(levels, 17)\nclassifier = vq.digit_classifier()")
    assert review.review_source([("train", "", tools)], policy) == []


def test_hw7_stripped_library_withholds_the_answers_and_keeps_the_tools(tmp_path):
    """With hw7's answers withheld, the kernel's dgmlib.flow_matching raises for the path, the loss, every sampler,
    guidance, reflow and the models, however they are reached (a sampler that calls dgmlib's earns nothing), while the
    tools its tests and instructions use still work: gaussian_marginal_velocity with the test cell's own path
    object, pack_labels, and the class-conditional U-Net."""
    policy = review.Policy.from_notebook(
        json.loads((ROOT / "solutions" / "hw7_flow_matching" / "hw7_flow_matching.ipynb").read_text()))
    strip.stripped_copy([name for names in policy.answers.values() for name in names], tmp_path)
    check = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
from dgmlib import diffusion, flow_matching as fm
assert fm.__file__.startswith(sys.argv[1])
x, t = torch.randn(4, 2), torch.rand(4)
field = lambda x, t: -x
calls = {"OTPath": lambda: fm.OTPath(0.1), "make_path": lambda: fm.make_path("ot"),
         "cfm_loss": lambda: fm.cfm_loss(field, x, x, t, None),
         "interpolate": lambda: fm.ProbabilityPath.interpolate(None, x, x, t),
         "euler_sample": lambda: fm.euler_sample(field, x, 4), "heun_sample": lambda: fm.heun_sample(field, x, 4),
         "midpoint_sample": lambda: fm.midpoint_sample(field, x, 4), "sample_ode": lambda: fm.sample_ode(field, x),
         "ode_sample": lambda: fm.ode_sample(field, x), "straightness": lambda: fm.straightness(field, x),
         "guided_velocity": lambda: fm.guided_velocity(x, x, 2.0), "reflow_pairs": lambda: fm.reflow_pairs(field, x),
         "FlowMatching": lambda: fm.FlowMatching(diffusion.UNet(1, base=8), (1, 8, 8))}
for name, call in calls.items():
    try:
        call()
        print(name, "ran")
    except RuntimeError as e:
        print(name, "withheld" if "withheld while grading" in str(e) else e)
class StraightPath:
    def alpha_sigma(self, t):
        return t, 1 - t
    def alpha_sigma_dot(self, t):
        return torch.ones_like(t), -torch.ones_like(t)
u = fm.gaussian_marginal_velocity(StraightPath(), x, t, torch.zeros(2), torch.ones(2))
gain = ((2 * t - 1) / (t ** 2 + (1 - t) ** 2))[:, None]  # N(0, I) data: E[x1 - x0 | x_t = x] in closed form
assert u.shape == (4, 2) and torch.allclose(u, gain * x)
assert fm.pack_labels(torch.zeros(3, 1, 8, 8), torch.arange(3)).shape == (3, 65)
out = diffusion.UNet(1, base=8, num_classes=10)(torch.zeros(2, 1, 8, 8), torch.ones(2), torch.tensor([3, 10]))
assert out.shape == (2, 1, 8, 8)
print("tools work")
"""
    out = subprocess.run([sys.executable, "-c", check, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[:-1] == [f"{name} withheld" for name in ("OTPath", "make_path", "cfm_loss", "interpolate",
                          "euler_sample", "heun_sample", "midpoint_sample", "sample_ode", "ode_sample",
                          "straightness", "guided_velocity", "reflow_pairs", "FlowMatching")], out.stdout
    assert lines[-1] == "tools work"


def test_hw7_judges_refuse_hard_coded_and_shortcut_answers(tmp_path):
    """Answers that pass hw7's visible checks without doing the work earn nothing from the judges: the visible tests'
    values hard-coded (or read back from a file), a guided field that returns the conditional field (right at w = 1,
    the scale the model is trained to), samplers that integrate the visible test's linear field in closed form (too
    accurate: no order) or run Euler with 2N steps for Heun (the same evaluations, order 1), and reflow pairs that
    return the data of the visible test whatever the field."""
    from dgmlib.grading.judge import judge_locally, load_judges

    judges = load_judges(ROOT / "solutions" / "hw7_flow_matching" / "judge.py")
    g = torch.Generator().manual_seed(0)
    visible = {"x_t": torch.randn(4, 3, generator=g, dtype=torch.float64)}  # what a cache of the visible test holds
    torch.save(visible, tmp_path / "expected.pt")

    def closed_form(spec, x0, n, t_end):  # the exact solution of a linear field (and x0 for any other)
        if spec["kind"] != "linear":
            return x0
        lam, beta, omega = spec["lam"], spec["beta"], spec["omega"]
        forced = (omega * math.sin(omega * t_end) - lam * math.cos(omega * t_end) + lam * math.exp(lam * t_end)) \
            / (lam ** 2 + omega ** 2)
        return math.exp(lam * t_end) * x0 + beta * forced

    def euler_twice(spec, x0, n, t_end):  # 2N Euler steps: Heun's count of evaluations, Euler's order
        field, h, x = _hw7_field(spec), t_end / (2 * n), x0
        for k in range(2 * n):
            x = x + h * field(x, torch.full((len(x),), k * h, dtype=x.dtype))
        return x

    cases = [
        ("test_ot_path", {"ot_path": lambda x0, x1, t, s: (visible["x_t"], visible["x_t"])}),
        ("test_ot_path", {"ot_path": lambda x0, x1, t, s: tuple(
            torch.load(tmp_path / "expected.pt")["x_t"] for _ in range(2))}),
        ("test_cfm", {"cfm_loss_of": lambda spec, x0, x1, t, s: torch.zeros(len(x0)),
                      "cfm_grad_of": lambda *args: [torch.zeros(2, 2), torch.zeros(2), torch.zeros(2)]}),
        ("test_guidance", {"guided_velocity": lambda v_cond, v_uncond, w: v_cond,
                           "guided_field_of": lambda spec, labels, w, x, t: torch.zeros_like(x)}),
        ("test_euler", {"euler_of": closed_form}),
        ("test_heun", {"heun_of": closed_form}),
        ("test_heun", {"heun_of": euler_twice}),
        ("test_reflow", {"reflow_pairs_of": lambda spec, n, shape, steps, seed: (torch.zeros(n, *shape),) * 2,
                         "reflow_loss_of": lambda spec, x0, x1, t: torch.zeros(len(x0)),
                         "straightness_of": lambda spec, x0, steps: torch.zeros(len(x0))}),
    ]
    for grade_id, exposed in cases:
        for seed in (0, 1):
            passed, message = judge_locally(judges[grade_id], exposed, seed=seed)
            assert not passed, (grade_id, seed, message)


def _hw7_field(spec):
    """hw7's fields cell's ``make_field``, run from the source notebook (the judge's own copy is private)."""
    cells = json.loads((ROOT / "solutions" / "hw7_flow_matching" / "hw7_flow_matching.ipynb").read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["metadata"].get("nbgrader", {}).get("grade_id") in ("setup", "fields"):
            exec("".join(cell["source"]), namespace)
    return namespace["make_field"](spec)

# ---------------------------------------------------------------- similarity (winnowing; more in test_similarity.py)


def test_similarity_finds_renamed_copies_and_copies_of_dgmlib():
    flows_source = (Path(grading.__file__).parents[1] / "flows.py").read_text()
    start = flows_source.index("class AffineCoupling")
    copied = flows_source[start:flows_source.index("\nclass ", start + 10)]
    renamed = (INNOCENT.replace("log_scale", "s").replace("shift", "t").replace("_bounded", "soft")
               .replace("# Like", "# Unlike"))
    other = "def f(a, b):\n    total = 0\n    for i in range(a):\n        total += i * b\n    return total\n"
    own = "def scale(values, k):\n    out = []\n    for item in values:\n        out.append(item * k + 1)\n    return out\n"
    # cy wrote one cell and copied the other from dgmlib: the copied cell is found on its own
    pairs = similarity.similar_pairs({"ann": [INNOCENT], "bob": [renamed], "cy": [own * 4, copied], "dee": [other],
                                      "eve": [""]}, {"dgmlib/flows.py": flows_source}, boilerplate="import math\n")
    found = {(p.first, p.second) for p in pairs}
    assert ("ann", "bob") in found and ("cy", "dgmlib/flows.py") in found
    assert not any("dee" in pair or "eve" in pair for pair in found)
    assert all(max(p.first_share, p.second_share) >= similarity.DEFAULT_THRESHOLD for p in pairs)
    with pytest.raises(ValueError, match="threshold"):
        similarity.similar_pairs({}, threshold=0)


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed")
def test_sandbox_hides_the_course_and_the_network(tmp_path):
    course = tmp_path / "course"
    work = course / "autograded" / "s1" / "hw"
    work.mkdir(parents=True)
    (course / "gradebook.db").write_text("grades")
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    conn = tmp_path / "kernel.json"
    conn.write_text(json.dumps({"transport": "ipc", "ip": str(sockets / "kernel")}))
    checker = tmp_path / "checker"
    checker.mkdir()
    (checker / "socket").write_text("stands for the grader's socket")
    probe = ("import os, socket, dgmlib.grading.limits\n"  # the kernel's own imports must work in there
             f"try:\n    os.rename('{checker / 'socket'}', '{checker / 'moved'}')\n"
             "except OSError:\n    pass\nelse:\n    print('moved the checker socket')\n"
             "print(sorted(os.listdir('../../..')))\n"
             "try:\n    open('../../../gradebook.db', 'w').write('gone')\nexcept OSError:\n    pass\n"
             "open('mine.txt', 'w').write('ok')\n"
             "try:\n    socket.create_connection(('127.0.0.1', 22), timeout=2); print('net')\n"
             "except OSError:\n    print('no net')\n")
    fds: list[int] = []
    try:
        cmd = sandbox.bwrap_command(str(conn), [], str(work), str(course), sandbox.bwrap_path(),
                                    str(checker / "socket"), fds=fds, command=[sys.executable, "-c", probe])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["['autograded']", "no net"]
    assert (course / "gradebook.db").read_text() == "grades"  # the course is not there: nothing to write to
    assert not (work / "mine.txt").exists()  # the working folder is a throw-away tmpfs, never read back


def test_sandbox_keeps_the_checker_apart(tmp_path):
    conn = tmp_path / "kernel.json"
    conn.write_text(json.dumps({"transport": "ipc", "ip": str(tmp_path / "kernel")}))
    with pytest.raises(ValueError, match="folder of its own"):
        sandbox.bwrap_command(str(conn), [], str(tmp_path), None, checker_socket=str(tmp_path / "checker"))


def test_sandbox_needs_ipc(tmp_path):
    conn = tmp_path / "kernel.json"
    conn.write_text(json.dumps({"transport": "tcp", "ip": "127.0.0.1"}))
    with pytest.raises(ValueError, match="transport=ipc"):
        sandbox.bwrap_command(str(conn), [], str(tmp_path), None)


# ---------------------------------------------------------------- least privilege (issue 26)

_STATUS_PROBE = r"""
import ctypes, json, os, platform, socket, sys
from dgmlib.grading import sandbox
libc = ctypes.CDLL(None, use_errno=True)
def err(rc):
    return ctypes.get_errno() if rc == -1 else 0
out = {"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()],
       "caps": {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith("Cap")},
       "umount2": err(libc.umount2(b"/tmp", 0)),
       "mount": err(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
       "remount": err(libc.mount(None, b"/", None, 32 | 4096, None)),  # MS_REMOUNT | MS_BIND
       "unshare_ns": err(libc.unshare(0x00020000)),
       "unshare_user": err(libc.unshare(0x10000000)),
       "setns": err(libc.setns(0, 0)),
       "chroot": err(libc.chroot(b"/tmp")),
       "ptrace": err(libc.ptrace(16, 1, None, None)),
       "clone3": err(libc.syscall(435, None, 0))}
numbers = sandbox._SYSCALL_NUMBERS[sandbox._MACHINES[platform.machine().lower()]][1]
pid = libc.syscall(numbers["clone"], 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
if pid == 0:
    os._exit(0)
out["clone_newuser"] = err(pid) if pid == -1 else os.waitpid(pid, 0) and "made a user namespace"
try:
    os.setuid(0)
except PermissionError:
    out["setuid"] = "refused"
for path in (sys.prefix, os.path.dirname(sandbox.__file__), "/usr"):
    try:
        open(os.path.join(path, "planted.py"), "w").write("print('pwned')")
    except OSError as e:
        out.setdefault("write", []).append(e.errno)
checker = socket.socket(socket.AF_UNIX)
checker.connect(os.environ["DGM_CHECKER_SOCKET"])  # nobody can still reach the grader's checker
try:
    os.rename(os.environ["DGM_CHECKER_SOCKET"], os.environ["DGM_CHECKER_SOCKET"] + ".moved")
except OSError:
    out["rename"] = "refused"
print(json.dumps(out))
"""

_VIEW_PROBE = r"""
import json, os, sys
import dgmlib
here = os.getcwd()
out = {"/": sorted(os.listdir("/")), "/etc": sorted(os.listdir("/etc")), "env": sorted(os.environ),
       "prefix parent": sorted(os.listdir(os.path.dirname(sys.prefix))),
       "package parent": sorted(os.listdir(os.path.dirname(os.path.dirname(dgmlib.__file__)))),
       "cwd": here, "cwd entries": sorted(os.listdir(here)), "tmp": sorted(os.listdir("/tmp")),
       "exists": {p: os.path.lexists(p) for p in sys.argv[1:]},
       "root": sorted(os.listdir("/root")) if os.path.isdir("/root") else None}
import multiprocessing
multiprocessing.Lock()  # a semaphore in /dev/shm, as torch's DataLoader workers need
try:
    with open(os.path.join(here, "fill"), "wb") as fh:
        for _ in range(64):
            fh.write(b"x" * 2**20)
            fh.flush()
except OSError as e:
    out["fill"] = [e.errno, os.path.getsize(os.path.join(here, "fill"))]
print(json.dumps(out))
"""

_LIMITS_PROBE = r"""
import json, os, threading
out = {}
stop, threads = threading.Event(), []
try:
    for _ in range(1000):
        t = threading.Thread(target=stop.wait)
        t.start()
        threads.append(t)
except RuntimeError as e:
    out["threads stopped"] = str(e)
out["threads"] = len(threads)
stop.set()
for t in threads:
    t.join()
r, w = os.pipe()
pids = []
try:
    for _ in range(1000):  # a fork bomb, on a leash
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        pids.append(pid)
except OSError as e:
    out["fork errno"] = e.errno
out["forks"] = len(pids)
os.close(w)
for pid in pids:
    os.waitpid(pid, 0)
fd = os.open("/tmp/big", os.O_WRONLY | os.O_CREAT)
try:
    for _ in range(300):
        os.write(fd, b"\0" * 2**20)
except OSError as e:
    out["300 MiB"] = [e.errno, os.fstat(fd).st_size]
os.close(fd)
os.remove("/tmp/big")
print(json.dumps(out))
"""


def _in_sandbox(tmp_path: Path, code: str, args: tuple[str, ...] = (), environ: dict | None = None,
                ) -> subprocess.CompletedProcess:
    """Run ``python -c code args`` where the grading kernel would run, as ``dgm grade`` lays it out: a course
    with a gradebook, a private folder per student (runtime, sockets, checker with a listening socket, scratch),
    and a launcher environment with a secret in it."""
    import socket

    course = tmp_path / "course"
    (course / "solutions" / "hw").mkdir(parents=True, exist_ok=True)
    (course / "gradebook.db").write_text("grades")
    private = tmp_path / "grading" / "s1"
    for name in ("runtime", "sockets", "checker", "scratch"):
        (private / name).mkdir(parents=True, exist_ok=True)
    conn = private / "runtime" / "kernel-1.json"
    conn.write_text(json.dumps({"transport": "ipc", "ip": str(private / "sockets" / "kernel"), "key": "k"}))
    checker = socket.socket(socket.AF_UNIX)
    checker.bind(str(private / "checker" / "socket"))
    checker.listen(4)
    env = {"PATH": os.environ["PATH"], "HOME": "/root", "SECRET_TOKEN": "x", "DGM_FAST": "1",
           "DGM_COURSE_ROOT": str(course), "DGM_STRIPPED_LIBRARY": "",
           "DGM_CHECKER_SOCKET": str(private / "checker" / "socket"),
           "DGM_KERNEL_CWD": str(private / "scratch"), "OMP_NUM_THREADS": "1", **(environ or {})}
    fds: list[int] = []
    try:
        cmd = sandbox.bwrap_command(str(conn), [], env["DGM_KERNEL_CWD"], str(course), sandbox.bwrap_path(),
                                    env["DGM_CHECKER_SOCKET"], fds=fds, environ=env,
                                    command=[sys.executable, "-c", code, *args])
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
        checker.close()


def _sandbox_json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed")
def test_sandbox_kernel_has_no_privilege(tmp_path):
    """The kernel is nobody with no capability; the system calls that change the mounts, make namespaces or
    reach other processes fail with EPERM; it can still connect to the grader's checker, not move it."""
    import errno

    got = _sandbox_json(_in_sandbox(tmp_path, _STATUS_PROBE))
    print(json.dumps(got, indent=1))
    assert got["ids"] == [65534, 65534, 65534, 65534, [65534]] or got["ids"] == [65534, 65534, 65534, 65534, []]
    assert got["caps"] == {f"Cap{k}": "0000000000000000" for k in ("Inh", "Prm", "Eff", "Bnd", "Amb")}
    for call in ("umount2", "mount", "remount", "unshare_ns", "unshare_user", "setns", "chroot", "ptrace",
                 "clone_newuser"):
        assert got[call] == errno.EPERM, (call, got[call])
    assert got["clone3"] == errno.ENOSYS  # glibc falls back to clone, whose flags the filter sees
    assert got["setuid"] == got["rename"] == "refused"
    assert len(got["write"]) == 3 and set(got["write"]) <= {errno.EROFS, errno.EACCES}


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed")
def test_sandbox_view_is_minimal(tmp_path):
    """What the kernel sees: the system, the Python environment, dgmlib's folder, its own folders. Not the
    course, /root beyond the Python prefix, /etc/shadow, /home; none of the launcher's variables but its
    settings. Its working folder is a size-capped tmpfs. Prints the listing (``pytest -s``)."""
    import errno

    hidden = [str(ROOT / "gradebook.db"), str(ROOT / "solutions"), str(ROOT / "submitted"), str(ROOT / "tests"),
              str(tmp_path / "course"), "/etc/shadow", "/home", "/root/.bashrc", "/root/.cache"]
    got = _sandbox_json(_in_sandbox(tmp_path, _VIEW_PROBE, tuple(hidden), environ={"DGM_SANDBOX_TMPFS_MB": "16"}))
    print(json.dumps(got, indent=1))
    assert set(got["/"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "sys", "tmp",
                             "usr", *Path(sys.prefix).parts[1:2], *Path(grading.__file__).parts[1:2]}
    assert set(got["/etc"]) <= {*(Path(p).name for p in sandbox.ETC_FILES), "passwd", "group"}
    assert not any(got["exists"].values()), got["exists"]
    if Path(sys.prefix).resolve().parent.is_relative_to(Path.home()):  # pyenv: only the prefix of /root
        assert got["root"] == [Path(sys.prefix).relative_to(Path.home()).parts[0]]
    if ROOT / "dgmlib" == Path(grading.__file__).parents[1]:  # an editable install: the checkout shows dgmlib
        assert got["package parent"] == ["dgmlib"]
    assert got["env"] == sorted({"PATH", "HOME", "IPYTHONDIR", "MPLCONFIGDIR", "LANG", "PYTHONNOUSERSITE", "PWD",
                                 "OMP_NUM_THREADS", "DGM_FAST", "DGM_CHECKER_SOCKET", "DGM_KERNEL_CWD",
                                 "DGM_SANDBOX_TMPFS_MB"})
    assert got["cwd"] == str(tmp_path / "grading" / "s1" / "scratch") and got["cwd entries"] == []
    assert got["fill"][0] == errno.ENOSPC and got["fill"][1] <= 16 * 2**20
    assert not (tmp_path / "grading" / "s1" / "scratch" / "fill").exists()


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed")
def test_sandbox_stops_fork_bombs_and_huge_files(tmp_path):
    """RLIMIT_NPROC holds (the kernel's host uid is never root, for which the kernel ignores it): 1000
    threads, or a fork bomb, stop at the limit; a 300 MiB file stops at RLIMIT_FSIZE."""
    import errno

    got = _sandbox_json(_in_sandbox(tmp_path, _LIMITS_PROBE))
    print(json.dumps(got, indent=1))
    assert "can't start new thread" in got["threads stopped"]
    assert sandbox.DEFAULT_PROCESSES // 2 < got["threads"] < sandbox.DEFAULT_PROCESSES
    assert got["fork errno"] == errno.EAGAIN
    assert sandbox.DEFAULT_PROCESSES // 2 < got["forks"] < sandbox.DEFAULT_PROCESSES
    assert got["300 MiB"] == [errno.EFBIG, sandbox.DEFAULT_FILE_MB * 2**20]


@pytest.mark.skipif(not HAS_BWRAP or os.geteuid() != 0, reason="bubblewrap and a root grader are needed")
def test_each_submission_has_a_host_uid_of_its_own(tmp_path):
    """Under a root grader the kernel's 65534 is the host uid ``dgm grade`` gives that submission, so the process
    limit, counted per host uid, is per submission: a fork bomb cannot starve a classmate graded beside it."""
    code = "print(open('/proc/self/uid_map').read().split())"
    out = _in_sandbox(tmp_path, code, environ={"DGM_SANDBOX_HOST_UID": "3000000007"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(["0", "0", "1", "65534", "3000000007", "1"])
    for bad in ("0", "999", str(2**32 - 1)):
        with pytest.raises(ValueError, match="DGM_SANDBOX_HOST_UID"):
            sandbox.host_uid({"DGM_SANDBOX_HOST_UID": bad})
    assert sandbox.host_uid({}) == sandbox.KERNEL_UID


def _body_lines(module: Path, qualname: str) -> list[str]:
    """The lines of a definition's body in ``module`` (docstring aside) that appear nowhere else in it."""
    import ast

    source = module.read_text()
    tree = ast.parse(source)
    node: ast.AST = tree
    for part in qualname.split("."):
        node = next(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
    body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body
    lines = source.splitlines()
    inside = lines[body[0].lineno - 1:node.end_lineno]
    outside = "\n".join(lines[:node.lineno - 1] + lines[node.end_lineno:])
    return [line.strip() for line in inside if len(line.strip()) > 20 and line.strip() not in outside]


def test_stripped_library_withholds_the_answers(tmp_path):
    """A function, a class, a NamedTuple, a method (inherited from a base of the same module): calling them
    raises, nothing of their bodies is left in the copy, and the copy, dgmlib.grading included, imports."""
    answers = ["dgmlib.autoregressive.made_masks", "dgmlib.autoregressive.MADE", "dgmlib.vae.VAE.elbo",
               "dgmlib.vq.Quantized", "dgmlib.flows.AffineCoupling", "dgmlib.vae.MaskedConv2d",
               "dgmlib.units.dequantized_nll", "torch.func.jacrev"]
    package = strip.stripped_copy(answers, tmp_path)
    assert package == tmp_path / "dgmlib"
    original = Path(grading.__file__).parents[1]
    for module, qualname in (("autoregressive", "made_masks"), ("autoregressive", "MADE"),
                             ("vae", "LatentVariableModel.elbo"), ("flows", "AffineCoupling")):
        lines = _body_lines(original / f"{module}.py", qualname)
        assert lines, (module, qualname)
        copied = (package / f"{module}.py").read_text()
        assert not [line for line in lines if line in copied], (module, qualname)
    assert (package / "train.py").read_text() == (original / "train.py").read_text()  # untouched modules stay
    check = ("import sys\nsys.path.insert(0, sys.argv[1])\n"
             "import dgmlib, dgmlib.grading, dgmlib.models, dgmlib.autoregressive as ar, dgmlib.vae as vae, "
             "dgmlib.vq as vq, dgmlib.flows as flows\n"
             "assert dgmlib.__file__.startswith(sys.argv[1])\n"
             "assert issubclass(ar.MADE, ar.AutoregressiveModel) and vae.MaskedConv2d is ar.MaskedConv2d\n"
             "for call in (lambda: ar.made_masks([1, 2]), lambda: ar.MADE((1, 2, 2), 3), lambda: vq.Quantized(1),\n"
             "             lambda: vae.VAE.elbo(None, None), lambda: flows.AffineCoupling(None, None)):\n"
             "    try:\n        call()\n    except RuntimeError as e:\n        print(e)\n")
    out = subprocess.run([sys.executable, "-c", check, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"dgmlib.{n} is withheld while grading: write your own" for n in
                                       ("autoregressive.made_masks", "autoregressive.MADE", "vq.Quantized",
                                        "vae.VAE.elbo", "flows.AffineCoupling")]


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed")
def test_sandbox_mounts_the_stripped_library_in_place(tmp_path):
    """With DGM_STRIPPED_LIBRARY, ``import dgmlib`` in the kernel, by whatever route, gets the copy, at the
    installed package's path; the original is not there."""
    strip.stripped_copy(["dgmlib.autoregressive.made_masks"], tmp_path / "library")
    probe = ("import inspect, dgmlib.autoregressive as ar\n"
             "print(ar.__file__)\n"
             "print('_dgm_withheld' in inspect.getsource(ar.made_masks))\n"
             "try:\n    ar.made_masks([1, 2])\nexcept RuntimeError as e:\n    print(e)\n")
    out = _in_sandbox(tmp_path, probe, environ={"DGM_STRIPPED_LIBRARY": str(tmp_path / "library")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [str(Path(grading.__file__).parents[1] / "autoregressive.py"), "True",
                                       "dgmlib.autoregressive.made_masks is withheld while grading: write your own"]


def test_seccomp_program():
    x86, arm = sandbox.seccomp_program("x86_64"), sandbox.seccomp_program("aarch64")
    assert len(x86) % 8 == 0 and x86 != arm
    code, jt, jf, k = struct.unpack("=HBBI", x86[8:16])
    assert k == sandbox.AUDIT_ARCH_X86_64 and struct.unpack("=HBBI", arm[8:16])[3] == sandbox.AUDIT_ARCH_AARCH64
    assert struct.unpack("=HBBI", x86[-8:])[3] == 0x7FFF0000  # the default: allow
    with pytest.raises(RuntimeError, match="no seccomp filter"):
        sandbox.seccomp_program("ppc64le")


def test_untrusted_files_are_refused_without_blocking(tmp_path):
    """A FIFO, a symbolic link, a folder or an oversized file in a submission: refused, and never opened in a
    way that could block or follow it."""
    folder = tmp_path / "submitted" / "eve" / "hw"
    folder.mkdir(parents=True)
    (folder / "hw.ipynb").write_text("{}")
    assert untrusted.check_submission(folder, label="submitted/eve/hw") == ""
    assert untrusted.read_notebook(folder / "hw.ipynb") == {}
    os.mkfifo(folder / "pipe.ipynb")
    assert untrusted.check_submission(folder, label="submitted/eve/hw") == \
        "submitted/eve/hw/pipe.ipynb is a FIFO, not a regular file: not graded"
    with pytest.raises(untrusted.UntrustedFileError, match="is a FIFO"):
        untrusted.read_regular_file(folder / "pipe.ipynb")  # O_NONBLOCK: refused at once, not a hang
    os.remove(folder / "pipe.ipynb")
    os.symlink(tmp_path / "gradebook.db", folder / "link.ipynb")
    assert "link.ipynb is a symbolic link" in untrusted.check_submission(folder)
    with pytest.raises(untrusted.UntrustedFileError, match="symbolic link"):
        classroom.read_regular_file(folder / "link.ipynb")
    os.remove(folder / "link.ipynb")
    (folder / "sub").mkdir()
    assert "sub is a folder" in untrusted.check_submission(folder)
    (folder / "sub").rmdir()
    with open(folder / "huge.ipynb", "wb") as fh:
        fh.truncate(untrusted.MAX_FILE_BYTES + 1)  # sparse: costs nothing
    assert "over the limit of 32 MiB" in untrusted.check_submission(folder)
    with pytest.raises(untrusted.UntrustedFileError, match="over the limit"):
        untrusted.read_regular_file(folder / "huge.ipynb")
    os.remove(folder / "huge.ipynb")
    os.rename(folder, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", folder)
    assert untrusted.check_submission(folder, label="submitted/eve/hw") == \
        "submitted/eve/hw is a symbolic link, not a folder: not graded"


def test_a_planted_submission_fails_alone(tmp_path, monkeypatch):
    """grade_assignment refuses the submissions holding a FIFO or a symbolic link before running anything of
    them, and grades the classmate (nbgrader stubbed out: only the pre-check and the bookkeeping run)."""
    course = tmp_path / "course"
    (course / "solutions" / "hw").mkdir(parents=True)
    (course / "nbgrader_config.py").write_text("")
    notebook = json.dumps(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]))
    (course / "solutions" / "hw" / "hw.ipynb").write_text(notebook)
    for student in ("ann", "fifo", "link"):
        (course / "submitted" / student / "hw").mkdir(parents=True)
        (course / "submitted" / student / "hw" / "hw.ipynb").write_text(notebook)
    os.mkfifo(course / "submitted" / "fifo" / "hw" / "data.csv")
    os.symlink(course / "gradebook.db", course / "submitted" / "link" / "hw" / "notes.txt")
    autograded = []

    def nbgrader(args, course, log, *rest, **kwargs):
        Path(log).write_text("")
        if args[0] == "autograde":
            autograded.append(args[args.index("--student") + 1])
        return 0

    monkeypatch.setattr(classroom, "_run_nbgrader", nbgrader)
    results = {r.student: r for r in classroom.grade_assignment("hw", course, jobs=2, use_sandbox=False)}
    assert autograded == ["ann"] and not results["ann"].failure
    assert results["fifo"].failure == "submitted/fifo/hw/data.csv is a FIFO, not a regular file: not graded"
    assert results["link"].failure == "submitted/link/hw/notes.txt is a symbolic link, not a regular file: not graded"
    assert "FAILED: submitted/fifo/hw/data.csv is a FIFO" in (course / "reports" / "hw.txt").read_text()


def test_submission_cgroup(tmp_path):
    """Where cgroup v2 can be written, a cgroup per submission with its limits; elsewhere none, and grading
    goes on with the rlimits (a fake cgroup tree stands for /sys/fs/cgroup here)."""
    assert limits.submission_cgroup("s", 2**30, 300, 1.0, root=tmp_path / "none") is None
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    group = limits.submission_cgroup("run-s1", 2**30, 320, 1.5, root=tmp_path)
    assert group == tmp_path / limits.CGROUP_PARENT / "run-s1"
    assert (group / "memory.max").read_text() == f"{2**30}\n" and (group / "pids.max").read_text() == "320\n"
    assert (group / "cpu.max").read_text() == "150000 100000\n"
    for folder in (tmp_path, tmp_path / limits.CGROUP_PARENT):
        assert (folder / "cgroup.subtree_control").read_text().split() == ["+memory", "+pids", "+cpu"]
    assert not sandbox.join_cgroup(str(tmp_path / "missing")) and not sandbox.join_cgroup(None)
    limits.remove_cgroup(group, wait=0.0)  # a fake cgroup keeps its files: removal gives up quietly
    limits.remove_cgroup(None)
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        print("cgroup v2 controllers here:", Path("/sys/fs/cgroup/cgroup.controllers").read_text().strip())
    else:
        print("no cgroup v2 at /sys/fs/cgroup here: the kernels are held by their rlimits")


# ---------------------------------------------------------------- grading without a sandbox


@pytest.mark.notebook
@pytest.mark.parametrize("name", ASSIGNMENTS[:1])
def test_grading_without_bubblewrap_warns_and_still_works(tmp_path, monkeypatch, name):
    """macOS and Windows have no bubblewrap: grading must still work, with a loud warning."""
    course = make_course(tmp_path / "course")
    (notebook_file,) = sorted((ROOT / "assignments" / name).glob("*.ipynb"))
    folder = course / "submitted" / "blank" / name
    folder.mkdir(parents=True)
    shutil.copy(notebook_file, folder)
    # only the Python environment's scripts (nbgrader, alembic, ...): bubblewrap lives in /usr/bin
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert sandbox.bwrap_path() is None
    with pytest.warns(sandbox.UnsandboxedWarning, match="WITHOUT a sandbox"):
        (result,) = classroom.grade_assignment(name, course, jobs=1, cell_timeout=120)
    assert result.score == 0 and not result.failure and result.crashed
    assert (course / "grades.csv").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs processes as another uid: needs root, as CI has")
def test_the_watchdog_limits_a_submission_as_a_whole():
    """Without cgroups, a root grader watches the processes of the submission's own host uid together: four
    processes of 60 MiB each pass a 100 MiB limit together (each alone is under it) and are all killed; a busy
    loop passes a CPU limit and is killed."""
    from dgmlib.grading import limits

    python = shutil.which("python3", path="/usr/bin:/bin")  # one that any uid may run (this one may lie in /root)
    if python is None:
        pytest.skip("no system python3 for another uid to run")

    def spawn(uid: int, code: str) -> subprocess.Popen:
        return subprocess.Popen([python, "-I", "-c", code], user=uid, group=uid, stdout=subprocess.DEVNULL,
                                cwd="/")

    hog = "import time\nx = bytearray(60 * 2**20)\nfor i in range(0, len(x), 4096): x[i] = 1\ntime.sleep(60)"
    uid = 3_000_000_101
    procs = [spawn(uid, hog) for _ in range(4)]
    watchdog = limits.UidWatchdog(uid, 100 * 2**20, 1000.0, interval=0.2)
    try:
        for proc in procs:
            assert proc.wait(timeout=30) == -9
        assert "MiB of memory" in watchdog.reason and watchdog.peak_bytes > 100 * 2**20
    finally:
        watchdog.stop()
        for proc in procs:
            proc.kill()
    uid = 3_000_000_102
    busy = spawn(uid, "while True: pass")
    watchdog = limits.UidWatchdog(uid, 2**40, 1.0, interval=0.2)
    try:
        assert busy.wait(timeout=30) == -9 and "CPU time" in watchdog.reason
    finally:
        watchdog.stop()
        busy.kill()
    with pytest.raises(ValueError, match="not root's"):
        limits.UidWatchdog(0, 1, 1.0)
