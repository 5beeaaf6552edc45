"""Every course notebook opens on Colab: the repository's address, the pinned release, the setup cell, the badges.

The course repository is named once, here (``REPOSITORY``; a fork changes that one line), and the release
that Colab installs is the tag ``v<version>`` of ``pyproject.toml``'s version (``ref``), never a moving
branch: a notebook opened from a badge is the tagged notebook, and its setup cell installs the dgmlib of
that same tag. From them this module builds the two cells that every lecture and assignment runs first:

- the **setup cell** (read-only): on Colab it installs ``dgmlib`` at the pinned tag (the slim core: torch,
  torchdiffeq, numpy, scikit-learn, matplotlib and tqdm, so Colab's own Jupyter stack is never upgraded)
  and names the GPU; anywhere else it does nothing;
- the **fast switch** (editable): ``FAST = fast_mode()``, which a student may set to ``True`` to shrink
  every training run of the notebook, or ``False`` for the full size (``dgmlib.config.set_fast_mode``);

and the "Open in Colab" badges of the README. Run from the repository root::

    python -m dgmlib.colab

to stamp every notebook (``lectures/*.ipynb``, ``solutions/*/*.ipynb``) with the current two cells as
its first code cells, rewrite the README's badges and regenerate ``assignments/`` with nbgrader. The
README's release checklist says when (after bumping the version, before tagging it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbformat import NotebookNode

REPOSITORY = "dgm-course/deep-generative-models"  # owner/name on GitHub: a fork changes this line

SETUP_ID = "colab_setup"  # the setup cell's id, and its nbgrader grade_id in solutions/
FAST_ID = "fast_switch"  # the fast switch's id (a plain, editable cell: no nbgrader metadata)
STAMP_COMMAND = "python -m dgmlib.colab"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_BADGE = re.compile(r" ?\[!\[Open in Colab\]\([^)]*\)\]\([^)]*\)")
# any Colab address of a notebook of some repository (the README's other badges, e.g. its quick start's)
_COLAB_ADDRESS = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[^/\s)]+/"
                            r"([^\s)]+\.ipynb)")
# a pip requirement of some repository at some ref (the README's install line for Colab), rewritten to the pinned one
_PIP_ADDRESS = re.compile(r"dgmlib @ git\+https://github\.com/[\w.-]+/[\w.-]+@[\w.-]+")  # the course's pip pin


def ref() -> str:
    """The git tag every notebook, badge and Colab install is pinned to: ``v`` and the project's version.

    The version is read from the ``pyproject.toml`` beside the package when there is one (a checkout,
    an editable install), else from the installed package's metadata. E.g. ``"v0.1.0"``.

    Raises:
        ValueError: if ``pyproject.toml`` names no ``version``, or there is neither one nor installed metadata.
    """
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), flags=re.M)
        if found is None:
            raise ValueError(f"{pyproject} names no version")
        return f"v{found.group(1)}"
    try:
        return f"v{importlib.metadata.version('dgmlib')}"
    except importlib.metadata.PackageNotFoundError as err:
        raise ValueError("dgmlib has no version: neither a pyproject.toml beside it nor installed metadata") from err


def pip_requirement() -> str:
    """The pip requirement that installs the course library from GitHub at the pinned tag (``ref``), e.g. on Colab.

    Raises:
        ValueError: as ``ref``.
    """
    return f"dgmlib @ git+https://github.com/{REPOSITORY}@{ref()}"


def colab_url(path: str) -> str:
    """The address that opens the repository's notebook ``path`` (relative, e.g. ``lectures/02_flows.ipynb``) on
    Colab, as it is at the pinned tag (``ref``).

    Raises:
        ValueError: for an absolute path or one that is not a notebook.
    """
    if path.startswith("/") or not path.endswith(".ipynb"):
        raise ValueError(f"expected a notebook path relative to the repository root, got {path!r}")
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/{ref()}/{path}"


def badge(path: str) -> str:
    """The markdown "Open in Colab" badge linking to the notebook ``path`` on Colab.

    Raises:
        ValueError: as ``colab_url``.
    """
    return f"[![Open in Colab]({BADGE_IMAGE})]({colab_url(path)})"


def setup_source() -> str:
    """The source of the setup cell: plain Python (no magics), silent and import-free outside Colab.

    Raises:
        ValueError: as ``ref``.
    """
    return f'''# Colab setup, stamped by `{STAMP_COMMAND}` (do not edit by hand). On Google Colab it installs
# the course library (release {ref()}) and names the GPU; anywhere else (JupyterLab, CI, grading) it does nothing.
import sys

if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "{pip_requirement()}"], check=True)
    import torch

    if torch.cuda.is_available():
        print("GPU:", torch.cuda.get_device_name(0))
    else:
        print("No GPU. To get one: Runtime → Change runtime type → a GPU, then run the notebook again.")'''


def fast_source() -> str:
    """The source of the fast switch, the cell after the setup cell: ``FAST = fast_mode()``, editable.

    Raises nothing.
    """
    return '''# The fast switch. FAST = True shrinks every training run below (a few epochs, small networks: a quick
# check, with poor numbers and samples); FAST = False runs the full size (minutes per model on a GPU, longer
# on a CPU). The default comes from the environment variable DGM_FAST (unset: the full size).
from dgmlib.config import fast_mode, set_fast_mode

FAST = fast_mode()  # or FAST = True
FAST = set_fast_mode(FAST)  # under dgm grade, the grader's mode'''


def is_fast_switch(source: str) -> bool:
    """Whether ``source`` is the fast switch (``fast_source``) and nothing more: its code lines, comments and blank
    lines aside, are the template's, with ``FAST`` set to ``True``, ``False`` or ``fast_mode()``. The grader uses it
    on submissions, so a cell that merely starts with the switch's comment is not one.

    Raises nothing.
    """
    def code(text: str) -> list[str]:
        lines = [" ".join(line.split("#")[0].split()) for line in text.splitlines()]
        return [re.sub(r"^FAST = (True|False|fast_mode\(\))$", "FAST = ?", line) for line in lines if line]
    return code(source) == code(fast_source())


def fast_cell() -> NotebookNode:
    """The editable fast switch (``fast_source``); in solutions/ too it has no nbgrader metadata, so a student's
    choice is kept (``dgm grade`` grades in fast mode whatever it says, see ``dgmlib.config.set_fast_mode``).

    Raises nothing.
    """
    cell = nbformat.v4.new_code_cell(fast_source())
    cell.id = FAST_ID
    return cell


def is_fast_cell(cell: NotebookNode) -> bool:
    """Whether ``cell`` is a fast switch stamped by this module (any version of it).

    Raises nothing.
    """
    return cell.cell_type == "code" and (cell.get("id") == FAST_ID or cell.source.startswith("# The fast switch."))


def setup_cell(graded: bool) -> NotebookNode:
    """The read-only setup cell; ``graded`` adds the nbgrader metadata of a locked cell (for solutions/).

    Raises nothing.
    """
    metadata: dict[str, object] = {"deletable": False, "editable": False}
    if graded:
        metadata["nbgrader"] = {"grade": False, "grade_id": SETUP_ID, "locked": True, "schema_version": 3,
                                "solution": False, "task": False}
    cell = nbformat.v4.new_code_cell(setup_source(), metadata=metadata)
    cell.id = SETUP_ID
    return cell


def is_setup_cell(cell: NotebookNode) -> bool:
    """Whether ``cell`` is a setup cell stamped by this module (any version of it).

    Raises nothing.
    """
    return cell.cell_type == "code" and (cell.get("id") == SETUP_ID or STAMP_COMMAND in cell.source
                                         or cell.metadata.get("nbgrader", {}).get("grade_id") == SETUP_ID)


def stamped(nb: NotebookNode, graded: bool) -> NotebookNode:
    """A copy of ``nb`` whose first two code cells are the current setup cell and fast switch; every other cell is
    kept as it is.

    Older versions of the two cells are replaced, missing ones inserted before the first code cell.

    Raises:
        ValueError: as ``ref``.
    """
    nb = nbformat.from_dict(nb)  # a deep copy
    cells = [cell for cell in nb.cells if not is_setup_cell(cell) and not is_fast_cell(cell)]
    first_code = next((i for i, cell in enumerate(cells) if cell.cell_type == "code"), len(cells))
    nb.cells = cells[:first_code] + [setup_cell(graded), fast_cell()] + cells[first_code:]
    return nb


def stamp_notebook(path: Path, graded: bool) -> bool:
    """Stamp the notebook file at ``path`` in place (see ``stamped``); return whether it changed.

    Raises:
        OSError: if the file cannot be read or written. nbformat.ValidationError: for an invalid notebook.
    """
    before = path.read_text(encoding="utf-8")
    nb = stamped(nbformat.reads(before, as_version=4), graded)
    nbformat.validate(nb)
    after = nbformat.writes(nb) + "\n"
    if after == before:
        return False
    path.write_text(after, encoding="utf-8")
    return True


def readme_with_badges(readme: str, notebooks: Sequence[str]) -> str:
    """``readme`` with exactly one Colab badge after the syllabus link of each notebook in ``notebooks``.

    The syllabus is the section from the ``## Syllabus`` heading to the next ``## `` heading; each
    path (e.g. ``assignments/hw2_flows/hw2_flows.ipynb``) must be linked there as ``[`name`](path)``.
    Badges of notebooks not listed (e.g. removed ones) are dropped; topics without a link get none.
    Every other Colab address in ``readme`` (such as the quick start's badge of lecture 01) is rewritten to
    ``colab_url`` of the same notebook, and every ``dgmlib @ git+https://github.com/OWNER/NAME@REF`` to the
    pinned requirement (``pip_requirement``), so that a fork's README, or a new release's, points at the fork and the new tag.

    Raises:
        ValueError: if the README has no syllabus section, or a notebook has no link in it.
    """
    match = re.search(r"^## Syllabus\n.*?(?=^## |\Z)", readme, flags=re.M | re.S)
    if match is None:
        raise ValueError("README.md has no '## Syllabus' section")
    section = _BADGE.sub("", match.group(0))
    missing = []
    for path in notebooks:
        link = f"[`{Path(path).stem}`]({path})"
        if link not in section:
            missing.append(link)
        section = section.replace(link, f"{link} {badge(path)}", 1)
    if missing:
        raise ValueError(f"README.md's syllabus does not link {', '.join(missing)}: add a link, then run again")

    def current(found: re.Match) -> str:
        return colab_url(found.group(1))

    def pinned(part: str) -> str:
        return _PIP_ADDRESS.sub(pip_requirement(), _COLAB_ADDRESS.sub(current, part))

    before, after = (pinned(part) for part in (readme[:match.start()], readme[match.end():]))
    return before + section + after


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dgmlib.colab [--root DIR]``: stamp the notebooks, rewrite the README's badges, regenerate.

    Everything is pinned to ``ref()`` (the tag ``v<version>``). Stamps ``lectures/*.ipynb`` and ``solutions/*/*.ipynb``, runs ``nbgrader generate_assignment HW
    --force`` for every ``solutions/HW`` from ``root``, then writes README.md's syllabus badges (one per
    lecture and per assignment). Returns 0.

    Raises:
        FileNotFoundError: if ``root`` has no README.md, lectures/ or solutions/.
        ValueError: as ``readme_with_badges`` (checked before anything is written).
        subprocess.CalledProcessError: if nbgrader fails.
    """
    parser = argparse.ArgumentParser(prog=STAMP_COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    root = parser.parse_args(argv).root.resolve()
    for needed in ("README.md", "lectures", "solutions"):
        if not (root / needed).exists():
            raise FileNotFoundError(f"{root / needed} not found: run from the repository root or pass --root")
    lectures = sorted((root / "lectures").glob("*.ipynb"))
    homework = sorted(p.name for p in (root / "solutions").iterdir() if (p / f"{p.name}.ipynb").is_file())
    readme_path = root / "README.md"
    readme = readme_with_badges(readme_path.read_text(encoding="utf-8"),
                                [f"lectures/{p.name}" for p in lectures]
                                + [f"assignments/{hw}/{hw}.ipynb" for hw in homework])
    for path, graded in [(p, False) for p in lectures] + [(root / "solutions" / hw / f"{hw}.ipynb", True)
                                                          for hw in homework]:
        print(("stamped  " if stamp_notebook(path, graded) else "current  ") + str(path.relative_to(root)))
    for hw in homework:
        proc = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", hw, "--force"], cwd=root,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout + proc.stderr)
            proc.check_returncode()
        print(f"released assignments/{hw}/{hw}.ipynb")
    if readme != readme_path.read_text(encoding="utf-8"):
        readme_path.write_text(readme, encoding="utf-8")
    print(f"README.md: Colab badges for {len(lectures)} lectures and {len(homework)} assignments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
