"""The package's layering, checked on its import graph (README "Architecture").

Imports are read with :mod:`ast` from every module of the package (the top-level
``server/``, ``client/``, ``shared/`` and ``strategies/`` folders as ``fedspatial.<part>``);
imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("server", "client", "shared", "strategies")
MAX_LINES = 500  # issue 12: "no module over about 500 lines"
# Composition roots: the only modules that may import both the ServerApp and the ClientApp
# side (the command line, and the simulation harness that runs both apps in one process).
COMPOSITION_ROOTS = ("fedspatial.cli", "fedspatial.simulation")


def _module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    roots = {"fedspatial": ROOT / "fedspatial", **{f"fedspatial.{p}": ROOT / p for p in PARTS}}
    files: dict[str, Path] = {}
    for prefix, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if any(part in PARTS for part in rel.parts[:1]) and prefix == "fedspatial":
                continue  # the fedspatial/<part> links: read once, under their own folder
            parts = [p for p in rel.parts if p != "__init__"]
            files[".".join([prefix, *parts])] = path
    return files


MODULES = _module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Every node that runs at some point, skipping ``if TYPE_CHECKING:`` blocks."""
    for stmt in body:
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            yield from _runtime_nodes(stmt.orelse)
            continue
        yield stmt
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.stmt):
                yield from _runtime_nodes([child])
            else:
                yield from ast.walk(child)


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of what module ``name`` imports at run time (modules where they exist)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _internal(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _offenders(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{mod} imports {imp}"
        for mod, imps in GRAPH.items()
        if _in(mod, source)
        for imp in imps
        if any(_in(imp, f) for f in forbidden)
    )


def test_composition_roots_are_where_server_and_client_meet():
    # The simulation harness really imports both sides (so the rules below are not vacuous
    # for it), and nothing under server/ or client/ imports a composition root.
    sim = GRAPH["fedspatial.simulation"]
    assert any(_in(i, "fedspatial.client") for i in sim) and any(_in(i, "fedspatial.server") for i in sim)
    assert _offenders("fedspatial.server", COMPOSITION_ROOTS) == []
    assert _offenders("fedspatial.client", COMPOSITION_ROOTS) == []


def test_graph_sees_the_whole_package():
    # A reader that silently saw nothing would pass every rule below.
    assert {"fedspatial.server.app", "fedspatial.client.app", "fedspatial.shared.phases.base"} <= set(MODULES)
    assert "fedspatial.shared.phases.base" in GRAPH["fedspatial.shared.phases.describe"]
    assert "fedspatial.records" in GRAPH["fedspatial.server.federation"]
    assert any(i.startswith("flwr") for i in GRAPH["fedspatial.server.app"])


def test_server_and_client_never_import_each_other():
    assert _offenders("fedspatial.server", ("fedspatial.client",)) == []
    assert _offenders("fedspatial.client", ("fedspatial.server",)) == []


def test_shared_is_flower_free_and_imports_no_app_layer():
    forbidden = (
        "flwr",
        "fedspatial.server",
        "fedspatial.client",
        "fedspatial.strategies",
        "fedspatial.records",
        "fedspatial.cli",
        "fedspatial.deployment",
        "fedspatial.simulation",
    )
    assert _offenders("fedspatial.shared", forbidden) == []


def test_strategies_import_neither_server_nor_client():
    assert _offenders("fedspatial.strategies", ("fedspatial.server", "fedspatial.client")) == []


@pytest.mark.parametrize("app", ["fedspatial.server.app", "fedspatial.client.app"])
def test_flower_apps_never_load_the_command_line_or_deployment_code(app):
    seen, todo = set(), [app]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(_internal(GRAPH[mod]))
    banned = ("fedspatial.cli", "fedspatial.simulation", "fedspatial.deployment")
    assert sorted(m for m in seen if any(_in(m, b) for b in banned)) == []
    assert len(seen) > 10  # the walk really followed the imports


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in _internal(GRAPH[v]):
            # A module importing its own package's __init__ (e.g. for a re-exported name)
            # is not a layering cycle; Python resolves it by import order.
            if _in(v, w):
                continue
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles() == []


def test_cycle_finder_finds_a_cycle():
    saved = {k: set(v) for k, v in GRAPH.items()}
    try:
        GRAPH["fedspatial.shared.config"].add("fedspatial.shared.phases.describe")
        assert any("fedspatial.shared.config" in c for c in _cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_no_module_is_too_long():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by concern (limit {MAX_LINES} lines): {long}"



def _mypy(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(probe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.skipif(shutil.which("mypy", path=str(Path(sys.executable).parent)) is None, reason="mypy not installed (test extra)")
def test_mypy_checks_calls_across_packages(tmp_path):
    """A wrong call from outside into server/ and shared/ is reported; the right one is not."""
    good = (
        "from fedspatial.shared.phases import phase_for\n"
        "from fedspatial.shared.protocol.names import Query\n"
        "phase = phase_for(Query.TRAIN)\n"
        "print(phase.name.upper())\n"
    )
    res = _mypy(tmp_path, good)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = good + "phase_for(3)\nphase.name.no_such_method()\n"
    res = _mypy(tmp_path, bad)
    assert res.returncode == 1, res.stdout + res.stderr
    assert 'Argument 1 to "phase_for" has incompatible type "int"' in res.stdout
    assert '"str" has no attribute "no_such_method"' in res.stdout
