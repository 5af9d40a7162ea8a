"""The package's shape, read from its source with ``ast`` (nothing is imported):

- imports run one way: no import cycle among the modules of ``fasterkd/``;
- no module over 600 lines, except ``models/hrnet.py`` (it mirrors an official file);
- the command line (``fasterkd/cli.py``) parses flags, calls the library and prints, nothing more.

What counts as an import for the cycles: every ``import`` statement that can run, at module level
AND inside functions or methods. A deferred import hides a cycle from Python's import machinery,
not from the reader: the two modules still need each other. Only imports under
``if TYPE_CHECKING:`` are left out, since they never run (annotations only). ``from pkg import name``
is an arrow to ``pkg.name`` when that is a module of the package, else to ``pkg`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fasterkd"
MAX_LINES = 600
LONG_ON_PURPOSE = {"models/hrnet.py"}  # mirrors the official HRNet file, block for block


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package``."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package modules that module ``name`` imports (anywhere but under TYPE_CHECKING) -> first line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, line)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    add(full if full in modules else base, child.lineno)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    modules = module_names(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_closed_path(sorted(component), graph))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _closed_path(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """One loop through the component, from its first module back to it (breadth-first)."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w in members and w not in previous:
                previous[w] = v
                if w == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                queue.append(w)
    return component


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert "fasterkd.config" in graph["fasterkd.train"]  # the reader sees imports at all
    found = cycles(graph)
    assert not found, "import cycles (module -> imported module):\n" + "\n".join(describe(c, graph) for c in found)


def test_the_cycle_finder_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                              "def g():\n    import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b": 1} and graph["pkg.sub.b"] == {"pkg.c": 2}
    assert graph["pkg.c"] == {"pkg.a": 5}  # the TYPE_CHECKING import (line 3) is not an arrow
    (found,) = cycles(graph)
    assert found == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    assert describe(found, graph) == "pkg.a (line 1) -> pkg.sub.b (line 2) -> pkg.c (line 5) -> pkg.a"
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    assert cycles(import_graph(pkg)) == []


def test_no_module_over_600_lines():
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert set(LONG_ON_PURPOSE) <= set(sizes)
    long = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in LONG_ON_PURPOSE}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# The command line: what a function of cli.py may be, by its name
CLI_ROLES = ("_add_", "_cmd_", "_parse_", "_print_")  # register parsers, dispatch, flags -> arguments, print
CLI_ENTRIES = {"build_parser", "main"}
MAX_COMMAND_STATEMENTS = 10


def _is_print(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and \
        isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "print"


def cli_problems(source: str) -> list[str]:
    """Why ``source`` (a CLI module) holds more than parsing, dispatching and printing; [] if not."""
    problems = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            problems.append(f"class {node.name}: the CLI defines no classes")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name not in CLI_ENTRIES and not node.name.startswith(CLI_ROLES):
                problems.append(f"{node.name}(): not a parser, dispatcher, flag parser or printer "
                                f"(names: {sorted(CLI_ENTRIES)} or {CLI_ROLES}...)")
            if node.name.startswith("_cmd_"):
                statements = [n for n in ast.walk(node) if isinstance(n, ast.stmt) and n is not node
                              and not isinstance(n, (ast.Import, ast.ImportFrom))]
                if len(statements) > MAX_COMMAND_STATEMENTS:
                    problems.append(f"{node.name}(): {len(statements)} statements, more than "
                                    f"{MAX_COMMAND_STATEMENTS}: the work belongs in the library")
                for n in ast.walk(node):
                    if isinstance(n, (ast.While, ast.With, ast.Try, ast.FunctionDef, ast.Lambda, ast.ClassDef)) \
                            and n is not node:
                        problems.append(f"{node.name}(): a {type(n).__name__} (line {n.lineno})")
                    if isinstance(n, ast.For) and not all(_is_print(s) for s in n.body):
                        problems.append(f"{node.name}(): a loop that does more than print (line {n.lineno})")
    return problems


def test_the_cli_parses_dispatches_and_prints_only():
    assert cli_problems((PACKAGE / "cli.py").read_text()) == []


@pytest.mark.parametrize("source, problem", [
    ("def helper(x):\n    return x\n", "helper(): not a parser"),
    ("class Runner:\n    pass\n", "class Runner"),
    ("def _cmd_x(args):\n    for f in args.files:\n        open(f).read()\n", "a loop that does more than print"),
    ("def _cmd_x(args):\n    with open(args.f) as fh:\n        print(fh.read())\n", "a With"),
    ("def _cmd_x(args):\n" + "    a = 1\n" * 11, "11 statements"),
])
def test_the_cli_rule_names_what_breaks_it(source, problem):
    found = cli_problems(source)
    assert found and problem in found[0]
    assert cli_problems("def _cmd_x(args):\n    for k in args.k:\n        print(k)\n    return 0\n") == []
