"""The course website (``dgm site``): it builds, leaks no solution, every internal link resolves, every lecture page
shows its figures, the book layout has its parts (sidebar, contents, previous/next, search, Colab launch buttons,
footer), and a real browser typesets the equations and displays the figures. Executions that lose figures are refused.

The site reuses the lectures that ``test_notebooks`` has just executed (the cache of ``dgmlib.site``), so nothing is
executed twice; run alone, this module executes them first.
"""

from __future__ import annotations

import contextlib
import functools
import html
import io
import json
import os
import re
import shutil
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

from dgmlib import colab, site
from dgmlib.cli import main
from nbhelpers import ASSIGNMENTS, ROOT, SOLUTION_MARKERS, secret_lines

# Sphinx and MyST-NB warn about their own deprecations (Sphinx 11) on every page: not ours to fix
pytestmark = [pytest.mark.notebook, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]

LECTURES = sorted(p.stem for p in (ROOT / "lectures").glob("*.ipynb"))
GUIDES = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
PRINTED: list[str] = []  # what the fixture's ``dgm site`` printed
CACHE = ROOT / "build" / "site-cache"  # where test_notebooks leaves the executed lectures


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The site of this checkout, with a real (fast, one-epoch) run of ``dgm train`` on its results page."""
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", "made", "--fast", "--epochs", "1", "--out", str(runs / "made"), "--no-progress"]) == 0
    out = tmp_path_factory.mktemp("site")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["site", "--out", str(out), "--root", str(ROOT), "--runs", str(runs), "--cache", str(CACHE)]) == 0
    PRINTED[:] = printed.getvalue().splitlines()
    return out


class _Links(HTMLParser):
    """Every href/src of a page, and every id it defines."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        for name in ("href", "src"):
            if attributes.get(name):
                self.links.append(attributes[name])
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        if tag == "img" and attributes.get("src"):
            self.images.append(attributes["src"])


@functools.lru_cache(maxsize=None)
def _parsed(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(errors="replace"))
    return parser


def test_every_page_is_built(built):
    for name in LECTURES:
        assert (built / "lectures" / f"{name}.html").is_file(), name
    for name in ASSIGNMENTS:
        assert (built / "assignments" / name / f"{name}.html").is_file(), name
    for module in site.API_MODULES:
        page = (built / "api" / f"{module}.html").read_text()
        assert f"dgmlib.{module}" in page
    assert "VectorQuantizer" in (built / "api" / "vq.html").read_text()  # autodoc found the classes
    index = (built / "index.html").read_text()
    for name in LECTURES + ASSIGNMENTS:
        assert name in index
    results = (built / "results.html").read_text()
    assert "made" in results and "results.png" in results  # dgm results of the run made by the fixture
    assert "93.44" in results  # ... and the README's measured tables (the VQ-VAE's bound)
    assert not (built / "solutions").exists()
    for guide in GUIDES:  # the README's long material, one page each, in the navigation
        assert (built / "docs" / f"{guide}.html").is_file(), guide
        assert f"docs/{guide}.html" in index, guide
    assert (built / "search.html").is_file() and (built / "searchindex.js").is_file()


def test_the_book_layout(built):
    """sphinx-book-theme: the navigation sidebar, "on this page" contents, previous/next links, a search field, the
    Colab launch button (the address of ``dgmlib.colab``), copy buttons, and a footer naming the licence and the
    repository. The Colab setup cell's code is on no page."""
    repository = f"https://github.com/{colab.REPOSITORY}"
    for source in [f"lectures/{n}.ipynb" for n in LECTURES] + [f"assignments/{n}/{n}.ipynb" for n in ASSIGNMENTS]:
        text = (built / source).with_suffix(".html").read_text()
        assert "bd-sidebar-primary" in text and "bd-sidebar-secondary" in text and "page-toc" in text, source
        assert "prev-next-area" in text and "search-button" in text, source
        assert html.escape(colab.colab_url(source)) in text, f"{source}: no Colab launch button"
        assert "copybutton.js" in text, source
        assert "MIT licence" in text and f'href="{repository}"' in text, f"{source}: no footer"
        assert colab.STAMP_COMMAND not in text and "google.colab" not in text, f"{source}: the setup cell is shown"
    api = (built / "api" / "dequantization.html").read_text()
    assert 'class="math' in api and "\\int" in api  # the docstrings' formulas are Sphinx maths, for MathJax
    assert ":math:" not in api


