"""The judge (dgmlib.grading.judge), its wire format and the probe: what a kernel can and cannot make it do.

The judge decides a test cell's points in the grader. These tests run a judge against objects of this
process through the real wire format and probe loop (``judge_locally``), or against a hostile "kernel" that
speaks the protocol by hand, and check that only genuine, correct outputs earn a pass.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dgmlib.grading import probing, wire
from dgmlib.grading.judge import (JudgeFailure, JudgeServer, expect, expect_close, expect_equal, expect_le,
                                  expect_shape, judge, judge_locally, load_judges, parameters, randomise,
                                  solution_cells)
from nbhelpers import ASSIGNMENTS, ROOT, autograded_points

JUDGED = [name for name in ASSIGNMENTS if (ROOT / "solutions" / name / "judge.py").exists()]


# ---------------------------------------------------------------- the wire format


def test_wire_round_trip_of_every_kind_of_value():
    value = {"x": torch.randn(3, 4, dtype=torch.float64), "i": torch.arange(5), "b": torch.tensor([True, False]),
             "h": torch.randn(2, dtype=torch.bfloat16), "n": 3, "f": float("nan"), "s": "text", "none": None,
             "t": (1, [2.5, torch.zeros(0)]), "nested": {"deep": [[torch.ones(1, 1, 2)]]}, "handle": wire.Handle(7)}
    back = wire.decode(wire.encode(value))
    assert torch.equal(back["x"], value["x"]) and back["x"].dtype == torch.float64
    assert torch.equal(back["i"], value["i"]) and torch.equal(back["b"], value["b"])
    assert back["h"].dtype == torch.float32  # bfloat16 travels as float32
    assert back["n"] == 3 and back["f"] != back["f"] and back["s"] == "text" and back["none"] is None
    assert back["t"][0] == 1 and back["t"][1][0] == 2.5 and back["t"][1][1].shape == (0,)
    assert back["nested"]["deep"][0][0].shape == (1, 1, 2)
    assert isinstance(back["handle"], wire.Handle) and back["handle"].number == 7


def test_wire_sends_objects_as_handles_only_where_asked():
    with pytest.raises(wire.WireError, match="cannot be sent"):
        wire.encode({"model": nn.Linear(2, 2)})
    seen = []
    body = wire.encode([nn.Linear(2, 2), 1], to_handle=lambda obj: seen.append(obj) or len(seen))
    assert isinstance(wire.decode(body)[0], wire.Handle) and len(seen) == 1


@pytest.mark.parametrize("body", [
    b"",  # shorter than its header
    struct.pack("<I", 100) + b"{}",  # header past the end
    struct.pack("<I", 3) + b"{{{",  # not JSON
    struct.pack("<I", 55) + b'{"$t": [0, 800], "dtype": "<f8", "shape": [10, 10]}xx',  # bytes outside the message
    struct.pack("<I", 49) + b'{"$t": [0, 8], "dtype": "<f8", "shape": [10, 10]}' + bytes(8),  # shape/bytes mismatch
    struct.pack("<I", 40) + b'{"$t": [0, 8], "dtype": "|O", "shape": [1]}' + bytes(8),  # object dtype
    struct.pack("<I", 12) + b'{"$h": "no"}',  # a handle that is not an integer
])
def test_malformed_messages_are_refused(body):
    with pytest.raises(wire.WireError):
        wire.decode(body)


def test_deep_nesting_and_huge_messages_are_refused(monkeypatch):
    deep: list = []
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(wire.WireError, match="nest"):
        wire.encode(deep)
    monkeypatch.setattr(wire, "MAX_MESSAGE", 1000)
    with pytest.raises(wire.WireError, match="at most"):
        wire.encode(torch.zeros(1000))


# ---------------------------------------------------------------- judges and the probe


@judge("t")
def _linear_judge(k, rng):
    """The student's linear layer with the judge's parameters, on the judge's inputs."""
    reference = randomise(nn.Linear(3, 2), rng)
    layer = k.make(3, 2)
    layer.load_state_dict(parameters(reference), strict=False)
    layer.double()
    x = torch.randn(4, 3, generator=rng, dtype=torch.float64)
    expect_close(layer(x), reference(x), msg="linear")
    expect_close(layer.attr("weight"), reference.weight, msg="weight")
    expect_equal(k.twice(2), 4, msg="twice")
    expect_close(layer.forward(x), reference(x), msg="a method by name")


