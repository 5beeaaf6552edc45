"""``dgm site``: the course website, every lecture with its figures, built without running anything twice.

The site is built with **Sphinx and MyST-NB**, the engine underneath Jupyter Book 1 (whose successor, Jupyter Book 2,
moved to the Node-based ``mystmd``), with **sphinx-book-theme**, Jupyter Book 1's own theme: a navigation sidebar that
stays in view, the page's contents ("on this page"), previous/next links, search, a Colab launch button on every
notebook page (the address of ``dgmlib.colab``), a download button, copy buttons on code (sphinx-copybutton) and a
footer naming the licence and the repository. All install from PyPI as the ``site`` extra and render the outputs
stored in a notebook without executing it (``nb_execution_mode = "off"``); Sphinx's autodoc (with napoleon for our
"Args:/Returns:/Raises:" sections) gives the API reference from dgmlib's docstrings, whose ``:math:`` roles and
``.. math::`` blocks are typeset. MathJax (2) is served from the site itself (the copy that ``jupyter-server-mathjax``
ships), so the equations are typeset offline too.

**Outputs.** Lectures are committed without outputs. ``executed_notebook`` runs a notebook once with nbclient and keeps
the result in a cache keyed on the notebook's bytes, every source file of dgmlib and the mode (fast or full); the
lecture tests execute through it (``tests/test_notebooks.py``), so in CI the site reuses the notebooks the test suite
has just executed, and a stale entry is never used. The kernel draws with matplotlib's inline backend whatever
``MPLBACKEND`` this process has, and an execution that shows fewer figures than its code drew is refused
(``LostFiguresError``) and never cached. Each lecture page says which execution produced its outputs (mode, device,
date). The published site is executed in full mode (``dgm site --mode full``, ``.github/workflows/pages.yml``).

**Pages.** The syllabus (the README's, with the links made internal), every lecture with its outputs, every assignment
in its released form (never the solutions or hidden tests: those live only in ``solutions/``, which the site never
reads), the results page (the README's measured tables, and ``dgm results`` of a local ``runs/`` folder when there is
one), the Markdown pages of ``docs/`` (training, testing, grading, assignments, benchmarks) and the API reference. Every
notebook page starts with the Colab badge and a link that downloads the notebook as committed; the Colab setup cell
(the first code cell, stamped by ``python -m dgmlib.colab``) is tagged ``remove-input`` in the copy the site renders.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nbformat

import dgmlib
from dgmlib import colab

__all__ = ["API_MODULES", "INLINE_BACKEND", "LostFiguresError", "build_site", "default_cache", "executed_notebook",
           "execution_key", "is_cached"]

# The modules of the API reference: every public module of dgmlib.
API_MODULES = ("autoregressive", "flows", "revnet", "dequantization", "vae", "vq", "ode", "cnf", "diffusion", "score",
               "score_models", "flow_matching", "flow_matching_models", "data", "train", "units", "plots", "device", "config", "models", "results", "colab", "site", "cli", "grading")
MODES = ("fast", "full")
# the pages of docs/ in the navigation: these first, in this order, then any other alphabetically
GUIDE_ORDER = ("training", "assignments", "grading", "private_course", "testing", "benchmarks")

_BADGE_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="117" height="20" role="img" aria-label="Open in Colab">
<rect width="117" height="20" rx="3" fill="#555"/><rect x="40" width="77" height="20" rx="3" fill="#f9ab00"/>
<rect x="40" width="6" height="20" fill="#f9ab00"/>
<text x="20" y="14" fill="#fff" font-family="Verdana,sans-serif" font-size="11" text-anchor="middle">open</text>
<text x="78" y="14" fill="#000" font-family="Verdana,sans-serif" font-size="11" text-anchor="middle">in Colab</text>
</svg>
"""


