"""The built HTML book, as a reader opens it (offline).

Active when ``FEATMATCH_BUILT_HTML`` names the built book (``book/_build/html``; ``make book``
sets it after ``jupyter-book build``); the checker functions themselves are always tested on
planted snippets.

* Each chapter page shows at least :data:`MIN_FIGURES` figures: ``<img>`` tags or interactive
  plotly figures.
* No page loads anything from another host. What counts as a *reference* is what a browser
  fetches or a reader follows: ``src=``/``href=``/``srcset=``/``poster=``/``data=``/``action=``
  attributes of HTML elements, CSS ``url(...)`` and ``@import``, and JavaScript ``import``
  statements, ``import(...)`` and ``importScripts(...)``. Other text that merely contains a
  URL is not a reference: licence comments in CSS/JS (``http://opensource.org/...``), XML
  namespace URIs (``xmlns="http://www.w3.org/2000/svg"``) and string constants inside a
  script's code. ``http://localhost`` and ``127.0.0.1`` are allowed; source maps
  (``*.map``) are not read.
* The results page exists, and its per-verdict counts equal the verdicts of its claims table
  (and the claims CSVs next to the executed notebooks, when they are there); every section
  link it holds points at an id that exists on the chapter page.
"""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from featmatch.chapters.results import chapters

ENV = "FEATMATCH_BUILT_HTML"

#: Figures a chapter page must show.
MIN_FIGURES = 3

_LOCAL = re.compile(r"^(https?:)?//(localhost|127\.0\.0\.1)([:/]|$)", re.I)
_EXTERNAL = re.compile(r"^\s*(https?:)?//", re.I)
_CSS_REFS = re.compile(r"""url\(\s*['"]?([^'")\s]+)|@import\s+['"]([^'"]+)['"]""", re.I)
_JS_REFS = re.compile(
    r"""(?:^|[;\s])import\s+(?:[\w*{}\s,$]+\s+from\s+)?['"]([^'"]+)['"]"""
    r"""|\bimport\(\s*['"]([^'"]+)['"]\s*\)|\bimportScripts\(\s*['"]([^'"]+)['"]""",
    re.M,
)
_URL_ATTRS = ("src", "href", "srcset", "poster", "data", "action")


def _is_external(url: str) -> bool:
    return bool(_EXTERNAL.match(url)) and not _LOCAL.match(url.strip())


def _strip_comments(code: str) -> str:
    """CSS/JS block comments removed (licence headers live there)."""
    return re.sub(r"/\*.*?\*/", " ", code, flags=re.S)


class _Page(HTMLParser):
    """References, images, plotly figures and ids of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []
        self.imgs = 0
        self.plotly = 0
        self.ids: set[str] = set()
        self._in: str | None = None
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for k in _URL_ATTRS:
            v = a.get(k)
            if not v:
                continue
            urls = [part.strip().split(" ")[0] for part in v.split(",")] if k == "srcset" else [v]
            self.refs += urls
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if a.get("style"):
            self.refs += [m[0] or m[1] for m in _CSS_REFS.findall(a["style"])]
        if tag == "img":
            self.imgs += 1
        cls = a.get("class") or ""
        if tag == "div" and ("featmatch-flow" in cls or "plotly-graph-div" in cls):
            self.plotly += 1
        if tag in ("style", "script"):
            self._in = tag

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self.refs += [m[0] or m[1] for m in _CSS_REFS.findall(_strip_comments(data))]
        elif self._in == "script":
            self.refs += [next(g for g in m if g) for m in _JS_REFS.findall(_strip_comments(data))]


def parse_page(text: str) -> _Page:
    """Parse one HTML page."""
    page = _Page()
    page.feed(text)
    return page


def external_refs(text: str, kind: str) -> list[str]:
    """The external references of one file's text; ``kind`` is ``"html"``, ``"css"`` or ``"js"``."""
    if kind == "html":
        refs = parse_page(text).refs
    elif kind == "css":
        refs = [m[0] or m[1] for m in _CSS_REFS.findall(_strip_comments(text))]
    else:
        refs = [next(g for g in m if g) for m in _JS_REFS.findall(_strip_comments(text))]
    return [r for r in refs if _is_external(r)]


# --------------------------------------------------------------------------------------
# the checker on planted snippets (always run)
# --------------------------------------------------------------------------------------


