"""The source notebooks stay thin: parameters, one set-up call, no unused import, lines that fit."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: the widest code line a published page shows without scrolling sideways
MAX_LINE = 90


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def unused_imports(sources: list[str]) -> list[str]:
    """Names bound by an ``import`` in ``sources`` (the code cells of one notebook) that no cell reads."""
    imported: dict[str, int] = {}
    used: set[str] = set()
    for src in sources:
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    imported.setdefault(alias.asname or alias.name.split(".")[0], node.lineno)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    imported.setdefault(alias.asname or alias.name, node.lineno)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                used.add(node.id)
    return sorted(set(imported) - used)


def test_unused_imports_finds_what_is_never_read():
    cells = ["import json\nimport matplotlib.pyplot as plt\nfrom pathlib import Path",
             "from os import path as p, sep\nplt.show()\nx = Path('a')\njson = 1"]
    assert unused_imports(cells) == ["json", "p", "sep"]  # assigning json is not reading it
    assert unused_imports(["import a.b\nprint(a.b)"]) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_imports_only_what_it_uses(path):
    unused = unused_imports(["".join(c["source"]) for c in code_cells(path)])
    assert not unused, f"{path.name} imports {', '.join(unused)} but never uses it"


def _chapter_calls(src: str) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name) and n.func.id == "chapter"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_opens_with_parameters_then_one_chapter_call(path):
    cells = code_cells(path)
    assert "parameters" in cells[0].get("metadata", {}).get("tags", []), \
        f"{path.name}: the first code cell must be the one tagged 'parameters'"
    setup = "".join(cells[1]["source"])
    calls = _chapter_calls(setup)
    assert len(calls) == 1, f"{path.name}: the set-up cell must call chapter(...) once, found {len(calls)}"
    first = calls[0].args[0]
    assert isinstance(first, ast.Constant) and first.value == path.stem, \
        f"{path.name}: chapter(...) must name the notebook itself ({path.stem!r})"
    assert "from fasterkd.runs import" in setup
    later = [i for i, c in enumerate(cells[2:], 2) if _chapter_calls("".join(c["source"]))]
    assert not later, f"{path.name}: code cells {later} open the chapter again"
    for c in cells[2:]:  # every import sits in the set-up cell
        tree = ast.parse("".join(c["source"]))
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], \
            f"{path.name}: an import outside the set-up cell: {''.join(c['source']).splitlines()[0]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_code_lines_fit_the_page(path):
    long = [(i, line) for i, c in enumerate(code_cells(path))
            for line in "".join(c["source"]).splitlines() if len(line) > MAX_LINE]
    assert not long, f"{path.name}: code lines over {MAX_LINE} characters: {long}"