def test_a_correct_answer_passes_and_wrong_ones_fail():
    assert judge_locally(_linear_judge, {"make": nn.Linear, "twice": lambda v: 2 * v}) == (True, "passed")
    passed, message = judge_locally(_linear_judge, {"make": nn.Linear, "twice": lambda v: 3 * v})
    assert not passed and message.startswith("twice")
    passed, message = judge_locally(_linear_judge, {"make": lambda a, b: nn.Sequential(nn.Linear(a, b), nn.Tanh()),
                                                    "twice": lambda v: 2 * v})
    assert not passed
    passed, message = judge_locally(_linear_judge, {"make": nn.Linear})
    assert not passed and "does not expose 'twice'" in message


def test_exposed_objects_and_handles_travel_as_arguments():
    @judge("t")
    def passes_objects(k, rng):
        layer = k.make(2, 2)
        expect_equal(k.same(layer, k.make), True, msg="a handle and an exposed name come back as the objects")

    exposed = {"make": nn.Linear, "same": lambda obj, factory: isinstance(obj, factory)}
    assert judge_locally(passes_objects, exposed) == (True, "passed")


def test_the_students_exceptions_and_junk_fail_the_judge():
    def boom(*args):
        raise ValueError("student bug")

    passed, message = judge_locally(_linear_judge, {"make": boom, "twice": boom})
    assert not passed and "raised ValueError: student bug" in message
    passed, message = judge_locally(_linear_judge, {"make": lambda a, b: "not a module", "twice": boom})
    assert not passed


def test_expectations_compute_in_the_judge():
    with pytest.raises(JudgeFailure, match="torch.Tensor"):
        expect_close("0.0", 0.0)
    with pytest.raises(JudgeFailure, match="NaN"):
        expect_close(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    with pytest.raises(JudgeFailure, match="shape"):
        expect_close(torch.zeros(2), torch.zeros(3))
    with pytest.raises(JudgeFailure):
        expect_le(float("nan"), 1.0)
    with pytest.raises(JudgeFailure):
        expect_equal(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    with pytest.raises(JudgeFailure):
        expect_equal(4.0, 4)  # types must match too
    with pytest.raises(JudgeFailure, match="my message"):
        expect(False, "my message")
    assert expect_shape(torch.zeros(2, 3), (2, 3)).shape == (2, 3)
    assert expect_le(torch.tensor(1.0), 1.0) == 1.0


def test_probe_is_a_no_op_outside_dgm_grade(monkeypatch):
    monkeypatch.delenv("DGM_JUDGE_SOCKET", raising=False)
    assert probing.probe("anything", f=lambda: 1) is None
    with pytest.raises(TypeError):
        probing.probe(3)


# ---------------------------------------------------------------- the server: when a probe counts


def _connect(path: str, hello: dict) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    wire.send(sock, wire.encode(hello))
    return sock


@pytest.fixture
def server(tmp_path):
    path = str(tmp_path / "judge")
    srv = JudgeServer(path, {"t": _linear_judge, "u": _linear_judge}, seed=12345, timeout=2.0)
    yield srv
    srv.close()


def _probe_in_thread(path: str, name: str, exposed: dict) -> threading.Thread:
    def run():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            probing.serve(sock, name, exposed)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_probe_counts_only_while_its_own_cell_runs_and_only_once(server):
    good = {"make": nn.Linear, "twice": lambda v: 2 * v}
    server.begin_cell("u")  # another cell runs: the probe of "t" is refused
    _probe_in_thread(server.path, "t", good).join(10)
    server.end_cell()
    assert not server.verdict("t").passed
    server.begin_cell("t")
    _probe_in_thread(server.path, "t", good).join(10)
    _probe_in_thread(server.path, "t", {"make": nn.Linear, "twice": lambda v: 3 * v}).join(10)  # a second try
    server.end_cell()
    assert server.verdict("t").passed  # the first run stands; the second was refused
    server.begin_cell("t")  # the cell runs again (a fresh execution): it must be judged again
    server.end_cell()
    assert not server.verdict("t").passed


def test_a_kernel_cannot_declare_its_own_verdict(server):
    server.begin_cell("t")
    sock = _connect(server.path, {"op": "probe", "name": "t", "exposed": ["make", "twice"]})
    request = wire.decode(wire.receive(sock))
    assert request["op"] == "call"
    # answer with a "verdict" instead of a value, then with values that are not what was asked
    wire.send(sock, wire.encode({"op": "done", "verdict": "passed", "passed": True}))
    sock.close()
    time.sleep(0.5)
    server.end_cell()
    verdict = server.verdict("t")
    assert not verdict.passed and "not a reply" in verdict.message


def test_a_kernel_that_stops_answering_fails_its_cell_and_the_server_goes_on(server):
    server.begin_cell("t")
    sock = _connect(server.path, {"op": "probe", "name": "t", "exposed": ["make", "twice"]})
    time.sleep(2.5)  # longer than the server's timeout, without answering
    server.end_cell()
    assert "did not answer in time" in server.verdict("t").message
    sock.close()
    server.begin_cell("u")  # the next cell is judged as usual
    _probe_in_thread(server.path, "u", {"make": nn.Linear, "twice": lambda v: 2 * v}).join(10)
    server.end_cell()
    assert server.verdict("u").passed


def test_garbage_on_the_socket_never_breaks_the_server(server):
    for junk in (b"", b"\x00" * 3, struct.pack("<Q", 1 << 40) + b"x", struct.pack("<Q", 5) + b"hello"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.path)
            sock.sendall(junk)
    server.begin_cell("t")
    _probe_in_thread(server.path, "t", {"make": nn.Linear, "twice": lambda v: 2 * v}).join(10)
    server.end_cell()
    assert server.verdict("t").passed


def test_inputs_depend_on_the_secret_seed(tmp_path):
    seen = []

    @judge("t")
    def record(k, rng):
        seen.append(torch.randn(3, generator=rng))

    for seed in (1, 2):
        srv = JudgeServer(str(tmp_path / f"j{seed}"), {"t": record}, seed=seed)
        srv.begin_cell("t")
        _probe_in_thread(srv.path, "t", {}).join(10)
        srv.end_cell()
        srv.close()
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])


