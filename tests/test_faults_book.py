"""The built book loads and names nothing off the machine.

:func:`offsite_urls` scans built HTML (and its CSS) for every URL a page would fetch or hand to a
script: ``<script src>``, any ``<link href>``, images/frames/media sources, CSS ``url()`` and
``@import``, ``<meta http-equiv=refresh>`` and http(s) literals inside inline ``<script>`` bodies
(where Jupyter Book's thebe wrote ``THEBE_JS_URL``). Plain ``<a href>`` hyperlinks (a paper's DOI,
a reference) are not loads and are allowed. A URL is off the machine when it is ``http(s)://`` or
protocol-relative ``//`` and its host is not localhost/127.0.0.1/::1.

The smoke book test can use it as ``from test_faults_book import offsite_urls`` (pytest puts
``tests/`` on ``sys.path``): ``assert offsite_urls(smoke_book) == []``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_SRC_TAGS = {"script": ("src",), "img": ("src", "srcset"), "iframe": ("src",), "frame": ("src",), "embed": ("src",),
             "source": ("src", "srcset"), "video": ("src", "poster"), "audio": ("src",), "track": ("src",),
             "input": ("src",), "object": ("data",), "link": ("href", "imagesrcset")}
_CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])([^'")\s]+)""", re.I)
# inside a script: an http(s) URL, or a protocol-relative one whose host has a dot and whose "//" does
# not sit inside a base64 run (widget state and inline images in the built pages are full of "//")
_JS_URL = re.compile(r"""https?://[A-Za-z0-9.\-\[\]:]+[^\s'"`<>)]*"""
                     r"""|(?<![A-Za-z0-9+/=:])//[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+(?::\d+)?(?:/[^\s'"`<>)]*)?""")


def is_offsite(url: str) -> bool:
    """True for an absolute http(s) or protocol-relative URL whose host is not this machine."""
    url = url.strip()
    if not (url.lower().startswith(("http://", "https://")) or url.startswith("//")):
        return False
    host = (urlsplit(url if not url.startswith("//") else "http:" + url).hostname or "").lower()
    return host not in LOCAL_HOSTS


class _PageScan(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k.lower(): v or "" for k, v in attrs}
        for name in _SRC_TAGS.get(tag, ()):
            if name in a:
                # srcset: "url 1x, url 2x"
                parts = [p.strip().split()[0] for p in a[name].split(",") if p.strip()] if "srcset" in name else [a[name]]
                self.urls.extend(parts)
        if tag == "meta" and a.get("http-equiv", "").lower() == "refresh":
            self.urls.extend(m.group(1) for m in re.finditer(r"url\s*=\s*(\S+)", a.get("content", ""), re.I))
        if "style" in a:
            self.urls.extend(_CSS_URL.findall(a["style"]))
        self._in = tag if tag in ("script", "style") and "src" not in a else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "style":
            self.urls.extend(_CSS_URL.findall(data))
        elif self._in == "script":
            self.urls.extend(_JS_URL.findall(data))


def page_urls(html: str) -> list[str]:
    """Every URL one HTML page loads or hands to a script (hyperlinks excluded)."""
    scan = _PageScan()
    scan.feed(html)
    scan.close()
    return scan.urls


