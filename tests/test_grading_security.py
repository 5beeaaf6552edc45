"""Trustworthy autograding, one mechanism at a time: the checks, the receipts, the static review, the
similarity report and the sandbox.

The end-to-end grading of a class under attack is in ``test_grading_pipeline.test_grading_a_class``:
each assignment's honest, partial and broken submissions and its attackers are graded in one
``dgm grade`` pass (the class is in ``classroom_cases``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from dgmlib import grading
from dgmlib.grading import classroom, receipts, review, sandbox, similarity

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

# ---------------------------------------------------------------- similarity (copydetect)


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
    cmd = sandbox.bwrap_command(str(conn), [], str(work), str(course), sandbox.bwrap_path(), str(checker / "socket"))
    python = cmd.index(sys.executable)
    probe = ("import os, socket, dgmlib.grading.limits\n"  # the kernel's own imports must work in there
             f"try:\n    os.rename('{checker / 'socket'}', '{checker / 'moved'}')\n"
             "except OSError:\n    pass\nelse:\n    print('moved the checker socket')\n"
             "print(sorted(os.listdir('../../..')))\n"
             "open('../../../gradebook.db', 'w').write('gone')\n"
             "open('mine.txt', 'w').write('ok')\n"
             "try:\n    socket.create_connection(('127.0.0.1', 22), timeout=2); print('net')\n"
             "except OSError:\n    print('no net')\n")
    out = subprocess.run(cmd[:python] + [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["['autograded']", "no net"]
    assert (course / "gradebook.db").read_text() == "grades"  # the write went to a throw-away tmpfs
    assert (work / "mine.txt").read_text() == "ok"


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
