"""The research book: run the ordered notebooks with papermill, then build the Jupyter Book.

One runner serves ``make book``, ``python -m fasterkd.book``, ``fasterkd book`` and the tests::

    run_book(profile="quick")   # notebooks/*.ipynb -> runs/book-quick (book/executed, _build/html inside it)

Every notebook declares ``profile``, ``run_dir``, ``data_root`` and ``device`` in a cell tagged
``parameters``; the runner passes the ones a notebook declares (papermill injects them after that
cell). Artifacts flow between notebooks through ``run_dir``.

**Skipping.** A notebook's key hashes its source cells, the parameters, the ``fasterkd/``
sources, the key and run id of the notebook before it, and the content (SHA-256) of the upstream
artifacts it may read: every ``<run_dir>/<run>/<artifact>`` of :data:`fasterkd.runs.RUNS` written
by an earlier chapter (a checkpoint replaced in the run folder re-runs the chapters after the one
that wrote it). A notebook whose key matches its
last successful run (``run_dir/book_state.json``, written atomically after each notebook) is
skipped. Because the chain carries the upstream run id, a notebook that ran re-runs every
notebook after it, and a change re-runs that notebook and those after it only. A failed
notebook is forgotten in the state, so the next call resumes there. A state file that is not
valid JSON or not of the expected shape is treated as absent (a warning; every notebook runs).

**Failure.** :class:`NotebookFailed` names the notebook, the cell (index and ``In [n]``) and the
exception; the partially executed copy is kept as ``run_dir/notebooks/<name>.failed.ipynb`` and
the notebook's previous output (and published copy) is removed, since it no longer matches.
The command exits 1.

**Build.** A run writes only under its ``run_dir``: the book's sources are staged into
``run_dir/book`` (:func:`fasterkd.publish.stage_book`), the executed notebooks
(``injected-parameters`` and ``parameters`` cells tagged ``remove-cell`` so the pages open on
prose) are copied to ``run_dir/book/executed/`` and ``jupyter-book build --config _config.yml -W
--keep-going`` writes ``run_dir/_build/html`` (:mod:`fasterkd.publish`); ``make book`` publishes
``runs/book-quick/_build/html``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fasterkd.config import PROFILES
from fasterkd.publish import BookBuildFailed, build_book, list_notebooks

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(__file__).resolve().parent
#: the parameters every notebook may declare; the runner passes only those a notebook declares
NOTEBOOK_PARAMETERS = ("profile", "run_dir", "data_root", "device")
STATE_FILE = "book_state.json"
#: generated beside the book's sources before each build: the introduction includes it
STUDY_SUMMARY_PAGE = "study_summary.md"
STATE_VERSION = 1
KERNEL = "python3"
#: cell tags hidden in the published pages
HIDDEN_TAGS = ("injected-parameters", "parameters")


class NotebookFailed(RuntimeError):
    """A notebook raised; names the notebook, the cell and the exception.

    ``cell_index`` is the 0-based index of the failing cell in the *source* notebook
    (``notebooks/<name>.ipynb``), ``exec_count`` its ``In [n]`` in the executed copy and
    ``first_line`` the first line of its source.
    """

    def __init__(self, notebook: str, cell_index: int | None, exec_count: int | None, ename: str,
                 evalue: str, output: Path | None, first_line: str = "") -> None:
        self.notebook, self.cell_index, self.exec_count = notebook, cell_index, exec_count
        self.ename, self.evalue, self.output, self.first_line = ename, evalue, output, first_line
        where = "cell ?" if cell_index is None else f"cell {cell_index}"
        if exec_count is not None:
            where += f" (In [{exec_count}])"
        if first_line:
            where += f" `{first_line}`"
        msg = f"notebook {notebook} failed at {where}: {ename}: {evalue}"
        if output is not None:
            msg += f"; executed copy: {output}"
        super().__init__(msg)


@dataclass
class NotebookRun:
    """What happened to one notebook in :func:`run_book`."""

    name: str
    status: str  # "ran" | "skipped" | "would run" (dry run)
    seconds: float
    key: str
    output: Path


@dataclass
class BookResult:
    run_dir: Path
    notebooks: list[NotebookRun] = field(default_factory=list)
    html: Path | None = None
    build_seconds: float | None = None

    @property
    def ran(self) -> list[str]:
        return [n.name for n in self.notebooks if n.status == "ran"]

    @property
    def skipped(self) -> list[str]:
        return [n.name for n in self.notebooks if n.status == "skipped"]


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def package_hash(package_dir: str | os.PathLike = PACKAGE_DIR) -> str:
    """Hash of every source file of the package (``*.py`` and data such as arch JSON), by path.

    The runner itself (``book.py``) is left out: it does not change what a notebook computes.
    """
    package_dir = Path(package_dir)
    h = hashlib.sha256()
    for p in sorted(package_dir.rglob("*")):
        if not p.is_file() or "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo"):
            continue
        if p.relative_to(package_dir).as_posix() == "book.py":
            continue
        h.update(p.relative_to(package_dir).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def notebook_source_hash(path: str | os.PathLike) -> str:
    """Hash of what a notebook *does*: cell types, sources and tags (not outputs or ids)."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text())
        cells = [(c.get("cell_type"), "".join(c.get("source", "")), sorted(c.get("metadata", {}).get("tags", [])))
                 for c in nb["cells"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable .ipynb notebook ({type(e).__name__}: {e})") from e
    return _sha(cells)


def _link(entry: dict[str, Any]) -> str:
    """What a notebook passes down the chain: its key and the id of the run that produced it."""
    return _sha([entry["key"], entry["run_id"]])


def notebook_key(source_hash: str, parameters: dict[str, Any], pkg_hash: str, upstream: str,
                 artifacts: dict[str, str] | None = None) -> str:
    """The chained key of one notebook: its source, its parameters, the package, its upstream
    notebook and the digests of the upstream artifacts it may read (:func:`upstream_artifacts`)."""
    return _sha({"source": source_hash, "parameters": parameters, "package": pkg_hash, "upstream": upstream,
                 "artifacts": artifacts or {}})


def _file_digest(path: Path, cache: dict[tuple[str, int, int], str]) -> str:
    """SHA-256 of a file's bytes ("absent" when there is none), cached by (path, size, mtime_ns)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "absent"
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        cache[memo] = h.hexdigest()
    return cache[memo]


def upstream_artifacts(run_dir: Path, earlier: Iterable[str],
                       cache: dict[tuple[str, int, int], str] | None = None) -> dict[str, str]:
    """``{"<run>/<artifact>": sha256}`` of every run of :data:`fasterkd.runs.RUNS` whose writing
    chapter is among ``earlier`` (the notebooks before this one): what this notebook may read."""
    from fasterkd.runs import RUNS

    earlier = set(earlier)
    cache = {} if cache is None else cache
    return {f"{r.name}/{r.artifact}": _file_digest(run_dir / r.name / r.artifact, cache)
            for r in RUNS.values() if r.chapter in earlier}


# --------------------------------------------------------------------------------------------
# State (run_dir/book_state.json)
# --------------------------------------------------------------------------------------------


def _state_problem(state: Any) -> str | None:
    """Why ``state`` is not a usable book state (None if it is)."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, expected an object"
    if state.get("version") != STATE_VERSION:
        return f"version {state.get('version')!r}, expected {STATE_VERSION}"
    if not isinstance(state.get("notebooks"), dict):
        return "its 'notebooks' is not an object"
    for name, entry in state["notebooks"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) \
                or not isinstance(entry.get("run_id"), str) \
                or not isinstance(entry.get("seconds", 0.0), (int, float)) or isinstance(entry.get("seconds"), bool):
            return f"its entry for {name!r} lacks a string key and run_id or a number of seconds"
    return None


def read_state(run_dir: Path) -> dict[str, Any]:
    """``run_dir/book_state.json``; a missing, unreadable or malformed file is an empty state
    (malformed: a warning on stderr, and every notebook runs)."""
    path = run_dir / STATE_FILE
    empty = {"version": STATE_VERSION, "notebooks": {}}
    if not path.is_file():
        return empty
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"book: warning: {path} is unreadable ({type(e).__name__}); treated as absent, every notebook runs",
              file=sys.stderr)
        return empty
    why = _state_problem(state)
    if why is not None:
        print(f"book: warning: {path} is malformed ({why}); treated as absent, every notebook runs", file=sys.stderr)
        return empty
    return state


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    from fasterkd.utils import atomic_write_json

    atomic_write_json(run_dir / STATE_FILE, state)


# --------------------------------------------------------------------------------------------
# Notebook execution
# --------------------------------------------------------------------------------------------


def declared_parameters(path: Path) -> list[str]:
    """Names assigned in the notebook's ``parameters``-tagged cell (papermill's parser)."""
    import papermill

    return list(papermill.inspect_notebook(str(path)).keys())


def _select(notebooks: list[Path], only: str | Iterable[str] | None) -> set[str]:
    names = [p.stem for p in notebooks]
    if only is None:
        return set(names)
    wanted = [only] if isinstance(only, str) else list(only)
    chosen = set()
    for w in wanted:
        w = Path(w).stem
        hits = [n for n in names if n == w or n.startswith(w + "_") or n.split("_", 1)[0] == w]
        if not hits:
            raise ValueError(f"only={w!r} matches no notebook; expected one of {names}")
        chosen.update(hits)
    return chosen


def _publishable(nb: dict[str, Any]) -> dict[str, Any]:
    """A copy for the book: the parameter cells tagged ``remove-cell`` (pages open on prose)."""
    nb = copy.deepcopy(nb)
    for cell in nb.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if any(t in tags for t in HIDDEN_TAGS) and "remove-cell" not in tags:
            tags.append("remove-cell")
    return nb


def _copy_for_book(executed: Path, dest: Path) -> None:
    from fasterkd.utils import atomic_write_text

    nb = json.loads(executed.read_text())
    atomic_write_text(dest, json.dumps(_publishable(nb), indent=1, ensure_ascii=False) + "\n")


#: cells papermill adds to the executed copy (not in the source notebook)
_ADDED_TAGS = ("papermill-error-cell-tag", "injected-parameters")


def _failure_info(err: BaseException, output: Path) -> tuple[int | None, int | None, str, str, str]:
    """(source cell index, execution count, exception name, first line of the value, first source line)."""
    cell, count, first = None, getattr(err, "exec_count", None), ""
    ename = getattr(err, "ename", None) or type(err).__name__
    evalue = str(getattr(err, "evalue", None) or err).strip()
    try:  # the executed copy marks the failing cell; count only the cells of the source notebook
        nb = json.loads(output.read_text())
        source_cells = [c for c in nb["cells"] if not any(t in c.get("metadata", {}).get("tags", []) for t in _ADDED_TAGS)]
        for i, c in enumerate(source_cells):
            if c.get("metadata", {}).get("papermill", {}).get("status") == "failed":
                cell, count = i, c.get("execution_count", count)
                lines = "".join(c.get("source", "")).strip().splitlines()
                first = lines[0][:80] if lines else ""
                break
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return cell, count, str(ename), evalue.splitlines()[0] if evalue else "", first


def execute_notebook(source: Path, output: Path, parameters: dict[str, Any], cwd: Path,
                     progress_bar: bool = False) -> None:
    """Run one notebook with papermill into ``output`` atomically (temp file + rename).

    On failure the partial copy is kept as ``<name>.failed.ipynb`` and :class:`NotebookFailed`
    is raised.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.{uuid.uuid4().hex[:8]}.partial.ipynb")
    failed = output.with_name(f"{output.stem}.failed.ipynb")
    try:
        papermill.execute_notebook(
            str(source), str(tmp), parameters=parameters, kernel_name=KERNEL, cwd=str(cwd),
            progress_bar=progress_bar, log_output=False, request_save_on_cell_execute=False,
            # ipykernel logs a TCP-transport warning at every start and a KeyboardInterrupt at shutdown
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
        )
    except PapermillExecutionError as e:
        if tmp.exists():
            os.replace(tmp, failed)
        cell, count, ename, evalue, first = _failure_info(e, failed)
        raise NotebookFailed(source.stem, cell, count, ename, evalue, failed if failed.exists() else None,
                             first) from e
    except Exception as e:  # a dead kernel, a timeout, a papermill error outside any cell
        if tmp.exists():
            os.replace(tmp, failed)
        cell, count, _, _, first = _failure_info(e, failed)
        raise NotebookFailed(source.stem, cell, count, type(e).__name__, str(e).strip().split("\n")[0],
                             failed if failed.exists() else None, first) from e
    except BaseException:  # Ctrl-C: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    failed.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


def _changed_artifacts(entry: dict[str, Any] | None, artifacts: dict[str, str]) -> list[str]:
    """The upstream artifacts whose digest differs from the entry's last successful run."""
    before = entry.get("artifacts") if entry else None
    if not isinstance(before, dict):
        return []
    return [k for k, v in artifacts.items() if before.get(k, v) != v]


def _log(msg: str) -> None:
    print(msg, flush=True)  # progress lines appear at once under make and CI


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def run_book(
    profile: str = "quick",
    run_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike = "",
    device: str = "auto",
    only: str | Iterable[str] | None = None,
    build: bool = True,
    force: bool = False,
    *,
    dry_run: bool = False,
    notebooks_dir: str | os.PathLike | None = None,
    book_dir: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    package_dir: str | os.PathLike | None = None,
    log=None,
) -> BookResult:
    """Execute ``notebooks/*.ipynb`` in name order into ``run_dir`` and build the book.

    ``profile``: ``smoke`` (tests, seconds per notebook), ``quick`` (synthetic data on a 2-core
    CPU; the default), ``paper`` (Cityscapes at ``data_root``, GPU). ``run_dir`` defaults to
    ``runs/book-<profile>``. ``only`` (a name, its number prefix, or a list) runs just those
    notebooks (their upstream artifacts must already be in ``run_dir``). ``force`` re-runs
    every selected notebook. ``build=False`` stops after the notebooks. ``dry_run=True`` only
    reports which notebooks would run (``status`` ``"would run"``) and writes nothing.

    Everything is written under ``run_dir``: by default the repository's ``book/`` sources are
    staged into ``<run_dir>/book`` and the build writes ``<run_dir>/_build/html``.

    Keyword-only paths (tests and other layouts): ``notebooks_dir`` (``notebooks/``),
    ``book_dir`` (a book source folder used in place, executed copies go to
    ``<book_dir>/executed``; default: the staged ``<run_dir>/book``), ``config``
    (``_config.yml``), ``output_dir`` (the build writes ``<output_dir>/_build/html``; default
    ``run_dir``), ``package_dir`` (hashed into the keys; ``fasterkd/``).
    """
    log = log or _log
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}")
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else ROOT / "notebooks"
    run_dir = Path(run_dir) if run_dir is not None else ROOT / "runs" / f"book-{profile}"
    run_dir = run_dir.resolve()
    stage = book_dir is None  # the run's own copy of book/: nothing outside run_dir is written
    book_dir = Path(book_dir) if book_dir is not None else run_dir / "book"
    output_dir = Path(output_dir) if output_dir is not None else run_dir
    data_root = str(Path(data_root).resolve()) if str(data_root) else ""
    if data_root and not Path(data_root).is_dir():
        raise FileNotFoundError(f"data_root {data_root!r} is not a folder (expected a Cityscapes root)")

    notebooks = list_notebooks(notebooks_dir)
    if not notebooks:
        raise FileNotFoundError(f"no notebooks in {notebooks_dir}")
    selected = _select(notebooks, only)
    values = {"profile": profile, "run_dir": str(run_dir), "data_root": data_root, "device": device}
    pkg = package_hash(package_dir if package_dir is not None else PACKAGE_DIR)
    executed_dir = book_dir / "executed"
    if not dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        if stage and (ROOT / "book").is_dir():
            from fasterkd.publish import stage_book

            stage_book(book_dir, ROOT / "book")
        executed_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(run_dir)
    result = BookResult(run_dir=run_dir)
    total = len(selected)
    log(f"book: profile={profile} run_dir={run_dir} device={device} data_root={data_root or '(synthetic)'}; "
        f"{total} of {len(notebooks)} notebooks selected")

    upstream = ""
    i = 0
    t_all = time.perf_counter()
    digests: dict[tuple[str, int, int], str] = {}
    for position, nb in enumerate(notebooks):
        name = nb.stem
        declared = declared_parameters(nb)
        params = {k: values[k] for k in NOTEBOOK_PARAMETERS if k in declared}
        artifacts = upstream_artifacts(run_dir, [p.stem for p in notebooks[:position]], digests)
        key = notebook_key(notebook_source_hash(nb), params, pkg, upstream, artifacts)
        entry = state["notebooks"].get(name)
        out = run_dir / "notebooks" / f"{name}.ipynb"
        if name not in selected:
            # not run now: the chain continues from what its last successful run recorded
            upstream = _link(entry) if entry else _sha([key, "never-run"])
            continue
        i += 1
        fresh = entry is not None and entry.get("key") == key and out.is_file() and not force
        if dry_run:
            log(f"[{i}/{total}] {name}: " + ("unchanged, would be skipped" if fresh else "would run"))
            result.notebooks.append(NotebookRun(name, "skipped" if fresh else "would run", 0.0, key, out))
            upstream = _link(entry) if fresh else _sha([key, "would-run"])
            continue
        if fresh:
            log(f"[{i}/{total}] {name}: unchanged, skipped (last run {_fmt_s(entry.get('seconds', 0.0))})")
            status, seconds = "skipped", 0.0
        else:
            last = f" (last run took {_fmt_s(entry['seconds'])})" if entry and "seconds" in entry else ""
            changed = _changed_artifacts(entry, artifacts)
            why = f" (upstream artifacts changed: {', '.join(changed)})" if changed else ""
            log(f"[{i}/{total}] {name}: running{why}{last} ...")
            state["notebooks"].pop(name, None)  # forget it until it succeeds: a failure resumes here
            _write_state(run_dir, state)
            t0 = time.perf_counter()
            try:
                execute_notebook(nb, out, params, cwd=notebooks_dir.resolve(),
                                 progress_bar=sys.stderr.isatty())
            except NotebookFailed as e:
                # the last good output belongs to a different source or upstream: drop it (and its
                # published copy) so nothing reads it; the partial run is in <name>.failed.ipynb
                out.unlink(missing_ok=True)
                (executed_dir / f"{name}.ipynb").unlink(missing_ok=True)
                log(f"[{i}/{total}] {name}: FAILED after {_fmt_s(time.perf_counter() - t0)}")
                raise e
            seconds = time.perf_counter() - t0
            entry = {"key": key, "run_id": uuid.uuid4().hex, "seconds": round(seconds, 2),
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parameters": params,
                     "artifacts": artifacts}
            state["notebooks"][name] = entry
            _write_state(run_dir, state)
            status = "ran"
            log(f"[{i}/{total}] {name}: done in {_fmt_s(seconds)}")
        _copy_for_book(out, executed_dir / f"{name}.ipynb")
        result.notebooks.append(NotebookRun(name, status, seconds, key, out))
        upstream = _link(entry)
    if dry_run:
        would = sum(n.status == "would run" for n in result.notebooks)
        log(f"book: dry run: {would} would run, {len(result.skipped)} would be skipped")
        return result
    log(f"book: notebooks finished in {_fmt_s(time.perf_counter() - t_all)} "
        f"({len(result.ran)} ran, {len(result.skipped)} skipped)")

    if build:
        t0 = time.perf_counter()
        from fasterkd.study_runs import write_summary_page

        # the introduction includes this run's study verdicts (printed from its numbers, never typed)
        write_summary_page(run_dir, book_dir / STUDY_SUMMARY_PAGE)
        result.html = build_book(book_dir, config=config, output_dir=output_dir,
                                 notebooks_dir=notebooks_dir, log=log)
        result.build_seconds = time.perf_counter() - t0
        log(f"book: built {result.html / 'index.html'} in {_fmt_s(result.build_seconds)}")
    return result


