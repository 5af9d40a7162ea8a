"""The book runner: skipping, chained re-runs, failure naming the cell, resume, atomic outputs,
the toc filter, and (slow) every real notebook in the smoke profile plus the -W book build."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from fasterkd import book
from fasterkd.book import NotebookFailed, run_book
from fasterkd.publish import filter_toc, toc_files

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ tiny notebooks


def _notebook(path: Path, body: str, title: str = "") -> None:
    """A notebook following the project's convention: a ``parameters`` cell, then ``body``.

    ``body`` may use ``log(...)``, which appends a line to ``run_dir/log.txt`` so a test can see
    which notebooks really executed.
    """
    params = new_code_cell('profile = "quick"\nrun_dir = "../runs/book-quick"\ndevice = "auto"')
    params.metadata["tags"] = ["parameters"]
    helper = new_code_cell("from pathlib import Path\n"
                           "def log(msg):\n"
                           "    with open(Path(run_dir) / 'log.txt', 'a') as f:\n"
                           "        f.write(msg + '\\n')")
    nb = new_notebook(cells=[new_markdown_cell(f"# {title or path.stem}"), params, helper, new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture()
def tiny(tmp_path):
    """Three chained notebooks (a writes an artifact, b reads it and writes another, c reads b's)
    and a stand-in package folder whose files are hashed into the keys."""
    nbs, pkg = tmp_path / "notebooks", tmp_path / "pkg"
    nbs.mkdir()
    pkg.mkdir()
    (pkg / "mod.py").write_text("X = 1\n")
    _notebook(nbs / "01_a.ipynb", "(Path(run_dir) / 'a.txt').write_text(profile)\nlog('a')")
    _notebook(nbs / "02_b.ipynb", "a = (Path(run_dir) / 'a.txt').read_text()\n"
                                  "(Path(run_dir) / 'b.txt').write_text(a + '+b')\nlog('b')")
    _notebook(nbs / "03_c.ipynb", "b = (Path(run_dir) / 'b.txt').read_text()\nassert b == profile + '+b'\nlog('c')")
    lines: list[str] = []

    def run(**kw):
        kw.setdefault("build", False)
        return run_book("smoke", run_dir=tmp_path / "run", notebooks_dir=nbs, book_dir=tmp_path / "book",
                        package_dir=pkg, log=lines.append, **kw)

    def executed() -> list[str]:
        log = tmp_path / "run" / "log.txt"
        out = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return out

    return dict(root=tmp_path, nbs=nbs, pkg=pkg, run=run, executed=executed, lines=lines)


def _append_cell(path: Path, source: str) -> None:
    nb = nbformat.read(str(path), as_version=4)
    nb.cells.append(new_code_cell(source))
    nbformat.write(nb, str(path))


# ------------------------------------------------------------------------------ runner


def test_first_run_executes_in_order_and_second_run_skips_all(tiny):
    r = tiny["run"]()
    assert r.ran == ["01_a", "02_b", "03_c"] and r.skipped == []
    assert tiny["executed"]() == ["a", "b", "c"]
    run = tiny["root"] / "run"
    # parameters reached the notebooks; artifacts passed through run_dir
    assert (run / "b.txt").read_text() == "smoke+b"
    state = json.loads((run / "book_state.json").read_text())
    assert sorted(state["notebooks"]) == ["01_a", "02_b", "03_c"]
    assert state["notebooks"]["01_a"]["parameters"] == {"profile": "smoke", "run_dir": str(run), "device": "auto"}
    # progress: one line per notebook with its position
    assert any(re.match(r"\[1/3\] 01_a: running", s) for s in tiny["lines"])
    assert any(re.match(r"\[3/3\] 03_c: done in", s) for s in tiny["lines"])

    tiny["lines"].clear()
    r2 = tiny["run"]()
    assert r2.ran == [] and r2.skipped == ["01_a", "02_b", "03_c"]
    assert tiny["executed"]() == []
    assert sum("unchanged, skipped" in s for s in tiny["lines"]) == 3


def test_change_in_notebook_k_reruns_k_and_later_only(tiny):
    tiny["run"]()
    tiny["executed"]()
    _append_cell(tiny["nbs"] / "02_b.ipynb", "log('b2')")
    dry = tiny["run"](dry_run=True)
    assert [(n.name, n.status) for n in dry.notebooks] == [("01_a", "skipped"), ("02_b", "would run"),
                                                           ("03_c", "would run")]
    assert tiny["executed"]() == []
    r = tiny["run"]()
    assert r.skipped == ["01_a"] and r.ran == ["02_b", "03_c"]
    assert tiny["executed"]() == ["b", "b2", "c"]
    # outputs and metadata-only edits are not changes: a re-saved notebook does not re-run
    path = tiny["nbs"] / "03_c.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    nb.metadata["something"] = 1
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", text="old output")]
    nbformat.write(nb, str(path))
    assert tiny["run"]().ran == []


def test_package_change_reruns_everything_and_force_reruns_selected(tiny):
    tiny["run"]()
    tiny["executed"]()
    (tiny["pkg"] / "mod.py").write_text("X = 2\n")
    assert tiny["run"]().ran == ["01_a", "02_b", "03_c"]
    tiny["executed"]()
    # --only 03 --force: just that one
    r = tiny["run"](only="03", force=True)
    assert r.ran == ["03_c"] and tiny["executed"]() == ["c"]
    # ... and since 03 is last, a full run afterwards has nothing to do
    assert tiny["run"]().ran == []


def test_dry_run_on_a_fresh_run_dir_writes_nothing(tiny):
    r = tiny["run"](dry_run=True, build=True)
    assert [n.status for n in r.notebooks] == ["would run"] * 3 and r.html is None
    assert not (tiny["root"] / "run").exists() and not (tiny["root"] / "book").exists()


def test_only_rejects_unknown_names(tiny):
    with pytest.raises(ValueError, match=r"only='99' matches no notebook.*01_a"):
        tiny["run"](only="99")


def test_failure_names_notebook_and_cell_leaves_no_partial_file_and_resumes(tiny):
    tiny["run"]()
    tiny["executed"]()
    nbs, run = tiny["nbs"], tiny["root"] / "run"
    good_c = (run / "notebooks" / "03_c.ipynb").read_bytes()
    # 02_b now fails in its last cell (source cell index 4: title, parameters, helper, body, this)
    _append_cell(nbs / "02_b.ipynb", "x = 1\nraise ValueError('boom in b')")
    with pytest.raises(NotebookFailed) as info:
        tiny["run"]()
    e = info.value
    assert (e.notebook, e.cell_index, e.ename) == ("02_b", 4, "ValueError")
    assert e.evalue == "boom in b" and e.first_line == "x = 1"
    assert e.exec_count is not None and f"In [{e.exec_count}]" in str(e)
    assert str(e).startswith("notebook 02_b failed at cell 4")
    # the body of b ran (its log line) but c did not
    assert tiny["executed"]() == ["b"]
    # no partial notebook anywhere; the partial execution is kept under a name nobody reads
    outs = sorted(p.name for p in (run / "notebooks").iterdir())
    assert outs == ["01_a.ipynb", "02_b.failed.ipynb", "03_c.ipynb"]
    assert e.output == run / "notebooks" / "02_b.failed.ipynb"
    # b's last good output was for another source: removed, and not published either
    assert not (tiny["root"] / "book" / "executed" / "02_b.ipynb").exists()
    failed = json.loads(e.output.read_text())
    assert failed["metadata"]["papermill"]["exception"] is True
    # c's output is its last good one, untouched
    assert (run / "notebooks" / "03_c.ipynb").read_bytes() == good_c
    # the state forgets b (and only b) so that the next call resumes there
    state = json.loads((run / "book_state.json").read_text())
    assert sorted(state["notebooks"]) == ["01_a", "03_c"]

    # still broken: a second call fails at b again without re-running a
    with pytest.raises(NotebookFailed):
        tiny["run"]()
    assert tiny["executed"]() == ["b"]

    # fixed: resumes at b, then c (its upstream changed); a is skipped
    nb = nbformat.read(str(nbs / "02_b.ipynb"), as_version=4)
    nb.cells[-1].source = "x = 1"
    nbformat.write(nb, str(nbs / "02_b.ipynb"))
    r = tiny["run"]()
    assert r.skipped == ["01_a"] and r.ran == ["02_b", "03_c"]
    assert tiny["executed"]() == ["b", "c"]
    assert not (run / "notebooks" / "02_b.failed.ipynb").exists()


def test_cli_exit_code_and_message_on_failure(tmp_path, monkeypatch, capsys):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "00_ok.ipynb", "log('ok')")
    _notebook(nbs / "01_bad.ipynb", "1 / 0")
    monkeypatch.setattr(book, "ROOT", tmp_path)
    rc = book.main(["--profile", "smoke", "--run-dir", str(tmp_path / "run"), "--no-build"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "notebook 01_bad failed at cell 3" in err and "ZeroDivisionError" in err
    # bad input: exit 2 with the parameter named
    assert book.main(["--profile", "smoke", "--run-dir", str(tmp_path / "run"), "--data-root", str(tmp_path / "nope"),
                      "--no-build"]) == 2
    assert "data_root" in capsys.readouterr().err


def test_executed_copies_hide_parameter_cells(tiny):
    tiny["run"]()
    executed = tiny["root"] / "book" / "executed" / "01_a.ipynb"
    nb = json.loads(executed.read_text())
    tagged = {t: "remove-cell" in c["metadata"]["tags"]
              for c in nb["cells"] for t in c["metadata"].get("tags", []) if t in ("parameters", "injected-parameters")}
    assert tagged == {"parameters": True, "injected-parameters": True}
    injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"]["tags"])
    assert 'profile = "smoke"' in "".join(injected["source"])


def test_run_book_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="profile must be one of"):
        run_book("fast", run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="notebooks_dir"):
        run_book("smoke", run_dir=tmp_path, notebooks_dir=tmp_path / "missing")
    (tmp_path / "nb").mkdir()
    with pytest.raises(FileNotFoundError, match="no notebooks"):
        run_book("smoke", run_dir=tmp_path / "r", notebooks_dir=tmp_path / "nb")


# ------------------------------------------------------------------------------ toc


def test_filter_toc_drops_chapters_without_notebooks_and_empty_parts(tmp_path):
    bk, nbs = tmp_path / "book", tmp_path / "notebooks"
    (bk / "executed").mkdir(parents=True)
    nbs.mkdir()
    (bk / "intro.md").write_text("# Intro\n")
    (bk / "about.md").write_text("# About\n")
    for n in ("00_x", "01_y"):
        (nbs / f"{n}.ipynb").write_text("{}")
        (bk / "executed" / f"{n}.ipynb").write_text("{}")
    (bk / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nparts:\n"
        "  - caption: One\n    chapters:\n      - file: executed/00_x\n      - file: executed/02_z\n"
        "      - file: executed/01_y\n        sections:\n          - file: executed/03_w\n"
        "  - caption: Two\n    chapters:\n      - file: executed/04_v\n"
        "  - caption: About\n    chapters:\n      - file: about\n")
    toc, dropped = filter_toc(bk, nbs)
    assert dropped == ["executed/02_z", "executed/03_w", "executed/04_v"]
    assert toc == {"format": "jb-book", "root": "intro", "parts": [
        {"caption": "One", "chapters": [{"file": "executed/00_x"}, {"file": "executed/01_y"}]},
        {"caption": "About", "chapters": [{"file": "about"}]}]}

    # a notebook that exists but was never executed is an error, as is a missing prose page
    (nbs / "04_v.ipynb").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"executed/04_v"):
        filter_toc(bk, nbs)
    (nbs / "04_v.ipynb").unlink()
    (bk / "about.md").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['about'\]"):
        filter_toc(bk, nbs)


def test_tiny_book_builds_and_a_warning_fails_the_build(tiny):
    """run_book(build=True) publishes the executed notebooks; under -W a broken reference is an error."""
    from conftest import assets_or_skip

    from fasterkd.book import BookBuildFailed

    assets_or_skip()
    root = tiny["root"]
    bk = root / "book"
    bk.mkdir()
    (bk / "_vendor").symlink_to((ROOT / "book" / "_vendor").resolve(), target_is_directory=True)
    (bk / "references.bib").write_text((ROOT / "book" / "references.bib").read_text())
    (bk / "intro.md").write_text("# Tiny\n\n$$a^2 + b^2 = c^2$$\n")
    (bk / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: executed/01_a\n"
                                 "  - file: executed/02_b\n  - file: executed/03_c\n  - file: executed/04_later\n")
    r = tiny["run"](build=True, output_dir=root)
    assert r.html == root / "_build" / "html"
    assert sorted(p.name for p in (r.html / "executed").glob("*.html")) == ["01_a.html", "02_b.html", "03_c.html"]
    assert any("left out of the toc: executed/04_later" in s for s in tiny["lines"])

    (bk / "intro.md").write_text("# Tiny\n\nSee {doc}`no_such_page`.\n")
    with pytest.raises(BookBuildFailed, match="no_such_page"):
        tiny["run"](build=True, output_dir=root)


def test_repository_toc_lists_every_notebook_in_order():
    """book/_toc.yml names the executed copy of each notebook in notebooks/, in the runner's order."""
    chapters = [Path(f).name for f in toc_files(ROOT / "book") if f.startswith("executed/")]
    assert chapters == sorted(chapters)
    existing = [p.stem for p in book.list_notebooks(ROOT / "notebooks")]
    assert set(existing) <= set(chapters), f"notebooks missing from book/_toc.yml: {set(existing) - set(chapters)}"


# ------------------------------------------------------------------------------ the real notebooks

REAL_NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CONVENTION = {"profile": "'quick'", "run_dir": "'../runs/book-quick'", "data_root": "''", "device": "'auto'"}


@pytest.mark.parametrize("path", REAL_NOTEBOOKS, ids=[p.stem for p in REAL_NOTEBOOKS])
def test_source_notebook_follows_the_convention(path):
    """A ``parameters`` cell with the documented defaults (each name it declares), no outputs."""
    import papermill

    declared = papermill.inspect_notebook(str(path))
    assert {"profile", "run_dir", "device"} <= set(declared), f"{path.name}: parameters cell lacks a name"
    for name, info in declared.items():
        if name in CONVENTION:
            assert info["default"].replace('"', "'") == CONVENTION[name], f"{path.name}: {name} = {info['default']}"
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{path.name} is committed with outputs (clear them; executed copies are build products)"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"


# ------------------------------------------------------------------------------ the real book


@pytest.mark.slow
def test_every_notebook_runs_in_smoke_and_the_book_builds_with_W(smoke_book_result):
    r = smoke_book_result
    names = [p.stem for p in book.list_notebooks(ROOT / "notebooks")]
    assert r.ran == names, "every notebook runs on the first (fresh) smoke run"
    html = r.html
    for n in names:
        page = html / "executed" / f"{n}.html"
        assert page.is_file(), f"{page} missing"
        text = page.read_text()
        # the parameter cells are hidden; no traceback was published
        assert 'run_dir = "../runs/book-quick"' not in text
        assert "Traceback (most recent call last)" not in text
    # served from the book itself, nothing from a CDN at view time
    pages = list(html.rglob("*.html"))
    for page in pages:
        text = page.read_text()
        assert not re.search(r"""src=["']https?://""", text), f"{page.name} loads a script from the network"
    intro = (html / "intro.html").read_text()
    assert "_static/mathjax/tex-mml-chtml.js" in intro
    # the introduction prints this run's study verdicts (every claim, from study/summary.json)
    summary = json.loads((r.run_dir / "study" / "summary.json").read_text())
    assert "profile <code" in intro and "the study cannot tell" in intro
    for c in summary["claims"]:
        assert f"{c['mean']:+.2f}" in intro, c["claim"]
    # no page or stylesheet loads anything off the machine (scripts, styles, inline THEBE_JS_URL, ...)
    from test_faults_book import offsite_urls

    assert offsite_urls(html) == []
    # nothing changed: a second call would run nothing
    again = run_book("smoke", run_dir=r.run_dir, device="cpu", book_dir=html.parents[1] / "book", dry_run=True)
    assert again.skipped == names, [(n.name, n.status) for n in again.notebooks]
