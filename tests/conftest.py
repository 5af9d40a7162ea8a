"""Shared fixtures: the smoke build of the whole book (every notebook, then jupyter-book -W)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def assets_or_skip() -> None:
    """The book needs the npm browser assets in book/_vendor (``make assets``).

    Skipped without them, except under ``make test`` (``FASTERKD_MAKE_TEST=1``), which fetches
    them first, so there a missing asset is a failure.
    """
    vendor = ROOT / "book" / "_vendor"
    if (vendor / "widgets" / "embed-amd.js").is_file() and (vendor / "mathjax" / "tex-mml-chtml.js").is_file():
        return
    reason = f"{vendor} lacks the browser assets (run `make assets`)"
    if os.environ.get("FASTERKD_MAKE_TEST") == "1":
        pytest.fail(f"{reason}; `make test` must build the book")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smoke_book_result(tmp_path_factory):
    """Every notebook of notebooks/ run in the ``smoke`` profile through :func:`fasterkd.book.run_book`
    and the book built with ``-W``, once per test session, in a temporary folder (the repository's
    book/executed and _build are left alone). Returns the :class:`fasterkd.book.BookResult`."""
    from fasterkd.book import run_book
    from fasterkd.publish import stage_book

    assets_or_skip()
    base = tmp_path_factory.mktemp("smoke-book")
    book = stage_book(base / "book")
    with pytest.MonkeyPatch.context() as mp:  # the notebooks' synthetic data go to this session's temporary cache
        mp.setenv("FASTERKD_CACHE", str(base / "cache"))
        return run_book("smoke", run_dir=base / "run", device="cpu", book_dir=book, output_dir=base)


@pytest.fixture(scope="session")
def smoke_book(smoke_book_result) -> Path:
    """The ``_build/html`` folder of the smoke book (see :func:`smoke_book_result`)."""
    return smoke_book_result.html


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's many small CPU convolutions on one thread, then restore the count.

    A bare ``torch.set_num_threads(1)`` at import time leaked into every later module, and the
    smoke training in test_histograms then took a different numerical path."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