def default_cache() -> Path:
    """Where executed notebooks are kept: ``$DGM_SITE_CACHE``, else ``build/site-cache`` under the current folder."""
    return Path(os.environ.get("DGM_SITE_CACHE", "build/site-cache"))


def execution_key(notebook: str | Path, mode: str) -> str:
    """A hash of the notebook's bytes, every ``.py`` file of dgmlib (but this one) and the mode: 16 hex digits.

    Raises:
        ValueError: for a mode other than "fast" or "full".
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    digest = hashlib.sha256(Path(notebook).read_bytes())
    package = Path(dgmlib.__file__).parent
    for source in sorted(package.rglob("*.py")):
        if source.name == "site.py":  # the site's builder never runs inside a notebook
            continue
        digest.update(str(source.relative_to(package)).encode())
        digest.update(source.read_bytes())
    digest.update(mode.encode())
    return digest.hexdigest()[:16]


class LostFiguresError(RuntimeError):
    """An execution shows fewer figures (``image/png`` outputs) than its code drew: neither cached nor published."""


# The kernel's figure counter: a module made inside the kernel, which matplotlib's ``figure.hooks`` (every figure
# made by pyplot, hence by plt.subplots and dgmlib.plots) call; the first and last cells of an execution are these two,
# added for it and removed from the notebook afterwards.
_COUNTER = "_dgm_figure_counter"
_COUNT_SETUP = f"""import sys as _sys, types as _types
import matplotlib as _matplotlib
_sys.modules["{_COUNTER}"] = _types.ModuleType("{_COUNTER}")
exec("created = 0\\ndef count(figure):\\n    global created\\n    created += 1", _sys.modules["{_COUNTER}"].__dict__)
_matplotlib.rcParams["figure.hooks"] = [*_matplotlib.rcParams["figure.hooks"], "{_COUNTER}:count"]
del _sys, _types, _matplotlib"""
_COUNT_REPORT = f"""import sys as _sys
print("{_COUNTER}", _sys.modules["{_COUNTER}"].created)"""
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def _figures_shown(nb: nbformat.NotebookNode) -> int:
    """How many ``image/png`` outputs the code cells of ``nb`` hold."""
    return sum("image/png" in output.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for output in cell.get("outputs", []))


def _kernel_environment(mode: str) -> dict[str, str]:
    """The kernel's environment: ours, with ``DGM_FAST`` for ``mode`` and matplotlib's inline backend (an inherited
    ``MPLBACKEND=Agg`` would draw every figure into nothing)."""
    return {**os.environ, "DGM_FAST": "1" if mode == "fast" else "0", "MPLBACKEND": INLINE_BACKEND}


def executed_notebook(path: str | Path, cache: str | Path | None = None, mode: str = "fast", timeout: int = 600,
                      cwd: str | Path | None = None, refresh: bool = False) -> tuple[nbformat.NotebookNode, bool]:
    """The notebook at ``path`` with the outputs of one execution, from the cache or executed now (then cached).

    The kernel runs with ``DGM_FAST=1`` (mode "fast") or ``DGM_FAST=0`` ("full") and ``MPLBACKEND`` set to matplotlib's
    inline backend (whatever this process has, e.g. ``Agg``), in ``cwd`` (default: a fresh folder in the cache). It
    records in ``metadata["dgm_execution"]`` the mode, the device dgmlib chose, the date, the seconds it took, the key
    (``execution_key``) and the figures drawn and shown. A cached notebook is used only if its key matches, and never
    with ``refresh`` (the lecture tests execute every time, then leave their result for the site). A new entry
    replaces the older ones of the same notebook and mode.

    Figures are counted: a hook in the kernel counts every figure that pyplot makes (matplotlib's ``figure.hooks``,
    set by a first cell added for the execution and removed afterwards with the last one that reads the count), and
    the execution must show at least as many ``image/png`` outputs. Otherwise nothing is cached.

    Args:
        path: the notebook. cache: the folder of executed notebooks (default ``default_cache()``). mode: "fast" or
            "full". timeout: seconds per cell. cwd: the kernel's working folder. refresh: execute even if cached.

    Returns:
        ``(notebook, from_cache)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist. ValueError: for an unknown mode.
        nbclient's CellExecutionError: if a cell fails (nothing is cached then).
        LostFiguresError: if the execution shows fewer figures than its code drew (nothing is cached then).
    """
    from nbclient import NotebookClient

    from dgmlib.device import default_device

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}")
    key = execution_key(path, mode)
    cache = Path(cache) if cache is not None else default_cache()
    cached = cache / f"{path.stem}-{mode}-{key}.ipynb"
    if cached.is_file() and not refresh:
        return nbformat.read(cached, as_version=4), True
    nb = nbformat.read(path, as_version=4)
    workdir = Path(cwd) if cwd is not None else cache / "work" / path.stem
    workdir.mkdir(parents=True, exist_ok=True)
    nb.cells = [nbformat.v4.new_code_cell(_COUNT_SETUP), *nb.cells, nbformat.v4.new_code_cell(_COUNT_REPORT)]
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute(env=_kernel_environment(mode))
    seconds = round(time.perf_counter() - start, 1)
    report = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    nb.cells = nb.cells[1:-1]
    for cell in nb.cells:  # numbered as if the counter's first cell had not run
        if cell.cell_type == "code" and cell.execution_count:
            cell.execution_count -= 1
            for output in cell.outputs:
                if output.get("execution_count"):
                    output.execution_count -= 1
    words = report.split()
    if len(words) != 2 or words[0] != _COUNTER or not words[1].isdigit():
        raise LostFiguresError(f"{path.name}: the figure counter did not report ({report!r}); not cached")
    drawn, shown = int(words[1]), _figures_shown(nb)
    if shown < drawn:
        raise LostFiguresError(f"{path.name}: its code drew {drawn} figures but the execution shows only {shown} "
                               "(image/png outputs); not cached, not published. Is the kernel's matplotlib backend "
                               f"inline ({INLINE_BACKEND})?")
    nb.metadata["dgm_execution"] = {"mode": mode, "device": str(default_device()),
                                    "date": datetime.date.today().isoformat(), "seconds": seconds, "key": key,
                                    "figures_drawn": drawn, "figures_shown": shown}
    cache.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    nbformat.write(nb, partial)
    partial.replace(cached)  # never a half-written entry
    for stale in cache.glob(f"{path.stem}-{mode}-*.ipynb"):  # one entry per notebook and mode: the newest
        if stale != cached:
            stale.unlink()
    return nb, False


def is_cached(path: str | Path, cache: str | Path | None = None, mode: str = "fast") -> bool:
    """Whether ``executed_notebook(path, cache, mode)`` would take the notebook from the cache (no execution).

    Raises:
        FileNotFoundError: if ``path`` does not exist. ValueError: for an unknown mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}")
    cache = Path(cache) if cache is not None else default_cache()
    return (cache / f"{path.stem}-{mode}-{execution_key(path, mode)}.ipynb").is_file()