def test_no_page_leaks_a_solution_or_a_hidden_test(built):
    files = [p for p in built.rglob("*") if p.is_file() and p.suffix in (".html", ".txt", ".js", ".ipynb", ".json")
             and "mathjax" not in p.parts]
    texts = {p: html.unescape(p.read_text(errors="replace")) for p in files}
    for text in texts.values():
        for marker in SOLUTION_MARKERS:
            assert marker not in text
    # a line that a lecture or a release also contains is public (lecture 01 sums P(y) as hw1's hidden test does)
    public = "\n".join(p.read_text() for d in ("lectures", "assignments") for p in sorted((ROOT / d).rglob("*.ipynb")))
    for name in ASSIGNMENTS:
        for source in sorted((ROOT / "solutions" / name).glob("*.ipynb")):
            for line in secret_lines(nbformat.read(source, as_version=4)):
                if json.dumps(line)[1:-1] in public:
                    continue
                escaped = json.dumps(line)[1:-1]
                for path, text in texts.items():
                    assert line not in text and escaped not in text, f"{path.relative_to(built)} leaks {line!r}"


def test_every_internal_link_resolves(built):
    pages = sorted(built.rglob("*.html"))
    assert len(pages) > len(LECTURES) + len(ASSIGNMENTS) + len(site.API_MODULES)
    broken = []
    for page in pages:
        if "_source" in page.relative_to(built).parts:
            continue
        for link in _parsed(page).links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith(("//", "mailto:", "data:", "javascript:")):
                continue  # an external address
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(built)} -> {link}")
            elif parts.fragment and target.suffix == ".html" and parts.fragment not in _parsed(target).ids:
                broken.append(f"{page.relative_to(built)} -> {link} (no such anchor)")
    assert not broken, "\n".join(broken[:30])


@pytest.mark.parametrize("name", LECTURES)
def test_lecture_page_shows_its_figures_and_says_how_they_were_made(built, name):
    nb, _ = site.executed_notebook(ROOT / "lectures" / f"{name}.ipynb", CACHE, "fast")
    drawn = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    page = built / "lectures" / f"{name}.html"
    images = [src for src in _parsed(page).images if "_images/" in src]
    assert len(images) >= drawn >= 5, f"{name}: {len(images)} images on the page, {drawn} figures drawn"
    text = page.read_text()
    assert "fast mode" in text and "Download the notebook" in text and "colab.research.google.com" in text
    assert "../_static/notebooks/lectures/" in text