def offsite_urls(html_dir: str | Path) -> list[tuple[str, str]]:
    """(file relative to ``html_dir``, URL) for every off-machine URL the built pages would load."""
    html_dir = Path(html_dir)
    found = []
    for path in sorted(html_dir.rglob("*")):
        if path.suffix == ".html":
            urls = page_urls(path.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix == ".css":
            urls = _CSS_URL.findall(path.read_text(encoding="utf-8", errors="replace"))
        else:
            continue
        found.extend((str(path.relative_to(html_dir)), u) for u in urls if is_offsite(u))
    return found


PAGES = [
    # (case, page, expected off-machine URLs)
    ("thebe-inline", '<script>const THEBE_JS_URL = "https://unpkg.com/thebe@0.8.2/lib/index.js"</script>',
     ["https://unpkg.com/thebe@0.8.2/lib/index.js"]),
    ("script-src", '<script src="https://cdn.jsdelivr.net/npm/require.js"></script>', ["https://cdn.jsdelivr.net/npm/require.js"]),
    ("protocol-relative", '<script src="//cdnjs.cloudflare.com/x.js"></script>', ["//cdnjs.cloudflare.com/x.js"]),
    ("stylesheet", '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Lato">',
     ["https://fonts.googleapis.com/css?family=Lato"]),
    ("preload", '<link rel="preload" as="script" href="http://example.org/a.js">', ["http://example.org/a.js"]),
    ("icon", '<link rel="icon" href="https://example.org/favicon.ico">', ["https://example.org/favicon.ico"]),
    ("img", '<img src="https://img.shields.io/badge.svg" alt="b">', ["https://img.shields.io/badge.svg"]),
    ("srcset", '<img src="a.png" srcset="a.png 1x, https://x.org/a2.png 2x">', ["https://x.org/a2.png"]),
    ("iframe", '<iframe src="https://www.youtube.com/embed/x"></iframe>', ["https://www.youtube.com/embed/x"]),
    ("style-import", "<style>@import 'https://fonts.example.com/f.css';</style>", ["https://fonts.example.com/f.css"]),
    ("style-url", '<div style="background: url(https://x.org/bg.png)"></div>', ["https://x.org/bg.png"]),
    ("refresh", '<meta http-equiv="refresh" content="0; url=https://elsewhere.org/">', ["https://elsewhere.org/"]),
    ("mathjax-cdn", '<script defer src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>',
     ["https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"]),
    # allowed: local files, this machine, hyperlinks a reader may follow
    ("local", '<script src="_static/doctools.js"></script><link rel="stylesheet" href="_static/a.css">', []),
    ("localhost", '<script src="http://localhost:8000/x.js"></script><img src="http://127.0.0.1/a.png">', []),
    ("paper-link", '<a href="https://doi.org/10.1007/978-3-030-90439-5_14">paper</a>', []),
    ("data-uri", '<img src="data:image/png;base64,AAAA">', []),
    ("comment-text", "<p>see https://example.org in the text</p>", []),
    ("script-protocol-relative", "<script>var u = '//cdn.example.com/x.js';</script>", ["//cdn.example.com/x.js"]),
    # base64 inside an inline script (widget state of the built book) is no URL
    ("script-base64", "<script>var s = {'img': 'data:image/png;base64,AB//Xe42qm3YsIE/+//a.b=='};</script>", []),
]


@pytest.mark.parametrize("case,page,expected", PAGES, ids=[p[0] for p in PAGES])
def test_offsite_urls_on_crafted_pages(tmp_path, case, page, expected):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.html").write_text(f"<html><head></head><body>{page}</body></html>")
    assert offsite_urls(tmp_path) == [("sub/page.html", u) for u in expected]


def test_offsite_urls_reads_stylesheets(tmp_path):
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "theme.css").write_text("@import url('https://fonts.googleapis.com/x');\n"
                                                    "a { background: url(../img/a.png) }\n")
    assert offsite_urls(tmp_path) == [("_static/theme.css", "https://fonts.googleapis.com/x")]


def _jupyter_book() -> Path:
    exe = Path(sys.executable).parent / "jupyter-book"
    if not exe.is_file():
        found = shutil.which("jupyter-book")
        if found is None:
            pytest.skip("jupyter-book is not installed")
        exe = Path(found)
    return exe