# --------------------------------------------------------------------------------------------
# Command line: `python -m fasterkd.book` and `fasterkd book`
# --------------------------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, default="quick", help="smoke | quick (default) | study | paper")
    p.add_argument("--run-dir", default=None,
                   help="run folder (default runs/book-<profile>); the run writes only there, the book to RUN/_build/html")
    p.add_argument("--data-root", default="", help="Cityscapes root; empty = the embedded synthetic scenes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--only", action="append", default=None,
                   help="run only this notebook (name or number prefix; repeatable)")
    p.add_argument("--force", action="store_true", help="re-run the selected notebooks even when unchanged")
    p.add_argument("--no-build", dest="build", action="store_false", help="run the notebooks, skip jupyter-book")
    p.add_argument("--dry-run", action="store_true", help="list which notebooks would run or be skipped; run nothing")


def _cmd_book(args: argparse.Namespace) -> int:
    try:
        run_book(profile=args.profile, run_dir=args.run_dir, data_root=args.data_root, device=args.device,
                 only=args.only, build=args.build, force=args.force, dry_run=args.dry_run)
    except (NotebookFailed, BookBuildFailed) as e:
        print(f"book: error: {e}", file=sys.stderr)
        return 1
    return 0


def add_book_command(sub: "argparse._SubParsersAction") -> None:
    """Register ``fasterkd book`` (same code as ``python -m fasterkd.book``)."""
    p = sub.add_parser("book", help="run the notebooks with papermill and build the Jupyter Book",
                       description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=_cmd_book)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasterkd.book", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    from fasterkd.errors import USER_ERRORS, describe_error

    try:
        return _cmd_book(args)
    except USER_ERRORS as e:
        print(f"book: error: {describe_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