# ------------------------------------------------------------------ a real browser


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_a_browser_typesets_the_equations_and_shows_the_figures(built, tmp_path):
    """Debian's chromium, headless, loads lecture 07 from a local web server: MathJax typeset every equation (no raw
    ``$$`` or ``\\(`` is left in the text), every figure of the page is displayed, and the navigation sidebar is still
    in view after scrolling to the bottom. On the API page of ``dgmlib.dequantization`` the docstrings' formulas are
    typeset too. The screenshot is kept at ``$DGM_SITE_SCREENSHOT`` if set."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(built))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    # MathJax 2 (served by the site, offline) writes .MathJax / .MathJax_SVG elements; MathJax 3 would write
    # mjx-container: either counts as typeset
    typeset = ".MathJax, .MathJax_SVG, mjx-container"
    inspect = """
        const typeset = arguments[0];
        const math = [...document.querySelectorAll('span.math.notranslate, div.math.notranslate')];  // Sphinx's
        const untypeset = math.filter(m => !m.querySelector(typeset)).length;
        const body = document.querySelector('article.bd-article').cloneNode(true);
        body.querySelectorAll('pre, code, script, .MathJax, .MathJax_SVG, .MathJax_Display, mjx-container')
            .forEach(e => e.remove());
        const figures = [...document.querySelectorAll('article.bd-article img')]
            .filter(i => i.src.includes('_images/'));
        return {math: math.length, untypeset: untypeset, text: body.innerText,
                typeset: document.querySelectorAll(typeset).length,
                figures: figures.length, shown: figures.filter(i => i.complete && i.naturalWidth > 0).length};
    """

    def load(page: str) -> dict:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/{page}")
        WebDriverWait(driver, 90).until(lambda d: d.execute_script(
            "return window.MathJax !== undefined && MathJax.Hub !== undefined && MathJax.Hub.queue.pending === 0"
            " && document.querySelectorAll(arguments[0]).length > 0", typeset))
        return driver.execute_script(inspect, typeset)

    try:
        report = load("lectures/07_vq_vae.html")
        # the screenshot: the first figure at the bottom of the window, the text and equations before it above
        driver.execute_script("[...document.querySelectorAll('article.bd-article img')]"
                              ".find(i => i.src.includes('_images/')).scrollIntoView({block: 'end'})")
        shot = Path(os.environ.get("DGM_SITE_SCREENSHOT") or tmp_path / "lecture07.png")
        driver.save_screenshot(str(shot))
        driver.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")
        sidebar = driver.execute_script("""
            const nav = document.querySelector('.bd-sidebar-primary'), box = nav.getBoundingClientRect();
            const current = nav.querySelector('a.current, li.current > a, a[aria-current="page"]');
            const link = current ? current.getBoundingClientRect() : {top: -1, bottom: -1};
            return {scrolled: window.scrollY, top: box.top, bottom: box.bottom, height: window.innerHeight,
                    visible: getComputedStyle(nav).visibility === 'visible' && getComputedStyle(nav).display !== 'none',
                    links: nav.querySelectorAll('a').length, current: current ? current.innerText : null,
                    toc: document.querySelectorAll('.bd-sidebar-secondary a').length};
        """)
        api = load("api/dequantization.html")
    finally:
        driver.quit()
        server.shutdown()
    assert report["math"] > 20 and report["untypeset"] == 0, report["untypeset"]
    for raw in ("$$", "\\(", "\\["):
        assert raw not in report["text"], raw
    assert report["figures"] >= 5 and report["shown"] == report["figures"], report
    assert shot.stat().st_size > 10_000
    # the sidebar is sticky: at the bottom of a long page it still fills the window, with the lecture's own link
    assert sidebar["scrolled"] > 5000 and sidebar["visible"], sidebar
    assert abs(sidebar["top"]) < 5 and sidebar["bottom"] > sidebar["height"] / 2, sidebar
    assert sidebar["links"] > len(LECTURES) + len(ASSIGNMENTS) and "07" in (sidebar["current"] or ""), sidebar
    assert sidebar["toc"] > 5, sidebar  # "on this page"
    # the API page: formulas from the docstrings, typeset; no role or delimiter left raw
    assert api["math"] >= 5 and api["untypeset"] == 0 and api["typeset"] >= 5, api
    for raw in (":math:", "\\(", "\\[", "$$"):
        assert raw not in api["text"], raw


def test_the_pages_workflow_builds_the_site_with_dgm_site():
    """The GitHub Pages workflow (it cannot run here): it installs the project with the site extra, executes the
    lectures in full mode with ``dgm site --mode full``, keeps the execution cache between runs with actions/cache
    (keyed on the lectures, dgmlib's sources and the mode, falling back to the latest cache) and deploys the folder it
    built, within a time limit that GitHub allows (6 h)."""
    workflow = (ROOT / ".github" / "workflows" / "pages.yml").read_text()
    import yaml

    spec = yaml.safe_load(workflow)
    build = spec["jobs"]["build"]
    steps = [step for job in spec["jobs"].values() for step in job.get("steps", [])]
    runs = "\n".join(step.get("run", "") for step in steps)
    uses = [step.get("uses", "") for step in steps]
    assert re.search(r"dgm site --out (\S+)", runs)
    assert re.search(r"dgm site [^\n]*--mode full", runs)
    assert 0 < build["timeout-minutes"] <= 360
    caches = [step for step in build["steps"] if step.get("uses", "").startswith("actions/cache@")]
    assert len(caches) == 1, "one actions/cache step for the execution cache"
    cache = caches[0]["with"]
    cache_dir = build.get("env", {}).get("DGM_SITE_CACHE") or str(site.default_cache())
    assert cache_dir in cache["path"].replace("${{ env.DGM_SITE_CACHE }}", cache_dir)
    assert "hashFiles(" in cache["key"] and "lectures/*.ipynb" in cache["key"] and "dgmlib/**/*.py" in cache["key"]
    assert "full" in cache["key"]
    restore = cache["restore-keys"].split()
    assert restore and all(cache["key"].startswith(prefix) for prefix in restore)
    cache_step = build["steps"].index(caches[0])
    site_step = next(i for i, step in enumerate(build["steps"]) if "dgm site" in step.get("run", ""))
    assert cache_step < site_step
    assert any(u.startswith("actions/upload-pages-artifact") for u in uses)
    assert any(u.startswith("actions/deploy-pages") for u in uses)
    assert spec["permissions"]["pages"] == "write" and spec["permissions"]["id-token"] == "write"


def test_the_execution_cache_is_keyed_on_the_notebook(tmp_path):
    """A notebook is executed once per content and mode; an edit executes it again and replaces the old entry."""
    path, cache = tmp_path / "tiny.ipynb", tmp_path / "cache"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nprint(os.environ['DGM_FAST'])")]),
                   path)
    nb, cached = site.executed_notebook(path, cache, "full")
    assert not cached and nb.cells[0].outputs[0]["text"].strip() == "0" and nb.metadata["dgm_execution"]["mode"] == "full"
    assert site.executed_notebook(path, cache, "full")[1]  # the second time from the cache
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1 + 1)")]), path)
    nb, cached = site.executed_notebook(path, cache, "full")
    assert not cached and nb.cells[0].outputs[0]["text"].strip() == "2"
    assert len(list(cache.glob("tiny-full-*.ipynb"))) == 1


_PLOT = "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()"


def test_figures_are_shown_under_an_inherited_agg_backend(tmp_path, monkeypatch, capsys):
    """CI's shell (or a test runner) may export ``MPLBACKEND=Agg``; the kernel still draws inline, so the figure is an
    ``image/png`` output, and the counter's cells leave no trace in the notebook."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = tmp_path / "plot.ipynb"
    cells = [nbformat.v4.new_markdown_cell("# A plot"), nbformat.v4.new_code_cell(_PLOT),
             nbformat.v4.new_code_cell("1 + 1")]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    nb, cached = site.executed_notebook(path, tmp_path / "cache", "fast")
    assert not cached and len(nb.cells) == 3 and [c.source for c in nb.cells] == [c.source for c in cells]
    outputs = nb.cells[1].outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs
    assert [c.execution_count for c in nb.cells if c.cell_type == "code"] == [1, 2]
    assert nb.metadata["dgm_execution"]["figures_drawn"] == nb.metadata["dgm_execution"]["figures_shown"] == 1
    assert len(list((tmp_path / "cache").glob("plot-fast-*.ipynb"))) == 1


def test_an_execution_that_loses_a_figure_is_refused_and_not_cached(tmp_path):
    """A lecture whose figure is lost (simulated: the notebook switches its own kernel to Agg) draws 1 figure and
    shows 0: ``executed_notebook`` raises, naming the notebook and both counts, and caches nothing; ``dgm site`` built
    from such a lecture fails rather than publish it."""
    path, cache = tmp_path / "lost.ipynb", tmp_path / "cache"
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import matplotlib\nmatplotlib.use('Agg')"), nbformat.v4.new_code_cell(_PLOT)]), path)
    with pytest.raises(site.LostFiguresError, match=r"lost\.ipynb: its code drew 1 figures but the execution shows "
                                                    r"only 0"):
        site.executed_notebook(path, cache, "fast")
    assert not list(cache.glob("lost-*.ipynb")) and not list(cache.glob("*.partial"))
    assert not site.is_cached(path, cache, "fast")
    root = tmp_path / "course"  # the same lecture in a course: the site is not built
    (root / "lectures").mkdir(parents=True)
    (root / "assignments").mkdir()
    (root / "README.md").write_text("# A course\n\nOne lecture.\n\n## Syllabus\n\nlost\n\n### Results\n\nnone\n")
    shutil.copy(path, root / "lectures" / "01_lost.ipynb")
    lines: list[str] = []
    with pytest.raises(site.LostFiguresError, match="01_lost"):
        site.build_site(tmp_path / "out", root, cache=cache, progress=lines.append)
    assert lines == ["[1/1] lectures/01_lost.ipynb: executing in fast mode ..."]
    assert not (tmp_path / "out" / "index.html").exists() and not list(cache.glob("01_lost-*.ipynb"))


def test_dgm_site_reports_a_wrong_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="README.md"):
        site.build_site(tmp_path / "out", root=tmp_path)
    with pytest.raises(ValueError, match="mode"):
        site.execution_key(ROOT / "lectures" / f"{LECTURES[0]}.ipynb", "medium")
    with pytest.raises(ValueError, match="timeout"):
        site.build_site(tmp_path / "out", root=ROOT, timeout=0)
    with pytest.raises(SystemExit):
        main(["site", "--timeout", "-5"])


def test_dgm_site_prints_each_lecture_as_it_goes(built):
    """``dgm site`` says which lecture it is at, whether it came from the cache or is being executed, and the seconds
    it took, as it goes; then where the site is."""
    lines = PRINTED
    for number, name in enumerate(LECTURES, 1):
        head = f"[{number}/{len(LECTURES)}] lectures/{name}.ipynb: "
        done = [line for line in lines if re.fullmatch(re.escape(head) + r"(cached|executed), [0-9.]+ s", line)]
        assert len(done) == 1, (name, lines)
        if done[0].startswith(head + "executed"):
            assert lines.index(head + "executing in fast mode ...") < lines.index(done[0])
    assert lines[-1].startswith("site: ") and "index.html" in lines[-1]
