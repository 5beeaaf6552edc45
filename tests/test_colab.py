"""Every notebook opens on Colab: the stamped setup cell and fast switch, the pinned release, the README's badges,
one place for the address.

Fast: no network, no notebook execution. A stale notebook (stamped for another repository or another release)
fails here; `python -m dgmlib.colab` makes it pass again. tests/test_colab_install.py runs the Colab branch for real.
"""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
import sys
import types
from pathlib import Path

import nbformat
import pytest

from dgmlib import colab

ROOT = Path(__file__).resolve().parents[1]
LECTURES = sorted((ROOT / "lectures").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*/*.ipynb"))
ASSIGNMENTS = sorted((ROOT / "assignments").glob("*/*.ipynb"))
NOTEBOOKS = LECTURES + SOLUTIONS + ASSIGNMENTS


def _first_code_cell(path: Path):
    return next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def test_there_are_notebooks():
    assert LECTURES and SOLUTIONS and len(ASSIGNMENTS) == len(SOLUTIONS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_first_code_cells_are_the_current_setup_cell_and_fast_switch(path):
    cell = _first_code_cell(path)
    assert cell.source == colab.setup_source(), f"{path.name}: stale or missing setup cell; run python -m dgmlib.colab"
    assert cell.metadata.get("editable") is False and cell.metadata.get("deletable") is False
    if path in SOLUTIONS or path in ASSIGNMENTS:
        meta = cell.metadata["nbgrader"]
        assert meta["grade_id"] == colab.SETUP_ID and meta["locked"] and not meta["grade"] and not meta["solution"]
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    switch = code[1]
    assert switch.source == colab.fast_source(), f"{path.name}: stale or missing fast switch; run python -m dgmlib.colab"
    assert "nbgrader" not in switch.metadata and switch.metadata.get("editable", True)  # the student may change it
    assert re.search(r"^FAST = ", switch.source, flags=re.M)
    assert sum(colab.is_fast_cell(c) for c in code) == 1


def test_the_fast_switch_sets_the_mode(monkeypatch):
    from dgmlib import config

    monkeypatch.delenv("DGM_FAST", raising=False)
    monkeypatch.delenv("DGM_FAST_LOCKED", raising=False)
    namespace: dict = {}
    exec(colab.fast_source(), namespace)
    assert namespace["FAST"] is False and not config.fast_mode()
    exec(colab.fast_source().replace("FAST = fast_mode()", "FAST = True"), namespace)  # what a student writes
    assert config.fast_mode() and config.pick(full=100, fast=3) == 3
    with pytest.raises(TypeError, match="True or False"):
        config.set_fast_mode("no")
    # under dgm grade the class's mode stays, whatever the notebook asks
    monkeypatch.setenv("DGM_FAST", "1")
    monkeypatch.setenv("DGM_FAST_LOCKED", "1")
    with pytest.warns(RuntimeWarning, match="being graded"):
        assert config.set_fast_mode(False) is True
    assert config.fast_mode()


def test_everything_is_pinned_to_the_release_tag():
    """The setup cells install, and the badges open, the tag of pyproject's version: never a moving branch."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert colab.ref() == f"v{version}"
    assert colab.pip_requirement().endswith(f"@v{version}")
    readme = (ROOT / "README.md").read_text()
    addresses = re.findall(r"https://colab\.research\.google\.com/github/[^\s)]+", readme)
    assert addresses and all(f"/blob/v{version}/" in a for a in addresses), "run python -m dgmlib.colab"
    assert "@main" not in colab.setup_source() and "/blob/main/" not in readme
    # the site's badges and launch buttons are colab_url's (test_site checks every page has its own)
    assert all(f"/blob/v{version}/{p.relative_to(ROOT).as_posix()}" in colab.colab_url(p.relative_to(ROOT).as_posix())
               for p in NOTEBOOKS)
    pins = {m for path in [*NOTEBOOKS, ROOT / "README.md"]
            for m in re.findall(r"deep-generative-models@([\w.-]+)", path.read_text())}
    assert pins == {f"v{version}"}, pins


def test_stamping_is_idempotent_and_keeps_the_other_cells():
    nb = nbformat.read(SOLUTIONS[0], as_version=4)
    again = colab.stamped(nb, graded=True)
    assert nbformat.writes(again) == nbformat.writes(nb)
    without = nbformat.from_dict(nb)
    without.cells = [c for c in without.cells if not colab.is_setup_cell(c) and not colab.is_fast_cell(c)]
    assert len(without.cells) == len(nb.cells) - 2
    assert nbformat.writes(colab.stamped(without, graded=True)) == nbformat.writes(nb)


def test_setup_cell_is_plain_readable_python():
    source = colab.setup_source()
    ast.parse(source)  # no ! or % magics: the grader parses cells with ast
    lines = source.splitlines()
    assert len(lines) <= 15
    assert any(line.startswith("#") and "Colab" in line for line in lines[:3])
    assert colab.STAMP_COMMAND in source
    assert colab.pip_requirement() in source and colab.REPOSITORY in colab.pip_requirement()


def test_setup_cell_does_nothing_outside_colab(monkeypatch, capsys):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("the setup cell ran a subprocess outside Colab")

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    namespace: dict = {}
    exec(colab.setup_source(), namespace)
    assert capsys.readouterr().out == ""
    assert set(namespace) - {"__builtins__"} == {"sys"}  # it imported nothing but sys


def test_setup_cell_installs_the_course_on_colab(monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    exec(colab.setup_source(), {})
    requirement = f"dgmlib @ git+https://github.com/{colab.REPOSITORY}@{colab.ref()}"
    assert calls == [(([sys.executable, "-m", "pip", "install", "-q", requirement],), {"check": True})]
    out = capsys.readouterr().out
    assert out.startswith("GPU:") or "Runtime → Change runtime type" in out


def test_readme_has_a_colab_badge_for_each_lecture_and_assignment():
    readme = (ROOT / "README.md").read_text()
    paths = [p.relative_to(ROOT).as_posix() for p in LECTURES + ASSIGNMENTS]
    for path in paths:
        assert readme.count(colab.badge(path)) == 1, f"README.md: no single Colab badge for {path}"
        assert colab.colab_url(path).startswith(f"https://colab.research.google.com/github/{colab.REPOSITORY}/")
    assert readme.count("[![Open in Colab]") == len(paths)
    assert colab.readme_with_badges(readme, paths) == readme  # what python -m dgmlib.colab writes


def test_readme_badges_are_rewritten_for_a_fork(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    paths = [p.relative_to(ROOT).as_posix() for p in LECTURES + ASSIGNMENTS]
    original = colab.REPOSITORY
    monkeypatch.setattr(colab, "REPOSITORY", "someone/fork")
    forked = colab.readme_with_badges(readme, paths)
    assert "someone/fork" in forked and forked.count("[![Open in Colab]") == len(paths)
    assert original not in forked  # the quick start's badge of lecture 01 too
    with pytest.raises(ValueError, match="does not link"):
        colab.readme_with_badges(readme, paths + ["lectures/99_missing.ipynb"])


def test_the_address_is_written_in_one_place():
    """Only dgmlib/colab.py names the repository; the stamped notebooks and README are its output."""
    try:
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    allowed = {"README.md", "dgmlib/colab.py"} | {p.relative_to(ROOT).as_posix() for p in NOTEBOOKS}
    for name in files:
        path = ROOT / name
        if name in allowed or not path.is_file():
            continue
        assert colab.REPOSITORY not in path.read_text(errors="ignore"), \
            f"{name} names {colab.REPOSITORY!r}: build the address from dgmlib.colab instead"