# ---------------------------------------------------------------- the assignments' judges


@pytest.mark.parametrize("name", JUDGED)
def test_every_autograded_cell_of_a_judged_assignment_has_a_judge_and_a_probe(name):
    import nbformat

    (notebook,) = sorted((ROOT / "solutions" / name).glob("*.ipynb"))
    source = nbformat.read(notebook, as_version=4)
    judges = load_judges(ROOT / "solutions" / name / "judge.py")
    cells = autograded_points(source)
    assert set(judges) == set(cells), f"judges {sorted(judges)} != test cells {sorted(cells)}"
    by_id = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in source.cells}
    for grade_id in cells:
        assert f"grading.probe({grade_id!r}" in by_id[grade_id].source, f"{grade_id} has no probe of its own"
        assert "BEGIN HIDDEN TESTS" not in by_id[grade_id].source, f"{grade_id}: hidden tests belong in judge.py"
    assert not (ROOT / "assignments" / name / "judge.py").exists(), "the judge must never be released"


def test_solution_cells_run_the_instructors_code(tmp_path):
    ref = solution_cells(ROOT / "solutions" / "hw1_autoregressive" / "hw1_autoregressive.ipynb", "made")
    masks = ref.made_masks([torch.tensor([1, 2, 3]), torch.tensor([1, 2, 1, 2])])
    assert torch.equal(masks[1], torch.tensor([[0., 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(KeyError):
        solution_cells(ROOT / "solutions" / "hw1_autoregressive" / "hw1_autoregressive.ipynb", "no_such_cell")


def test_two_judges_for_one_cell_are_refused(tmp_path):
    path = tmp_path / "judge.py"
    path.write_text("from dgmlib.grading.judge import judge\n@judge('a')\ndef one(k, rng): pass\n"
                    "@judge('a')\ndef two(k, rng): pass\n")
    with pytest.raises(ValueError, match="two judges"):
        load_judges(path)
    with pytest.raises(FileNotFoundError):
        load_judges(tmp_path / "missing.py")


def test_hw1_judges_refuse_a_weight_masked_in_place_with_a_readable_reason():
    """A MaskedConv2d whose forward masks its weight in place gives the right outputs, but the instructions forbid it
    (it breaks torch.func in the visible tests): its judges fail it and say why, and pass the reference."""
    import json

    import torch.nn.functional as F

    from dgmlib import autoregressive

    folder = ROOT / "solutions" / "hw1_autoregressive"
    judges = load_judges(folder / "judge.py")
    cells = {c["metadata"].get("nbgrader", {}).get("grade_id"): "".join(c["source"])
             for c in json.loads((folder / "hw1_autoregressive.ipynb").read_text())["cells"]}
    right = "return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)"
    assert right in cells["conv"]
    in_place = "self.weight.data *= self.mask\n        return F.conv2d(x, self.weight, self.bias, padding=self.padding)"
    for source, passes in ((cells["conv"], True), (cells["conv"].replace(right, in_place), False)):
        namespace = {"torch": torch, "nn": nn, "F": F, "autoregressive": autoregressive}
        exec(source, namespace)
        exec(cells["pixelcnn"], namespace)
        for grade_id, exposed in (("test_mask_conv", {"MaskedConv2d": namespace["MaskedConv2d"]}),
                                  ("test_conv_causal", {"MaskedConv2d": namespace["MaskedConv2d"]}),
                                  ("test_pixelcnn", {"MyPixelCNN": namespace["MyPixelCNN"]})):
            passed, message = judge_locally(judges[grade_id], exposed)
            assert passed == passes, (grade_id, message)
            if not passes:
                assert "forward changed the layer's weight" in message and "self.weight * self.mask" in message


def test_hw4_code_maps_judge_requires_the_train_eval_mode_restored():
    """hw4's code_maps must leave ``model.training`` as it found it (the instructions say so): the judge passes a
    code_maps that restores the mode and fails, with its reason, one that leaves the model in evaluation mode."""
    folder = ROOT / "solutions" / "hw4_vq_vae"
    judges = load_judges(folder / "judge.py")
    ref = solution_cells(folder / "hw4_vq_vae.ipynb", "quantizer", "ema", "quantizer_module", "vqvae_model")
    torch.manual_seed(0)
    model = ref.MyVQVAE(channels=8).eval()

    def restoring(net, y):
        was_training = net.training
        net.eval()
        with torch.no_grad():
            codes = net.codes(y)
        net.train(was_training)
        return codes.unsqueeze(1).float()

    def forgetting(net, y):
        net.eval()
        with torch.no_grad():
            return net.codes(y).unsqueeze(1).float()

    exposed = {"model": model, "MyVQVAE": ref.MyVQVAE}
    assert judges["test_code_maps"] is not None
    assert judge_locally(judges["test_code_maps"], {**exposed, "code_maps": restoring}) == (True, "passed")
    passed, message = judge_locally(judges["test_code_maps"], {**exposed, "code_maps": forgetting})
    assert not passed and "train/eval mode" in message


def test_hw2_log_det_judge_never_fails_a_correct_coupling_by_bad_luck():
    """The judge's check that a log-det is not 0 must not fail a correct coupling whose log-det happens to be nearly
    0 at the judge's draw: before, the reference solution failed test_log_det at 6 of 3000 secret seeds (these six;
    one honest student of a class of 20 lost 3 points to it). A coupling whose log-det is always 0 still fails."""
    from dgmlib import flows

    folder = ROOT / "solutions" / "hw2_flows"
    judges = load_judges(folder / "judge.py")
    ref = solution_cells(folder / "hw2_flows.ipynb", "coupling")
    exposed = {"AffineCoupling": ref.AffineCoupling, "MLPConditioner": flows.MLPConditioner}
    for seed in (391, 1367, 1504, 2317, 2507, 2769):
        passed, message = judge_locally(judges["test_log_det"], exposed, seed=seed)
        assert passed, (seed, message)

    class ZeroLogDet(ref.AffineCoupling):
        def forward(self, x):
            return super().forward(x)[0], x.new_zeros(x.shape[0])

    passed, message = judge_locally(judges["test_log_det"], {**exposed, "AffineCoupling": ZeroLogDet}, seed=391)
    assert not passed


def test_hw1_blind_spot_judge_never_fails_a_correct_model_by_bad_luck():
    """With some random weights a pixel's ReLU head is dead on every input the judge draws, so that its logits depend
    on nothing: before, the reference solution failed test_blind_spot at 3 of 300 secret seeds (these three). The
    judge now draws again until the reference with the same weights shows every dependence. A gated PixelCNN whose
    horizontal stack never hears the vertical one (a blind spot) still fails."""
    folder = ROOT / "solutions" / "hw1_autoregressive"
    judges = load_judges(folder / "judge.py")
    ref = solution_cells(folder / "hw1_autoregressive.ipynb", "conv", "stack_masks", "conv_with_mask", "gated",
                         "gated_model")
    for seed in (163, 251, 276):
        passed, message = judge_locally(judges["test_blind_spot"], {"MyGatedPixelCNN": ref.MyGatedPixelCNN}, seed=seed)
        assert passed, (seed, message)

    def deaf(self, v, h):  # the horizontal stack without the rows above: v_to_h left out
        h_new = self.h_out(self.gate(self.h_conv(h)))
        return self.gate(self.v_conv(v)), (h + h_new if self.residual else h_new)

    original = ref.GatedLayer.forward
    ref.GatedLayer.forward = deaf
    try:
        passed, message = judge_locally(judges["test_blind_spot"], {"MyGatedPixelCNN": ref.MyGatedPixelCNN}, seed=163)
    finally:
        ref.GatedLayer.forward = original
    assert not passed and "every earlier pixel" in message


def _hw6_score_parts() -> tuple[dict, dict]:
    """hw6's Parts 5-8 (lecture 11) as the solution notebook runs them: the setup, solution and test cells, each test
    cell's ``grading.probe`` recording what it exposes. Returns the namespace and grade_id -> exposed objects."""
    import json

    recorded: dict = {}
    namespace = {"__name__": "hw6_score_parts", "__record__": lambda name, **exposed: recorded.__setitem__(name, exposed)}
    cells = json.loads((ROOT / "solutions" / "hw6_diffusion" / "hw6_diffusion.ipynb").read_text())["cells"]
    wanted = ("setup", "dsm", "test_dsm", "langevin", "test_langevin", "vdm", "test_vdm", "pf_ode", "test_pf_ode")
    for cell in cells:
        grade_id = cell["metadata"].get("nbgrader", {}).get("grade_id")
        if cell["cell_type"] == "code" and grade_id in wanted:  # the visible checks run too, and must pass
            exec(compile("".join(cell["source"]).replace("grading.probe(", "__record__("), grade_id, "exec"), namespace)
    return namespace, recorded


def test_hw6_score_judges_pass_the_reference_and_fail_the_classic_mistakes():
    """hw6's judges of Parts 5-8 pass the solution's own code at several secret seeds, and fail, each with a reason
    that names the formula, the mistakes a student makes: denoising score matching without the sigma^2 weight (or
    with the score at the clean x), Langevin steps whose size is not scaled by sigma_i^2 / sigma_L^2, the VDM loss
    without gamma'(t) (or with a finite-difference gamma' over the whole interval, right only for a linear gamma),
    and the PF-ODE likelihood without its divergence integral (or with N(0, I) in place of the exact p_1)."""
    import math

    ns, probes = _hw6_score_parts()
    judges = load_judges(ROOT / "solutions" / "hw6_diffusion" / "judge.py")
    assert set(probes) == {"test_dsm", "test_langevin", "test_vdm", "test_pf_ode"}
    for grade_id, exposed in probes.items():
        for seed in (0, 1, 2):
            assert judge_locally(judges[grade_id], exposed, seed=seed) == (True, "passed"), (grade_id, seed)
    Field, schedule, VPSDE, pf_dynamics = ns["Field"], ns["schedule"], ns["VPSDE"], ns["pf_dynamics"]

    def per_example(sigma, x):
        return sigma.to(x).reshape((-1,) + (1,) * (x.dim() - 1))

    def dsm_unweighted(score_fn, x, sigma, noise):  # 1/2 |s + eps / sigma|^2: the loss of level sigma, unweighted
        s = per_example(sigma, x)
        return 0.5 * (score_fn(x + s * noise, sigma) + noise / s).pow(2).flatten(1).sum(1)

    def dsm_clean(score_fn, x, sigma, noise):  # the score at the clean x
        s = per_example(sigma, x)
        return 0.5 * (s * score_fn(x, sigma) + noise).pow(2).flatten(1).sum(1)

    def langevin_unscaled(score, x, sigma, sigma_min, epsilon, noise):  # alpha = epsilon at every level
        return x + 0.5 * epsilon * score + math.sqrt(epsilon) * noise

    def vdm_no_derivative(eps_fn, gamma_fn, x, t, noise):
        g = per_example(gamma_fn(t), x)
        z = torch.sigmoid(-g).sqrt() * x + torch.sigmoid(g).sqrt() * noise
        return 0.5 * (noise - eps_fn(z, gamma_fn(t))).pow(2).flatten(1).sum(1)

    def vdm_secant(eps_fn, gamma_fn, x, t, noise):  # gamma(1) - gamma(0) in place of gamma'(t)
        slope = gamma_fn(torch.ones_like(t)) - gamma_fn(torch.zeros_like(t))
        return vdm_no_derivative(eps_fn, gamma_fn, x, t, noise) * slope

    def log_prob(mu, s2, x, sde, divergence=True, exact_prior=True):
        mu, x = mu.to(torch.float64), x.to(torch.float64)

        def rhs(t, state):
            velocity, div = pf_dynamics(mu, s2, sde, t, state[:, :-1])
            return torch.cat([velocity, div[:, None] if divergence else torch.zeros_like(div)[:, None]], 1)

        final = ns["torchdiffeq"].odeint(rhs, torch.cat([x, x.new_zeros(len(x), 1)], 1),
                                         torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-8)[-1]
        z, integral = final[:, :-1], final[:, -1]
        alpha, sigma = sde.alpha_sigma(torch.ones(1, dtype=torch.float64))
        mean, v = (alpha * mu, alpha ** 2 * s2 + sigma ** 2) if exact_prior else (0 * mu, torch.ones(1, dtype=torch.float64))
        return -0.5 * (z - mean).pow(2).sum(1) / v - 0.5 * x.shape[1] * torch.log(2 * math.pi * v) + integral

    wrong = [
        ("test_dsm", {"dsm_loss_of": lambda spec, x, sigma, noise: dsm_unweighted(Field(**spec), x, sigma, noise)},
         "1/2 |sigma s(x + sigma eps, sigma) + eps|^2"),
        ("test_dsm", {"dsm_loss_of": lambda spec, x, sigma, noise: dsm_clean(Field(**spec), x, sigma, noise)},
         "1/2 |sigma s(x + sigma eps, sigma) + eps|^2"),
        ("test_langevin", {"annealed_langevin_step": langevin_unscaled}, "alpha_i = epsilon sigma_i^2 / sigma_L^2"),
        ("test_vdm", {"vdm_loss_of": lambda e, g, x, t, noise: vdm_no_derivative(Field(**e), schedule(g), x, t, noise)},
         "1/2 gamma'(t)"),
        ("test_vdm", {"vdm_loss_of": lambda e, g, x, t, noise: vdm_secant(Field(**e), schedule(g), x, t, noise)},
         "1/2 gamma'(t)"),
        ("test_pf_ode", {**probes["test_pf_ode"], "pf_ode_log_prob_of":
                         lambda mu, s2, x, betas: log_prob(mu, s2, x, VPSDE(*betas), divergence=False)},
         "log p_0(x) from the probability-flow ODE"),
        ("test_pf_ode", {**probes["test_pf_ode"], "pf_ode_log_prob_of":
                         lambda mu, s2, x, betas: log_prob(mu, s2, x, VPSDE(*betas), exact_prior=False)},
         "log p_0(x) from the probability-flow ODE"),
        ("test_pf_ode", {**probes["test_pf_ode"], "pf_dynamics_of":  # the divergence left out of the dynamics
                         lambda mu, s2, betas, t, x: (pf_dynamics(mu, s2, VPSDE(*betas), t, x)[0], torch.zeros(len(x)))},
         "the divergence of the velocity"),
    ]
    for grade_id, exposed, reason in wrong:
        for seed in (0, 1, 2):
            passed, message = judge_locally(judges[grade_id], exposed, seed=seed)
            assert not passed and reason in message, (grade_id, seed, message)


def _hw7_parts() -> tuple[dict, dict]:
    """hw7's Parts 1-6 (no training) as the solution notebook runs them: the setup, fields, solution and test cells,
    each test cell's ``grading.probe`` recording what it exposes. Returns the namespace and grade_id -> exposed."""
    import json

    recorded: dict = {}
    namespace = {"__name__": "hw7_parts", "__record__": lambda name, **exposed: recorded.__setitem__(name, exposed)}
    cells = json.loads((ROOT / "solutions" / "hw7_flow_matching" / "hw7_flow_matching.ipynb").read_text())["cells"]
    wanted = ("setup", "fields", "path", "test_ot_path", "cfm", "test_cfm", "euler", "test_euler", "heun", "test_heun",
              "guidance", "test_guidance", "reflow", "test_reflow")
    for cell in cells:
        grade_id = cell["metadata"].get("nbgrader", {}).get("grade_id")
        if cell["cell_type"] == "code" and grade_id in wanted:  # the visible checks run too, and must pass
            exec(compile("".join(cell["source"]).replace("grading.probe(", "__record__("), grade_id, "exec"), namespace)
    return namespace, recorded


def test_hw7_judges_pass_the_reference_and_fail_the_classic_mistakes():
    """hw7's judges of Parts 1-6 pass the solution's own code at several secret seeds, and fail, each with a reason
    that names the formula, the mistakes a student makes: the path's target without sigma_min or with its sign
    flipped, a CFM loss with the wrong sign, without sigma_min in the target or averaged over the pixels, Euler
    evaluating the field at the end of its step, Heun without its corrector or with the corrector at the old time,
    the guidance weights swapped (or the conditional field returned whatever w), a guided field that never asks for
    the empty label, reflow pairs with fresh noise on either side, a reflow loss with sigma_min > 0, and a
    straightness measured against the wrong displacement."""
    ns, probes = _hw7_parts()
    judges = load_judges(ROOT / "solutions" / "hw7_flow_matching" / "judge.py")
    assert set(probes) == {"test_ot_path", "test_cfm", "test_euler", "test_heun", "test_guidance", "test_reflow"}
    for grade_id, exposed in probes.items():
        for seed in (0, 1, 2):
            assert judge_locally(judges[grade_id], exposed, seed=seed) == (True, "passed"), (grade_id, seed)
    ot_path, make_field, make_cond_field = ns["ot_path"], ns["make_field"], ns["make_cond_field"]
    heun_sample, guided_velocity, cfm_loss = ns["heun_sample"], ns["guided_velocity"], ns["cfm_loss"]

    def times(x, t):
        return torch.full((len(x),), t, dtype=x.dtype)

    def cfm_with(target, reduce="sum"):  # a CFM loss whose target is target(x0, x1, sigma_min)
        def loss(velocity_fn, x0, x1, t, sigma_min):
            x_t, _ = ot_path(x0, x1, t, sigma_min)
            squares = (velocity_fn(x_t, t) - target(x0, x1, sigma_min)).pow(2).flatten(1)
            return squares.sum(1) if reduce == "sum" else squares.mean(1)
        return {"cfm_loss_of": lambda spec, x0, x1, t, s: loss(make_field(spec), x0, x1, t, s),
                "cfm_grad_of": ns["cfm_grads"]}

    def euler_late(velocity_fn, x0, num_steps, t_end=1.0):  # the field at the end of the step
        h, x = t_end / num_steps, x0
        for k in range(num_steps):
            x = x + h * velocity_fn(x, times(x, (k + 1) * h))
        return x

    def heun_no_corrector(velocity_fn, x0, num_steps, t_end=1.0):
        h, x = t_end / num_steps, x0
        for k in range(num_steps):
            x = x + h * velocity_fn(x, times(x, k * h))
        return x

    def heun_old_time(velocity_fn, x0, num_steps, t_end=1.0):  # the corrector's field at t_k, not t_(k+1)
        h, x = t_end / num_steps, x0
        for k in range(num_steps):
            v = velocity_fn(x, times(x, k * h))
            x = x + 0.5 * h * (v + velocity_fn(x + h * v, times(x, k * h)))
        return x

    def sampler(name, fn):
        return {f"{name}_of": lambda spec, x0, n, t_end: fn(make_field(spec), x0, n, t_end)}

    def guidance(combine, ask_empty=True):
        def field_of(spec, labels, w, x, t):
            velocity = make_cond_field(spec)
            return combine(velocity(x, t, labels), velocity(x, t, None if ask_empty else labels), w)
        return {"guided_velocity": combine, "guided_field_of": field_of}

    def swapped(v_cond, v_uncond, w):
        return v_cond + w * (v_uncond - v_cond)

    def pairs_of(fresh_side):
        def pairs(spec, n, shape, num_steps, seed):
            g = torch.Generator().manual_seed(seed)
            x0, other = torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g)
            with torch.no_grad():
                if fresh_side == "x0":  # x0 drawn again after the noise that was integrated
                    return other, heun_sample(make_field(spec), x0, num_steps)
                return x0, heun_sample(make_field(spec), other, num_steps)
        return {**probes["test_reflow"], "reflow_pairs_of": pairs}

    def straightness_from_start(spec, x0, num_steps):  # |(x_k - x_0) - v| in place of |(x_N - x_0) - v|
        field, h, x, total = make_field(spec), 1.0 / num_steps, x0, 0
        for k in range(num_steps):
            v = field(x, times(x, k * h))
            total = total + (x - x0 - v).pow(2).flatten(1).sum(1)
            x = x + h * v
        return total / num_steps

    path_message = "u_t = x1 - (1 - sigma_min) x0"
    loss_message = "the sum over the non-batch dimensions of (v(x_t, t) - u_t)^2"
    wrong = [
        ("test_ot_path", {"ot_path": lambda x0, x1, t, s: (ot_path(x0, x1, t, s)[0], x1 - x0)}, path_message),
        ("test_ot_path", {"ot_path": lambda x0, x1, t, s: (ot_path(x0, x1, t, s)[0], (1 - s) * x0 - x1)}, path_message),
        ("test_cfm", cfm_with(lambda x0, x1, s: (1 - s) * x0 - x1), loss_message),
        ("test_cfm", cfm_with(lambda x0, x1, s: x1 - x0), loss_message),
        ("test_cfm", cfm_with(lambda x0, x1, s: x1 - (1 - s) * x0, reduce="mean"), loss_message),
        ("test_euler", sampler("euler", euler_late), "x_(k+1) = x_k + h v(x_k, t_k)"),
        ("test_heun", sampler("heun", heun_no_corrector), "x_(k+1) = x_k + h/2"),
        ("test_heun", sampler("heun", heun_old_time), "x_(k+1) = x_k + h/2"),
        ("test_guidance", guidance(swapped), "v_uncond + w (v_cond - v_uncond)"),
        ("test_guidance", guidance(lambda v_cond, v_uncond, w: v_cond), "v_uncond + w (v_cond - v_uncond)"),
        ("test_guidance", {**guidance(guided_velocity), **{"guided_field_of": guidance(guided_velocity, False)[
            "guided_field_of"]}}, "the guided field"),
        ("test_reflow", pairs_of("x0"), "drawn once"),
        ("test_reflow", pairs_of("x1"), "the pairs are the flow of the noise"),
        ("test_reflow", {**probes["test_reflow"], "reflow_loss_of": lambda spec, x0, x1, t: cfm_loss(
            make_field(spec), x0, x1, t, 0.05)}, "the reflow loss"),
        ("test_reflow", {**probes["test_reflow"], "straightness_of": straightness_from_start}, "S: the mean over k"),
    ]
    for grade_id, exposed, reason in wrong:
        for seed in (0, 1, 2):
            passed, message = judge_locally(judges[grade_id], exposed, seed=seed)
            assert not passed and reason in message, (grade_id, seed, message)


def test_hw7_model_judges_measure_the_parameters_not_the_sampler():
    """hw7's judges of the trained model load ``cond_model.net`` into the instructed U-Net and measure it there: an
    untrained network whose sampler returns real test digits of the asked labels (which the classifier reads right)
    fails the sampler's replay and the network's loss; a network of another architecture fails to load."""
    from dgmlib import data, diffusion

    judges = load_judges(ROOT / "solutions" / "hw7_flow_matching" / "judge.py")
    real, real_labels = diffusion.levels_to_unit(data.load_digits("test"), 17), data.load_digit_labels("test")

    class Lying(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def sample(self, labels, w, num_steps=10, generator=None):
            return real[[int(torch.nonzero(real_labels == int(c))[i % 20]) for i, c in enumerate(labels)]]

    torch.manual_seed(0)
    model = Lying(diffusion.UNet(1, base=16, num_classes=10))
    exposed = {"cond_model": model, "val_losses": lambda: [30.0],
               "sample_of": lambda labels, w, steps, seed: model.sample(labels, w, steps)}
    passed, message = judge_locally(judges["test_cond_sampler"], exposed)
    assert not passed and "cond_model.sample: x0 = torch.randn" in message, message
    passed, message = judge_locally(judges["test_cond_digits"], exposed)
    assert not passed and "the CFM loss of your network on the test digits" in message, message
    unconditional = Lying(diffusion.UNet(1, base=16))
    passed, message = judge_locally(judges["test_cond_digits"], {**exposed, "cond_model": unconditional})
    assert not passed and "do not fit diffusion.UNet(1, base=BASE, num_classes=10)" in message, message