# --------------------------------------------------------------------------- pages


def _links(source: str, note: str) -> str:
    """The Colab badge, the download link and a note, as Markdown for the top of the page of the notebook ``source``
    (its path in the repository and in the site, e.g. ``lectures/01_autoregressive.ipynb``)."""
    up = "../" * source.count("/")
    return (f'<p class="dgm-links"><a href="{colab.colab_url(source)}"><img src="{up}_static/colab-badge.svg" '
            f'alt="Open in Colab"></a> &nbsp; <a href="{up}_static/notebooks/{source}" download>Download the notebook</a> '
            f"(as committed, without outputs)</p>\n\n{note}\n")


def _add_links(nb: nbformat.NotebookNode, links: str) -> None:
    """Put ``links`` under the notebook's title (the first line of its first markdown cell that opens with ``# ``), or
    in a cell of their own at the top."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("# "):
            title, _, rest = cell.source.lstrip().partition("\n")
            cell.source = f"{title}\n\n{links}\n{rest}"
            return
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(links))


def _execution_note(nb: nbformat.NotebookNode) -> str:
    run = nb.metadata.get("dgm_execution", {})
    if run.get("mode") == "full":
        what = "**full mode** (the full-size runs)"
    else:
        what = ("**fast mode** (`DGM_FAST=1`: small networks and seconds of training, as in CI; the numbers are not the "
                "course's results, which the text quotes and the results page lists)")
    return (f"*The outputs below are from one execution of this notebook in {what} on {run.get('device', '?')}, "
            f"{run.get('date', '?')}, {run.get('seconds', '?')} s.*")


def _readme_section(readme: str, heading: str) -> str:
    """The text of a README section from its heading line to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = readme.splitlines()
    try:
        start = lines.index(heading)
    except ValueError as err:
        raise ValueError(f"README.md has no {heading!r} section") from err
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start + 1:end]).strip() + "\n"


