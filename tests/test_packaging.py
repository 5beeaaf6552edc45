"""The install story: pyproject and environment.yml agree, CI runs what the README says."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements):
    return {re.split(r"[<>=!~ \[]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def _expanded(project: dict, extra: str) -> list[str]:
    """The requirements of ``extra``, with ``dgmlib[a,b]`` replaced by the extras it names."""
    found = []
    for r in project["optional-dependencies"][extra]:
        if r.startswith("dgmlib["):
            for inner in r[len("dgmlib["):-1].split(","):
                found += _expanded(project, inner)
        else:
            found.append(r)
    return found


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = {r.replace(" ", "") for r in project["dependencies"] + _expanded(project, "dev")}
    pip_section = (ROOT / "environment.yml").read_text().split("- pip:", 1)[1]
    listed = {line.strip()[2:].replace(" ", "") for line in pip_section.splitlines()
              if line.strip().startswith("- ") and not line.strip().startswith("- -e")}
    assert listed == expected, f"environment.yml and pyproject.toml differ: {listed ^ expected}"
    assert "-e ." in pip_section
    # the course's own environment keeps the libraries of the design: ODEs, grading, data, plots, progress, notebooks
    for needed in ("torch", "torchdiffeq", "matplotlib", "nbgrader", "jupyterlab", "scikit-learn", "tqdm",
                   "ipykernel", "nbclient", "copydetect"):
        assert needed in _names(listed)
    assert project["scripts"]["dgm"] == "dgmlib.cli:main"


def test_the_core_install_is_slim():
    """`pip install dgmlib` (Colab's setup cell) brings what lectures and assignments import, never a Jupyter stack."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) == {"torch", "torchdiffeq", "numpy", "scikit-learn", "matplotlib", "tqdm", "pot"}
    grade = _names(_expanded(project, "grade"))
    assert {"nbgrader", "jupyterlab", "ipykernel", "copydetect"} <= grade
    assert {"sphinx", "myst-nb", "sphinx-book-theme"} <= _names(_expanded(project, "site"))
    assert {"pytest", "nbgrader", "sphinx"} <= _names(_expanded(project, "dev"))


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install -e ".[dev]"'
    assert install in readme
    # CI installs the project the README's way; its torch pin (explained in .ci/run) is CI's alone.
    assert re.search(r'^python3 -m pip install [^\n]*-e "\.\[dev\]"', ci, flags=re.M)
    assert "python3 -m pytest" in ci and "pytest" in readme
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "torch==" not in readme, "the README gives PyTorch's CPU index, not CI's pin"


def test_every_package_is_installed():
    """A non-editable install (pip install from git, as on Colab) ships every dgmlib subpackage."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dgmlib").rglob("__init__.py")}
    assert listed == on_disk


def test_readme_lists_the_layout_and_syllabus():
    readme = (ROOT / "README.md").read_text()
    for folder in ("dgmlib/", "lectures/", "solutions/", "assignments/", "tests/", "benchmarks/"):
        assert folder in readme
    for nb in (ROOT / "lectures").glob("*.ipynb"):
        assert nb.stem in readme
    for hw in (ROOT / "solutions").iterdir():
        assert hw.name in readme
    for cmd in ("generate_assignment", "autograde", "generate_feedback", "export", "nbgrader validate",
                "dgm train realnvp", "dgm grade", "bubblewrap", "dgm site"):
        assert cmd in readme


def test_gradebook_is_ignored():
    assert "gradebook.db" in (ROOT / ".gitignore").read_text()
    assert "gradebook.db" in (ROOT / "nbgrader_config.py").read_text()
