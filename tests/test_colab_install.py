"""The setup cell's Colab branch, run for real: a fresh environment without dgmlib installs the course and trains.

What Colab gives a notebook is stood in for, offline:

- a fresh virtual environment without dgmlib, whose only packages are the core's dependency closure
  (torch, torchdiffeq, numpy, scikit-learn, matplotlib, tqdm and what they need), linked from this
  environment, plus pip and setuptools to install with; no nbgrader, Jupyter or Sphinx;
- a stand-in ``google.colab`` module, imported first as Colab's kernel does;
- the setup cell's pip requirement pointed at a copy of this checkout, pip kept offline (``PIP_NO_INDEX``).

Then the first cells of a lecture and of an assignment run in that environment, as the stamped notebook
has them (setup cell, fast switch, imports), and one short training runs. If the core's dependencies
miss something the lectures or the assignments import, the install or the imports fail here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from dgmlib import colab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["lectures/02_flows.ipynb", "assignments/hw2_flows/hw2_flows.ipynb"]
TOOLS = ["pip", "setuptools", "wheel", "packaging"]  # to install with, as every Colab runtime has


def _closure(names: list[str]) -> set[str]:
    """The installed distributions that ``names`` need, with their dependencies (markers evaluated, no extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform package (e.g. CUDA's on a CPU build): pip will say if it was needed
        name = dist.metadata["Name"].lower()
        if name not in seen:
            seen.add(name)
            todo += dist.requires or []
    return seen


def _link_distributions(names: set[str], site: Path) -> None:
    """Link each distribution's top-level files and its metadata folder into ``site`` (one folder on sys.path)."""
    site.mkdir(parents=True)
    for name in sorted(names):
        dist = metadata.distribution(name)
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}
        for top in sorted(tops):
            if not (site / top).exists() and (base / top).exists():
                (site / top).symlink_to(base / top)


def _core_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


@pytest.mark.slow
def test_the_setup_cell_installs_the_course_on_colab(tmp_path):
    checkout = tmp_path / "checkout"  # what `pip install git+https://...@TAG` would fetch: the tracked package
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    shutil.copytree(ROOT / "dgmlib", checkout / "dgmlib", ignore=shutil.ignore_patterns("__pycache__"))

    core = _closure(_core_requirements())
    assert not core & {"nbgrader", "jupyterlab", "ipykernel", "notebook", "tornado", "copydetect", "sphinx"}, core
    _link_distributions(core | _closure(TOOLS), tmp_path / "site")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "colab_standin.pth").write_text(f"{tmp_path / 'site'}\n{tmp_path / 'standin'}\n")
    (tmp_path / "standin" / "google" / "colab").mkdir(parents=True)
    (tmp_path / "standin" / "google" / "colab" / "__init__.py").write_text('"""A stand-in for Colab\'s module."""\n')

    cells = []
    for path in NOTEBOOKS:
        nb = json.loads((ROOT / path).read_text())
        code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
        assert code[0] == colab.setup_source() and code[1] == colab.fast_source(), f"{path}: run python -m dgmlib.colab"
        assert colab.pip_requirement() in code[0]
        cells.append((path, [code[0].replace(colab.pip_requirement(), f"dgmlib @ {checkout.as_uri()}"), *code[1:3]]))
    script = textwrap.dedent(f"""
        import importlib, importlib.util, json, math, sys, time
        import google.colab  # Colab's kernel has imported it before the first cell runs
        assert importlib.util.find_spec("dgmlib") is None, "dgmlib is importable before the setup cell ran"
        for name in ("nbgrader", "jupyterlab", "copydetect", "sphinx"):
            assert importlib.util.find_spec(name) is None, name + " is in the stand-in runtime"
        for path, cells in json.loads(sys.argv[1]):
            namespace = {{"__name__": "__main__"}}
            start = time.perf_counter()
            for source, step in zip(cells, ("setup cell", "fast switch", "imports")):
                exec(compile(source, path, "exec"), namespace)
                importlib.invalidate_caches()
                print(f"{{path}}: {{step}} {{time.perf_counter() - start:.1f}} s")
                start = time.perf_counter()
            print(f"{{path}}: FAST = {{namespace['FAST']}}")
            exec(compile('''
        digits = data.load_image_data("digits")
        torch.manual_seed(0)
        model = flows.realnvp(digits.shape, num_couplings=2, hidden=8, num_levels=digits.num_levels)
        history = train.fit(model, digits.train[:128], digits.val[:64], epochs=1, progress=False)
        assert math.isfinite(history.train_loss[-1]) and math.isfinite(history.val_loss[-1])
        ''', path + " (one fast step)", "exec"), namespace)
            print(f"{{path}}: one epoch, train loss {{namespace['history'].train_loss[-1]:.1f}} nats")
        import dgmlib
        print("dgmlib from", dgmlib.__file__)
    """)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "DGM_FAST": "1",
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([python, "-c", script, json.dumps(cells)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout)  # what was installed and how long each step took (pytest -s)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"dgmlib from {purelib}" in proc.stdout, proc.stdout  # the installed copy, not the checkout
    assert proc.stdout.count("one epoch") == len(NOTEBOOKS), proc.stdout
    # the setup cell installed dgmlib and nothing else: Colab's own packages (here the core's, already there) are
    # left as they are, never upgraded or reinstalled
    installed = sorted(p.name.split("-")[0] for p in Path(purelib).glob("*.dist-info"))
    print("installed by the setup cell:", installed)
    assert installed == ["dgmlib"], installed