def _syllabus_page(readme: str, lectures: Sequence[str], assignments: Sequence[str], guides: Sequence[str],
                   gallery: bool) -> str:
    intro = readme.split("\n## ", 1)[0]
    title, _, rest = intro.partition("\n")
    syllabus = _readme_section(readme, "## Syllabus")
    # the README's Colab badges point at the shields image online; the site serves its own
    syllabus = syllabus.replace(colab.BADGE_IMAGE, "_static/colab-badge.svg")
    toctrees = [("Lectures", [f"lectures/{n}" for n in lectures]),
                ("Assignments", [f"assignments/{n}/{n}" for n in assignments]),
                ("Results and reference", ["results", *[f"docs/{n}" for n in guides], "api/index"])]
    trees = "\n".join(f"```{{toctree}}\n:caption: {caption}\n:maxdepth: 1\n\n" + "\n".join(entries) + "\n```\n"
                      for caption, entries in toctrees)
    picture = (f"![{GALLERY_CAPTION}](docs/gallery.png)\n\n*{GALLERY_CAPTION}.*\n\n" if gallery else "")
    return (f"{title.strip()}\n\n{rest.strip()}\n\n{picture}## Syllabus\n\n{syllabus}\n"
            "Every lecture page shows the outputs of one execution of its notebook; every assignment page is the "
            "released notebook (the solutions and hidden tests are not published).\n\n" + trees)


GALLERY_CAPTION = ("Samples of every model family from the full-size runs "
                   "(`dgm results runs/full --gallery docs/gallery.png`)")


def _results_page(readme: str, runs: Path | None, static: Path) -> str:
    from dgmlib.results import collect, results_figure, results_markdown

    parts = ["# Results\n"]
    rows = collect(runs) if runs is not None and runs.is_dir() else []
    if rows:
        parts += [f"## Runs in `{runs}` (`dgm results {runs} --details`)\n", results_markdown(rows, details=True)]
        if any("test_nll_nats" in r and "train_seconds" in r for r in rows):
            import matplotlib.pyplot as plt

            figure = results_figure(rows)
            figure.savefig(static / "results.png", dpi=110, bbox_inches="tight")
            plt.close(figure)
            parts.append("\n![test NLL against training time](_static/results.png)\n")
    parts += ["## The course's measured results (from the README)\n", _readme_section(readme, "### Results")]
    return "\n".join(parts)


def _api_pages(api: Path) -> None:
    api.mkdir(parents=True, exist_ok=True)
    (api / "index.md").write_text("# API reference\n\nGenerated from the docstrings of `dgmlib`.\n\n```{toctree}\n"
                                  ":maxdepth: 1\n\n" + "\n".join(API_MODULES) + "\n```\n")
    for name in API_MODULES:
        (api / f"{name}.md").write_text(f"# `dgmlib.{name}`\n\n```{{eval-rst}}\n.. automodule:: dgmlib.{name}\n"
                                        "   :members:\n   :show-inheritance:\n```\n")


