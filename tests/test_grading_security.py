"""Trustworthy autograding: the checks, the tamper detection and the sandbox, one mechanism at a time.

The end-to-end grading of a class under attack is in ``test_grading_pipeline.test_grading_a_class``:
each assignment's honest, partial and broken submissions and its attackers are graded in one
``dgm grade`` pass (the class is in ``classroom_cases``).
"""

from __future__ import annotations

import copy
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
from dgmlib.grading import classroom, sandbox

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
