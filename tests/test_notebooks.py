"""Every lecture notebook runs in fast mode and shows figures; every notebook is committed stripped."""

from pathlib import Path

import nbformat
import pytest

from dgmlib.site import executed_notebook

ROOT = Path(__file__).resolve().parents[1]
SITE_CACHE = ROOT / "build" / "site-cache"
LECTURES = sorted((ROOT / "lectures").glob("*.ipynb"))
ALL_NOTEBOOKS = sorted(p for d in ("lectures", "solutions", "assignments") for p in (ROOT / d).rglob("*.ipynb")
                       if ".ipynb_checkpoints" not in p.parts)


def test_there_are_notebooks():
    assert LECTURES and ALL_NOTEBOOKS


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.name)
def test_lecture_has_no_copied_training_loop(path):
    """Training loops belong in dgmlib.train.fit, not in notebooks."""
    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    for loop_marker in (".backward(", "optimizer.step(", "torch.optim."):
        assert loop_marker not in source, f"{path.name} contains {loop_marker!r}; call dgmlib.train.fit"


@pytest.mark.notebook
@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.name)
def test_lecture_executes_and_shows_figures(path, tmp_path):
    """Executed in fast mode every time (``refresh``); the result stays in the site's cache (``build/site-cache``), from
    which ``dgm site`` and ``test_site`` take the outputs instead of executing the lecture again."""
    nb, _ = executed_notebook(path, SITE_CACHE, "fast", timeout=300, cwd=tmp_path, refresh=True)
    figures = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {}))
    assert figures >= 5, f"{path.name} shows only {figures} figures"