def _hide_setup_input(nb: nbformat.NotebookNode) -> None:
    """Tag the Colab setup cell (stamped by ``python -m dgmlib.colab``) ``remove-input``: its code is not shown."""
    for cell in nb.cells:
        if colab.is_setup_cell(cell):
            tags = cell.metadata.setdefault("tags", [])
            if "remove-input" not in tags:
                tags.append("remove-input")


def _licence(root: Path) -> str:
    """The licence that ``root/pyproject.toml`` names (``license = { text = "MIT" }`` or ``license = "MIT"``), or
    "?"."""
    import re

    text = (root / "pyproject.toml").read_text() if (root / "pyproject.toml").is_file() else ""
    found = re.search(r'^license\s*=\s*(?:\{\s*text\s*=\s*)?"([^"]+)"', text, flags=re.M)
    return found.group(1) if found else "?"


_CONF = '''\
project = "Deep Generative Models"
author = "the course's authors"
copyright = "the course's authors"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx_copybutton"]
myst_enable_extensions = ["dollarmath", "amsmath", "html_image"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the outputs stored in the notebooks are shown; nothing is executed
nb_merge_streams = True
html_theme = "sphinx_book_theme"
html_title = "Deep Generative Models"
html_theme_options = {
    "repository_url": REPOSITORY_URL, "repository_branch": BRANCH, "path_to_docs": "",
    "use_repository_button": True, "use_download_button": True,
    # the Colab button opens colab.research.google.com/github/OWNER/NAME/blob/BRANCH/PATH, as dgmlib.colab does
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},
    "home_page_in_toc": True, "show_navbar_depth": 1, "show_toc_level": 2,
    "footer_content_items": ["copyright.html", "extra-footer.html"], "extra_footer": FOOTER,
}
html_static_path = ["_static"]
html_css_files = ["dgm.css"]
copybutton_exclude = ".linenos, .gp, .go"  # line numbers, prompts and outputs are not copied
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"  # MathJax 2, served by the site itself
mathjax2_config = {  # typeset only what Sphinx and MyST mark as math, with the fonts jupyter-server-mathjax ships
    "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]], "processEscapes": True,
                "processClass": "math|output_area", "ignoreClass": "tex2jax_ignore|mathjax_ignore|bd-page-width"},
    "HTML-CSS": {"availableFonts": [], "webFont": "STIX-Web", "imageFont": None},
    "SVG": {"font": "STIX-Web"}, "messageStyle": "none"}
myst_update_mathjax = False  # MyST's own setting is for MathJax 3
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_use_ivar = True  # "Attributes:" sections as fields, not a second description of each attribute
suppress_warnings = ["myst.header", "myst.xref_missing", "misc.highlighting_failure"]
'''
_CSS = """.dgm-links img { vertical-align: middle; }
div.cell_output img { max-width: 100%; height: auto; }
.bd-toc-nav code, .bd-sidebar-primary code { white-space: normal; overflow-wrap: anywhere; }
"""


def _conf(root: Path) -> str:
    """Sphinx's conf.py: ``_CONF`` with the repository of ``dgmlib.colab`` and the footer (licence, source)."""
    repository = f"https://github.com/{colab.REPOSITORY}"
    footer = (f'<p>Released under the {_licence(root)} licence. Source, issues and notebooks: '
              f'<a href="{repository}">{colab.REPOSITORY}</a> on GitHub.</p>')
    return f"REPOSITORY_URL = {repository!r}\nBRANCH = {colab.ref()!r}\nFOOTER = {footer!r}\n" + _CONF


