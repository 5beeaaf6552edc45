"""Trustworthy autograding: attacks on the tests, the course folder and the grader itself.

The end-to-end test grades, together and in parallel with `dgm grade`, an honest full solution, a
blank release and one submission per attack on the tests, for every assignment, plus the attacks on
the grader itself for the first assignment, and checks the exact scores.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell

from dgmlib import grading
from dgmlib.cli import main
from dgmlib.grading import classroom, sandbox

from nbhelpers import ASSIGNMENTS, ROOT, autograded_points, make_course, max_points, nbg, solution_sources
HAS_BWRAP = sandbox.bwrap_path() is not None

# A wrong but running answer for every solution cell, so that tampering is what would earn points.
WRONG = {
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
        "build": "def build_realnvp(num_couplings=8, hidden=64):\n"
                 "    return flows.Flow(flows.Compose(*[AffineCoupling(flows.checkerboard_mask((1, 8, 8), k % 2), None)"
                 " for k in range(num_couplings)]), num_levels=17)",
        "train": "model = build_realnvp()\nhistory = train.History(train_loss=[1.0], val_loss=[1.0], best_epoch=0)",
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
ATTACKS = {
    "tamper": (TAMPER_CELL, "wrong"),
    "tamper_exec": (TAMPER_EXEC_CELL, "wrong"),
    "delete": (DELETE_CELL, "blank"),
    "infinite_loop": ("while True:\n    pass", "blank"),
    "kill_kernel": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "complete"),
    "huge_output": ("for i in range(200_000):\n    print('spam ' * 40)", "blank"),
    "edited_tests": (None, "wrong"),
}
# Attacks on the grader rather than on an assignment's tests: the attack cell runs before any answer,
# so the outcome cannot depend on the assignment. They are graded with the first assignment only
# (the infinite loop alone holds a grading slot for the whole cell timeout); the attacks on the
# tests (tampering, edited tests) are graded with every assignment, against its own wrong answers.
GRADER_ATTACKS = ("delete", "infinite_loop", "kill_kernel", "huge_output")


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
        if edit_tests and meta.get("grade") and not meta.get("solution"):
            cell.source = "pass  # tests removed"
    if attack_cell:
        first_solution = next(i for i, c in enumerate(nb.cells) if nbg(c).get("solution"))
        nb.cells.insert(first_solution, new_code_cell(attack_cell))
    return nb


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
                                          (grading, "_ask_checker")])
def test_replaced_machinery_is_detected(monkeypatch, target, attr):
    monkeypatch.setattr(target, attr, lambda *a, **k: True)
    with pytest.raises(grading.TamperingError, match=attr):
        grading.assert_close(torch.ones(2), torch.ones(2))


def test_static_flags(tmp_path):
    release = nbformat.read(ROOT / "assignments" / "hw2_flows" / "hw2_flows.ipynb", as_version=4)
    nb = copy.deepcopy(release)
    nb.cells.append(new_code_cell("import torch as T\nT.allclose = None\nsetattr(T, 'equal', None)\n"
                                  "import sys\nsys.modules['x'] = 1\nplt.rcParams['figure.dpi'] = 80\nself_x = 1"))
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    flags = classroom.flag_tampering(path)
    assert any("assigns T.allclose" in f for f in flags)
    assert any("setattr on T" in f for f in flags)
    assert any("sys.modules" in f for f in flags)
    assert not any("rcParams" in f for f in flags)
    nbformat.write(release, path)
    assert classroom.flag_tampering(path) == []  # the release itself is clean


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
    cmd = sandbox.bwrap_command(str(conn), [], str(work), str(course), sandbox.bwrap_path())
    python = cmd.index(sys.executable)
    probe = ("import os, socket, dgmlib.grading.limits\n"  # the kernel's own imports must work in there
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


def test_sandbox_needs_ipc(tmp_path):
    conn = tmp_path / "kernel.json"
    conn.write_text(json.dumps({"transport": "tcp", "ip": "127.0.0.1"}))
    with pytest.raises(ValueError, match="transport=ipc"):
        sandbox.bwrap_command(str(conn), [], str(tmp_path), None)


# ---------------------------------------------------------------- grading a class under attack


@pytest.mark.notebook
@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed")
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_attackers_earn_nothing_and_harm_no_one(tmp_path, name):
    course = make_course(tmp_path / "course")
    (notebook_file,) = sorted((ROOT / "solutions" / name).glob("*.ipynb"))
    source = nbformat.read(notebook_file, as_version=4)
    release = nbformat.read(ROOT / "assignments" / name / notebook_file.name, as_version=4)
    submissions = {"honest": _build_submission(release, source, "complete", name, None, False),
                   "blank": copy.deepcopy(release)}
    grader_attacks = name == ASSIGNMENTS[0]
    for attack, (cell, answers) in ATTACKS.items():
        if attack in GRADER_ATTACKS and not grader_attacks:
            continue
        submissions[attack] = _build_submission(release, source, answers, name, cell, attack == "edited_tests")
    for student, nb in submissions.items():
        folder = course / "submitted" / student / name
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / notebook_file.name)

    # the instructor's command, exactly as the README gives it
    assert main(["grade", name, "--course", str(course), "--jobs", "2", "--timeout", "90"]) == 0
    reported = json.loads((course / "reports" / f"{name}.json").read_text())
    results = {r["student"]: classroom.StudentResult(**r) for r in reported}

    max_score = max_points(source)
    auto_max = sum(autograded_points(source).values())
    report = classroom.format_report(name, list(results.values()))
    assert results["honest"].score == auto_max, report
    assert not results["honest"].flagged and not results["honest"].failure, report
    for student in submissions:
        if student != "honest":
            assert results[student].score == 0, f"{student} earned points:\n{report}"
    # what stopped each attack is visible in the report
    assert results["tamper"].flagged and results["tamper_exec"].flagged
    # in the kernel, every test cell of the exec-hidden tamper failed on its own
    graded = list(autograded_points(source))
    assert all(any(c.startswith(f"{g} (TamperingError)") for c in results["tamper_exec"].crashed) for g in graded), report
    if grader_attacks:
        assert "infinite_loop" in report and results["infinite_loop"].timed_out
        assert "died" in results["kill_kernel"].failure
        assert any("NotImplementedError" in c for c in results["huge_output"].crashed)
    # the gradebook, the CSV and everyone's files survived
    assert (course / "gradebook.db").exists()
    with open(course / "grades.csv", newline="") as fh:
        rows = {row["student_id"]: row for row in csv.DictReader(fh) if row["assignment"] == name}
    assert float(rows["honest"]["score"]) == auto_max and float(rows["honest"]["max_score"]) == max_score
    assert set(rows) == set(submissions)
    for student in submissions:
        submitted = course / "submitted" / student / name / notebook_file.name
        assert nbformat.read(submitted, as_version=4).cells  # not overwritten
    honest = nbformat.read(course / "autograded" / "honest" / name / notebook_file.name, as_version=4)
    assert honest.cells and (course / "solutions" / name / notebook_file.name).exists()
    if grader_attacks:  # the huge output was cut in the autograded notebook
        flood = (course / "autograded" / "huge_output" / name / notebook_file.name).read_text()
        assert len(flood) < 2_000_000


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
