"""The course website (``dgm site``): it builds, leaks no solution, every internal link resolves, every lecture page
shows its figures, and a real browser typesets the equations and displays the figures.

The site reuses the lectures that ``test_notebooks`` has just executed (the cache of ``dgmlib.site``), so nothing is
executed twice; run alone, this module executes them first.
"""

from __future__ import annotations

import functools
import html
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

from dgmlib import site
from dgmlib.cli import main
from nbhelpers import ASSIGNMENTS, ROOT, SOLUTION_MARKERS, secret_lines

# Sphinx and MyST-NB warn about their own deprecations (Sphinx 11) on every page: not ours to fix
pytestmark = [pytest.mark.notebook, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]

LECTURES = sorted(p.stem for p in (ROOT / "lectures").glob("*.ipynb"))
CACHE = ROOT / "build" / "site-cache"  # where test_notebooks leaves the executed lectures


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The site of this checkout, with a real (fast, one-epoch) run of ``dgm train`` on its results page."""
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", "made", "--fast", "--epochs", "1", "--out", str(runs / "made"), "--no-progress"]) == 0
    out = tmp_path_factory.mktemp("site")
    assert main(["site", "--out", str(out), "--root", str(ROOT), "--runs", str(runs), "--cache", str(CACHE)]) == 0
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
    assert "94.09" in results  # ... and the README's measured tables (the VQ-VAE's bound)
    assert not (built / "solutions").exists()


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
    ``$$`` or ``\\(`` is left in the text) and every figure of the page is displayed. The screenshot is kept at
    ``$DGM_SITE_SCREENSHOT`` if set."""
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
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/lectures/07_vq_vae.html")
        WebDriverWait(driver, 90).until(lambda d: d.execute_script(
            "return window.MathJax !== undefined && MathJax.Hub !== undefined && MathJax.Hub.queue.pending === 0"
            " && document.querySelectorAll('.MathJax, .MathJax_SVG').length > 0"))
        report = driver.execute_script("""
            const math = [...document.querySelectorAll('span.math.notranslate, div.math.notranslate')];  // Sphinx's
            const untypeset = math.filter(m => !m.querySelector('.MathJax, .MathJax_SVG')).length;
            const body = document.querySelector('div.body').cloneNode(true);
            body.querySelectorAll('pre, code, script, .MathJax, .MathJax_SVG, .MathJax_Display').forEach(e => e.remove());
            const figures = [...document.querySelectorAll('div.body img')].filter(i => i.src.includes('_images/'));
            return {math: math.length, untypeset: untypeset, text: body.innerText,
                    figures: figures.length, shown: figures.filter(i => i.complete && i.naturalWidth > 0).length};
        """)
        # the screenshot: the first figure at the bottom of the window, the text and equations before it above
        driver.execute_script("[...document.querySelectorAll('div.body img')].find(i => i.src.includes('_images/'))"
                              ".scrollIntoView({block: 'end'})")
        shot = Path(os.environ.get("DGM_SITE_SCREENSHOT") or tmp_path / "lecture07.png")
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
        server.shutdown()
    assert report["math"] > 20 and report["untypeset"] == 0, report["untypeset"]
    for raw in ("$$", "\\(", "\\["):
        assert raw not in report["text"], raw
    assert report["figures"] >= 5 and report["shown"] == report["figures"], report
    assert shot.stat().st_size > 10_000


def test_the_pages_workflow_builds_the_site_with_dgm_site():
    """The GitHub Pages workflow (it cannot run here): it installs the project with the site extra, runs ``dgm site``
    and deploys the folder it built."""
    workflow = (ROOT / ".github" / "workflows" / "pages.yml").read_text()
    import yaml

    spec = yaml.safe_load(workflow)
    steps = [step for job in spec["jobs"].values() for step in job.get("steps", [])]
    runs = "\n".join(step.get("run", "") for step in steps)
    uses = [step.get("uses", "") for step in steps]
    assert re.search(r"dgm site --out (\S+)", runs)
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

def test_dgm_site_reports_a_wrong_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="README.md"):
        site.build_site(tmp_path / "out", root=tmp_path)
    with pytest.raises(ValueError, match="mode"):
        site.execution_key(ROOT / "lectures" / f"{LECTURES[0]}.ipynb", "medium")