def build_site(out: str | Path = "build/site", root: str | Path = ".", mode: str = "fast", runs: str | Path | None = "runs",
               cache: str | Path | None = None, log: str | Path | None = None, timeout: int | None = None,
               progress: Callable[[str], object] | None = print) -> Path:
    """Build the website into ``out`` and return the path of its ``index.html``.

    Lectures get the outputs of ``executed_notebook`` (cached, or executed now in ``mode``); assignments are the
    released notebooks of ``assignments/`` as committed; every Markdown file of ``docs/`` (grading, testing,
    benchmarks, ...) is a page of its own. On every notebook page the Colab setup cell's input is removed. The sources
    are staged in a temporary folder, then ``sphinx-build -b html`` writes the pages to ``out`` (its warnings to
    ``log``, default ``out/../NAME-sphinx.log``).

    Args:
        out: the output folder (emptied first). root: the repository (README.md, lectures/, assignments/, docs/).
        mode: "fast" or "full" execution for lectures not in the cache. runs: a folder of ``dgm train`` runs for the
            results page (skipped if missing). cache: the execution cache (default ``default_cache()``).
        log: where Sphinx's warnings go. timeout: seconds per cell when executing (default 600 in fast mode, 1800 in
            full mode). progress: called with one line per lecture as it goes (which, cached or executing, seconds);
            None for silence.

    Raises:
        FileNotFoundError: if ``root`` lacks README.md, lectures/ or assignments/. ValueError: for an unknown mode or
        a timeout that is not a positive whole number. LostFiguresError: if a lecture's execution lost figures (then
        nothing is built). RuntimeError: if Sphinx fails (its log is named).
    """
    from sphinx.cmd.build import build_main

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if timeout is None:
        timeout = 600 if mode == "fast" else 1800
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise ValueError(f"timeout must be a positive whole number of seconds, got {timeout!r}")
    say = progress if progress is not None else (lambda line: None)
    root, out = Path(root).resolve(), Path(out).resolve()
    for needed in ("README.md", "lectures", "assignments"):
        if not (root / needed).exists():
            raise FileNotFoundError(f"{root} has no {needed}: run dgm site from the repository's root or pass --root")
    cache = Path(cache) if cache is not None else default_cache()
    cache = cache if cache.is_absolute() else root / cache
    if out.exists():
        shutil.rmtree(out)
    work = Path(tempfile.mkdtemp(prefix="dgm-site-"))
    try:  # staged in a temporary folder, removed if a lecture cannot be executed or loses figures
        src = work / "source"
        static = src / "_static"
        (static / "notebooks" / "lectures").mkdir(parents=True)
        readme = (root / "README.md").read_text()

        lectures = sorted(p.stem for p in (root / "lectures").glob("*.ipynb"))
        (src / "lectures").mkdir()
        for number, name in enumerate(lectures, 1):
            source = f"lectures/{name}.ipynb"
            cached = is_cached(root / source, cache, mode)
            if not cached:
                say(f"[{number}/{len(lectures)}] {source}: executing in {mode} mode ...")
            start = time.perf_counter()
            nb, _ = executed_notebook(root / source, cache, mode, timeout=timeout)
            say(f"[{number}/{len(lectures)}] {source}: {'cached' if cached else 'executed'}, "
                f"{time.perf_counter() - start:.1f} s")
            _hide_setup_input(nb)
            _add_links(nb, _links(source, _execution_note(nb)))
            nbformat.write(nb, src / source)
            shutil.copy(root / source, static / "notebooks" / source)
        assignments = sorted(p.name for p in (root / "assignments").iterdir() if p.is_dir())
        for name in assignments:
            (src / "assignments" / name).mkdir(parents=True)
            (static / "notebooks" / "assignments" / name).mkdir(parents=True)
            for path in sorted((root / "assignments" / name).glob("*.ipynb")):
                source = f"assignments/{name}/{path.name}"
                nb = nbformat.read(path, as_version=4)
                _hide_setup_input(nb)
                _add_links(nb, _links(source, "*The released assignment: write your code where it says "
                                              "`YOUR CODE HERE`, then check it with `nbgrader validate`.*"))
                nbformat.write(nb, src / source)
                shutil.copy(path, static / "notebooks" / source)
        guides: list[str] = []
        if (root / "docs").is_dir():  # the README's long material: each Markdown file a page, its pictures beside it
            shutil.copytree(root / "docs", src / "docs", ignore=shutil.ignore_patterns(".*", "_*"))
            guides = sorted((p.stem for p in (src / "docs").glob("*.md")),
                            key=lambda n: (GUIDE_ORDER.index(n) if n in GUIDE_ORDER else len(GUIDE_ORDER), n))

        (src / "index.md").write_text(_syllabus_page(readme, lectures, assignments, guides,
                                                     (src / "docs" / "gallery.png").is_file()))
        (src / "results.md").write_text(_results_page(readme, Path(runs) if runs is not None else None, static))
        _api_pages(src / "api")
        (src / "conf.py").write_text(_conf(root))
        (static / "dgm.css").write_text(_CSS)
        (static / "colab-badge.svg").write_text(_BADGE_SVG)
        import jupyter_server_mathjax

        shutil.copytree(Path(jupyter_server_mathjax.__file__).parent / "static", static / "mathjax")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    log = Path(log) if log is not None else out.parent / f"{out.name}-sphinx.log"
    say(f"sphinx-build: {len(lectures)} lectures, {len(assignments)} assignments, {len(guides)} guides, "
        f"{len(API_MODULES)} API pages ...")
    code = build_main(["-b", "html", "-q", "-w", str(log), "-d", str(work / "doctrees"), str(src), str(out)])
    if code != 0:
        raise RuntimeError(f"sphinx-build failed (exit {code}); see {log} and the sources in {src}")
    for macros in (out / "_static").glob("*webpack-macros.html"):  # the themes' Jinja macros, copied as static files
        macros.unlink()
    shutil.rmtree(work)
    return out / "index.html"


