"""Publishing the research book: the table of contents cut to the chapters that exist, and
``jupyter-book build -W`` of the executed notebooks (:mod:`fasterkd.book` runs them first).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class BookBuildFailed(RuntimeError):
    """``jupyter-book build -W`` returned non-zero (a warning counts as an error)."""


def list_notebooks(notebooks_dir: str | os.PathLike) -> list[Path]:
    """``notebooks/*.ipynb`` in name order (checkpoints and hidden files left out)."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        raise FileNotFoundError(f"notebooks_dir {str(notebooks_dir)!r} is not a folder")
    return sorted(p for p in notebooks_dir.glob("*.ipynb") if not p.name.startswith("."))


def _page_exists(book_dir: Path, page: str) -> bool:
    return any((book_dir / (page + ext)).is_file() for ext in ("", ".md", ".ipynb", ".rst"))


def read_toc(book_dir: Path) -> dict[str, Any]:
    """``<book_dir>/_toc.yml`` as a dict (a clear error when it is missing or malformed)."""
    import yaml

    toc_path = book_dir / "_toc.yml"
    if not toc_path.is_file():
        raise FileNotFoundError(f"{toc_path} not found (the book's table of contents)")
    try:
        toc = yaml.safe_load(toc_path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{toc_path}: not valid YAML ({e})") from e
    if not isinstance(toc, dict) or not isinstance(toc.get("root"), str):
        raise ValueError(f"{toc_path}: expected a jb-book mapping with a 'root' page")
    return toc


def toc_files(book_dir: Path) -> list[str]:
    """Every ``file:``/``root:`` entry of ``<book_dir>/_toc.yml`` (paths without suffix)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("root", "file") and isinstance(v, str):
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(read_toc(book_dir))
    return found


def filter_toc(book_dir: Path, notebooks_dir: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """The table of contents restricted to the chapters that exist, and the pages left out.

    A chapter ``executed/<name>`` whose notebook ``notebooks/<name>.ipynb`` has not been written
    yet is left out (with its sub-sections), so the book builds with ``-W`` while chapters are
    still being added. Any other missing page is an error: a notebook that exists but has no
    executed copy, or a prose page named in the toc but absent.
    """
    notebooks_dir = notebooks_dir if notebooks_dir is not None else ROOT / "notebooks"
    toc = copy.deepcopy(read_toc(book_dir))
    dropped: list[str] = []
    missing: list[str] = []

    def keep(entry: Any) -> bool:
        page = entry.get("file") if isinstance(entry, dict) else None
        if page is None or _page_exists(book_dir, page):
            return True
        parts = Path(page).parts
        if len(parts) == 2 and parts[0] == "executed" and not (notebooks_dir / f"{parts[1]}.ipynb").is_file():
            dropped.append(page)
        else:
            missing.append(page)
        return False

    def prune(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k in ("chapters", "sections", "parts") and isinstance(v, list):
                    v = [prune(e) for e in v if keep(e)]
                    # an emptied part or section list would be invalid in the toc: drop the key
                    v = [e for e in v if not (isinstance(e, dict) and "file" not in e and not e.get("chapters"))]
                    if not v:
                        continue
                out[k] = v
            return out
        return node

    if not _page_exists(book_dir, toc["root"]):
        missing.append(toc["root"])
    toc = prune(toc)
    if missing:
        raise FileNotFoundError(
            f"{book_dir / '_toc.yml'} lists pages that do not exist: {missing} (executed chapters "
            "appear under executed/ once `python -m fasterkd.book` has run their notebooks)")
    return toc, dropped


def _jupyter_book_command() -> list[str]:
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())"]


def build_book(book_dir: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
               output_dir: str | os.PathLike | None = None, notebooks_dir: str | os.PathLike | None = None,
               log=None) -> Path:
    """``jupyter-book build <book_dir> --config <config> -W --keep-going``; returns the html folder.

    The table of contents is filtered to the chapters whose notebooks exist (:func:`filter_toc`)
    and written to ``<output_dir>/_build/_toc.yml``; the book's ``_toc.yml`` stays untouched.
    """
    import yaml

    log = log or (lambda msg: print(msg, flush=True))
    book_dir = Path(book_dir) if book_dir is not None else ROOT / "book"
    config = Path(config) if config is not None else ROOT / "_config.yml"
    output_dir = Path(output_dir) if output_dir is not None else ROOT
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else ROOT / "notebooks"
    if not config.is_file():
        raise FileNotFoundError(f"config {str(config)!r} not found (the Jupyter Book _config.yml)")
    toc, dropped = filter_toc(book_dir, notebooks_dir)
    if dropped:
        log(f"book: chapters without a notebook yet, left out of the toc: {', '.join(dropped)}")
    listed = {Path(f).name for f in toc_files(book_dir) if f.startswith("executed/")}
    unlisted = [p.stem for p in list_notebooks(notebooks_dir) if p.stem not in listed]
    if unlisted:
        log(f"book: notebooks not in {book_dir / '_toc.yml'} (executed but not published): {', '.join(unlisted)}")
    vendor = book_dir / "_vendor"
    if not (vendor / "widgets" / "embed-amd.js").is_file() or not (vendor / "mathjax" / "tex-mml-chtml.js").is_file():
        raise FileNotFoundError(f"{vendor} lacks the browser assets (run `make assets`: widgets/embed-amd.js, "
                                "widgets/require.js and mathjax/ from the npm registry)")
    from fasterkd.utils import atomic_write_text

    toc_path = (output_dir / "_build" / "_toc.yml").resolve()
    atomic_write_text(toc_path, "# generated by fasterkd.book from book/_toc.yml (chapters that exist)\n"
                      + yaml.safe_dump(toc, sort_keys=False))
    html = output_dir / "_build" / "html"
    cmd = _jupyter_book_command() + ["build", str(book_dir), "--config", str(config), "--toc", str(toc_path),
                                     "--path-output", str(output_dir), "-W", "--keep-going", "--quiet"]
    log("book: jupyter-book " + " ".join(cmd[-11:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise BookBuildFailed(f"jupyter-book build failed (rc={proc.returncode}; warnings are errors):\n{tail}")
    return html


def stage_book(dest: str | os.PathLike, book_dir: str | os.PathLike | None = None) -> Path:
    """Copy the book's sources (not ``executed/``) to ``dest``, linking the vendored assets.

    Lets tests and side builds (another profile) publish without touching ``book/executed``.
    """
    book_dir = Path(book_dir) if book_dir is not None else ROOT / "book"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in book_dir.iterdir():
        if p.name in ("executed", "_vendor", "_build") or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dest / p.name, dirs_exist_ok=True)
        else:
            shutil.copy2(p, dest / p.name)
    link = dest / "_vendor"
    if not link.exists() and (book_dir / "_vendor").exists():
        link.symlink_to((book_dir / "_vendor").resolve(), target_is_directory=True)
    return dest