def test_a_book_built_with_the_repository_config_loads_nothing_off_the_machine(tmp_path):
    """The repository's _config.yml over a two-page book (a Markdown page with maths and a citation,
    and a notebook with a widget output): the built HTML names no off-machine URL. Fails with
    sphinx_thebe among the extensions (every page then carries THEBE_JS_URL on unpkg.com)."""
    import nbformat

    book = tmp_path / "book"
    vendor = book / "_vendor"
    for asset in ("widgets/require.js", "widgets/embed-amd.js", "mathjax/tex-mml-chtml.js"):
        (vendor / asset).parent.mkdir(parents=True, exist_ok=True)
        (vendor / asset).write_text("/* stand-in for the npm asset */\n")
    shutil.copy(ROOT / "_config.yml", tmp_path / "_config.yml")
    shutil.copy(ROOT / "book" / "references.bib", book / "references.bib")
    key = re.search(r"@\w+\{([^,]+),", (book / "references.bib").read_text()).group(1)
    (book / "intro.md").write_text(f"# Intro\n\nThe loss $L = \\sum_i x_i$ {{cite}}`{key}`.\n\n"
                                   "```{bibliography}\n```\n")
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("w")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "m0", "version_major": 2, "version_minor": 0},
        "text/plain": "w"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter\n\nText."), cell]
    nb.metadata.update(kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
                       language_info={"name": "python"},
                       widgets={"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                               "version_minor": 0}})
    nbformat.write(nb, book / "chapter.ipynb")
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapter\n")
    proc = subprocess.run([str(_jupyter_book()), "build", str(book), "--config", str(tmp_path / "_config.yml"),
                           "--path-output", str(tmp_path), "-W"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    assert (html / "chapter.html").is_file() and "_static/mathjax/tex-mml-chtml.js" in (html / "intro.html").read_text()
    assert offsite_urls(html) == []


# ------------------------------------------------------------------------------ the book runner


def _tiny_notebook(path: Path, body: str) -> None:
    from test_book import _notebook

    _notebook(path, body)


MALFORMED_STATES = [
    ("list", "[]"),
    ("string", '"state"'),
    ("null", "null"),
    ("notebooks-list", '{"version": 1, "notebooks": []}'),
    ("entry-string", '{"version": 1, "notebooks": {"01_a": "done"}}'),
    ("key-number", '{"version": 1, "notebooks": {"01_a": {"key": 5, "run_id": "r"}}}'),
    ("seconds-text", '{"version": 1, "notebooks": {"01_a": {"key": "k", "run_id": "r", "seconds": "slow"}}}'),
    ("old-version", '{"version": 0, "notebooks": {}}'),
    ("not-json", "{\"version\": 1, "),
]


@pytest.mark.parametrize("case,text", MALFORMED_STATES, ids=[c for c, _ in MALFORMED_STATES])
def test_a_malformed_state_file_is_treated_as_absent_with_a_warning(tmp_path, capsys, case, text):
    """Before: a traceback (list, string, null, an entry that is no object) or silence (the rest)."""
    from fasterkd.book import STATE_FILE, STATE_VERSION, read_state

    (tmp_path / STATE_FILE).write_text(text)
    assert read_state(tmp_path) == {"version": STATE_VERSION, "notebooks": {}}
    err = capsys.readouterr().err
    assert "warning" in err and STATE_FILE in err and "every notebook runs" in err


def test_run_book_over_a_malformed_state_runs_every_notebook(tmp_path, capsys):
    """The runner end to end over ``{"notebooks": {"01_a": "done"}}``. Before: AttributeError traceback."""
    from fasterkd.book import STATE_FILE, run_book

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    (tmp_path / "pkg").mkdir()
    _tiny_notebook(nbs / "01_a.ipynb", "log('a')")
    run = tmp_path / "run"
    run.mkdir()
    (run / STATE_FILE).write_text('{"version": 1, "notebooks": {"01_a": "done"}}')
    lines: list[str] = []
    r = run_book("smoke", run_dir=run, notebooks_dir=nbs, book_dir=tmp_path / "book", package_dir=tmp_path / "pkg",
                 build=False, log=lines.append)
    assert r.ran == ["01_a"] and (run / "log.txt").read_text().split() == ["a"]
    assert "malformed" in capsys.readouterr().err


def test_a_replaced_upstream_checkpoint_reruns_the_chapters_that_read_it(tmp_path):
    """Chapter 02_search writes teacher/best.pt (fasterkd.runs.RUNS), 03_teacher_baseline reads it.
    Replacing the checkpoint's bytes re-runs 03 (and not 02); rewriting the same bytes does not.
    Before: '03_teacher_baseline: unchanged, skipped' on the replaced checkpoint."""
    from fasterkd.book import run_book

    nbs, pkg, run = tmp_path / "notebooks", tmp_path / "pkg", tmp_path / "run"
    nbs.mkdir()
    pkg.mkdir()
    _tiny_notebook(nbs / "02_search.ipynb", "(Path(run_dir) / 'teacher').mkdir(exist_ok=True)\n"
                                            "(Path(run_dir) / 'teacher' / 'best.pt').write_bytes(b'epoch 1')\nlog('search')")
    _tiny_notebook(nbs / "03_teacher_baseline.ipynb",
                   "log('baseline:' + (Path(run_dir) / 'teacher' / 'best.pt').read_text().replace(' ', '_'))")
    lines: list[str] = []

    def go():
        r = run_book("smoke", run_dir=run, notebooks_dir=nbs, book_dir=tmp_path / "book", package_dir=pkg,
                     build=False, log=lines.append)
        log = run / "log.txt"
        done = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return r, done

    r, done = go()
    assert r.ran == ["02_search", "03_teacher_baseline"] and done == ["search", "baseline:epoch_1"]
    r, done = go()
    assert r.ran == [] and done == []
    ckpt = run / "teacher" / "best.pt"
    ckpt.write_bytes(b"epoch 2")  # a better teacher dropped into the run folder
    lines.clear()
    r, done = go()
    assert r.ran == ["03_teacher_baseline"] and r.skipped == ["02_search"] and done == ["baseline:epoch_2"]
    assert any("upstream artifacts changed: teacher/best.pt" in s for s in lines), lines
    ckpt.write_bytes(b"epoch 2")  # same bytes, new mtime: nothing to redo
    r, done = go()
    assert r.ran == [] and done == []


def test_run_dir_isolates_a_run_executed_copies_and_published_book_included(tmp_path, monkeypatch):
    """With the default book folder, a run writes only under --run-dir: the book sources staged to
    RUN/book, executed copies to RUN/book/executed, the build to RUN/_build. Before: the repository's
    book/executed and _build were written by every run."""
    from fasterkd import book

    repo = tmp_path / "repo"
    (repo / "book").mkdir(parents=True)
    (repo / "book" / "intro.md").write_text("# Intro\n")
    (repo / "book" / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: executed/01_a\n")
    nbs, pkg = repo / "notebooks", repo / "fasterkd"
    nbs.mkdir()
    pkg.mkdir()
    _tiny_notebook(nbs / "01_a.ipynb", "log('a')")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    built: dict[str, Path] = {}

    def fake_build(book_dir, config=None, output_dir=None, notebooks_dir=None, log=None):
        built.update(book_dir=Path(book_dir), output_dir=Path(output_dir))
        return Path(output_dir) / "_build" / "html"

    monkeypatch.setattr(book, "ROOT", repo)
    monkeypatch.setattr(book, "build_book", fake_build)
    run = tmp_path / "elsewhere" / "run"
    r = book.run_book("smoke", run_dir=run, notebooks_dir=nbs, package_dir=pkg, log=lambda s: None)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before  # nothing new in the repository
    assert (run / "book" / "executed" / "01_a.ipynb").is_file() and (run / "book" / "intro.md").is_file()
    assert built == {"book_dir": run / "book", "output_dir": run}
    assert r.html == run / "_build" / "html"