def test_checker_finds_loads_and_ignores_licences_namespaces_and_strings():
    html = """<html><head><link rel="stylesheet" href="https://cdn.example.org/x.css">
    <script src="_static/local.js"></script><script src="//cdn.example.org/y.js"></script>
    <style>/* (c) see http://opensource.org/licenses/MIT */ body { background: url("https://img.example.org/bg.png") }</style>
    <script>var s = "see https://plotly.com/"; import("https://esm.example.org/m.js");</script></head>
    <body><svg xmlns="http://www.w3.org/2000/svg"></svg><img src="data:image/png;base64,AAAA">
    <img srcset="a.png 1x, https://img.example.org/b.png 2x"><a href="http://localhost:8000/">local</a>
    <div style="background-image:url(https://img.example.org/c.png)"></div></body></html>"""
    assert sorted(external_refs(html, "html")) == sorted([
        "https://cdn.example.org/x.css", "//cdn.example.org/y.js", "https://img.example.org/bg.png",
        "https://esm.example.org/m.js", "https://img.example.org/b.png", "https://img.example.org/c.png",
    ])
    css = '/*! license: https://github.com/x/y */ @import "https://fonts.example.org/f.css"; a{background:url(../img/z.svg)}'
    assert external_refs(css, "css") == ["https://fonts.example.org/f.css"]
    js = ('/* https://opensource.org/licenses/MIT */ import x from "https://esm.example.org/a.js";\n'
          'const u = "http://www.w3.org/2000/svg"; importScripts("https://w.example.org/w.js"); import "./local.js";')
    assert external_refs(js, "js") == ["https://esm.example.org/a.js", "https://w.example.org/w.js"]
    page = parse_page(html)
    assert page.imgs == 2 and page.plotly == 0


# --------------------------------------------------------------------------------------
# the built book (FEATMATCH_BUILT_HTML)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root() -> Path:
    value = os.environ.get(ENV)
    if not value:
        pytest.skip(f"{ENV} is not set (make book sets it to book/_build/html)")
    path = Path(value)
    if not (path / "index.html").is_file():
        pytest.fail(f"{path}: no index.html, not a built book")
    return path


@pytest.mark.parametrize("chapter", [c.stem for c in chapters()])
def test_each_chapter_page_shows_its_figures(root, chapter):
    path = root / "notebooks" / f"{chapter}.html"
    assert path.is_file(), f"{path}: chapter page missing"
    page = parse_page(path.read_text(encoding="utf-8"))
    assert page.imgs + page.plotly >= MIN_FIGURES, f"{path}: {page.imgs} <img> and {page.plotly} interactive figures"


def test_no_page_loads_from_another_host(root):
    bad = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in (".html", ".css", ".js"):
            continue
        refs = external_refs(path.read_text(encoding="utf-8", errors="replace"), path.suffix[1:])
        if refs:
            bad[str(path.relative_to(root))] = sorted(set(refs))[:5]
    assert bad == {}, f"external references: {bad}"


class _Rows(HTMLParser):
    """The rows of the tables in an HTML fragment, as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table_rows(fragment: str) -> list[list[str]]:
    """Cell texts of every table row in ``fragment``."""
    t = _Rows()
    t.feed(fragment)
    return t.rows


def _section(text: str, sid: str) -> str:
    start = text.find(f'<section id="{sid}"')
    assert start >= 0, f"no section {sid!r}"
    return text[start:text.find("</section>", start)]


def test_results_page_counts_its_verdicts(root):
    path = root / "results.html"
    assert path.is_file(), f"{path}: results page missing"
    text = path.read_text(encoding="utf-8")
    verdicts = ("held", "failed", "mixed", "not testable")
    if "No claims tables were found" in text:
        pytest.fail(f"{path}: built without claims tables")
    counts = {r[0]: int(r[1]) for r in table_rows(_section(text, "verdicts")) if len(r) == 2 and r[0] in verdicts}
    assert set(counts) == set(verdicts), f"{path}: per-verdict counts not found"
    rows = [r for r in table_rows(_section(text, "every-claim")) if len(r) == 5 and r[4] in verdicts]
    assert {v: sum(r[4] == v for r in rows) for v in verdicts} == counts
    figures = root.parent.parent / "notebooks" / "figures"
    if figures.is_dir():
        from featmatch.chapters.results import collect_claims

        assert len(collect_claims(figures)) == sum(counts.values())
    # every section link resolves to an id on the chapter page
    for page, anchor in re.findall(r'href="(notebooks/[^"#]+\.html)#([^"]+)"', text):
        target = parse_page((root / page).read_text(encoding="utf-8"))
        assert anchor in target.ids, f"{path}: link to {page}#{anchor}, no such id"


@pytest.mark.parametrize("chapter", [c.stem for c in chapters()])
def test_each_chapter_page_loads_the_table_stylesheet(root, chapter):
    """Wide pandas tables fit or scroll (book/_static/featmatch.css); without it they are cut at the edge."""
    html = (root / "notebooks" / f"{chapter}.html").read_text(encoding="utf-8")
    assert "_static/featmatch.css" in html, f"{chapter}.html does not load _static/featmatch.css"
    css = (root / "_static" / "featmatch.css").read_text(encoding="utf-8")
    assert "overflow-x: auto" in css