def main(argv: Sequence[str] | None = None) -> int:
    """``dgm site``'s body, for ``python -m dgmlib.site`` too. Returns 0.

    Raises:
        as ``build_site``; SystemExit for bad arguments (argparse).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="dgm site", description="build the course website")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _positive_seconds(text: str) -> int:
    """argparse's type for ``--timeout``: a positive whole number of seconds."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout must be a whole number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--timeout must be positive, got {value}")
    return value


def add_arguments(parser) -> None:
    """Add the options of ``dgm site`` to ``parser`` (an ``argparse.ArgumentParser``). Raises nothing."""
    parser.add_argument("--out", default="build/site", help="output folder (default: build/site)")
    parser.add_argument("--root", default=".", help="the repository (default: .)")
    parser.add_argument("--mode", choices=MODES, default="fast",
                        help="how lectures not in the cache are executed: fast (DGM_FAST=1) or full (the full-size "
                             "runs, as the published site)")
    parser.add_argument("--runs", default="runs", help="runs for the results page (default: runs, if it exists)")
    parser.add_argument("--cache", default=None, help="executed notebooks (default: $DGM_SITE_CACHE or build/site-cache)")
    parser.add_argument("--timeout", type=_positive_seconds, default=None,
                        help="seconds per cell when executing (default: 600 in fast mode, 1800 in full mode)")


def run(args) -> int:
    """Build the site from parsed ``args`` (see ``add_arguments``), printing each lecture as it goes (cached or
    executing, seconds), then where the site is and how long it took. Returns 0.

    Raises:
        as ``build_site``.
    """
    start = time.perf_counter()
    index = build_site(args.out, args.root, args.mode, args.runs, args.cache, timeout=getattr(args, "timeout", None),
                       progress=lambda line: print(line, flush=True))
    print(f"site: {index} ({time.perf_counter() - start:.1f} s); open it in a browser, or serve it with "
          f"`python -m http.server -d {index.parent}`", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
