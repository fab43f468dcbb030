"""The house rules of the layout: no import cycle between modules, the core never imports tuning.

The import graph is read from the source (``ast``), counting imports inside functions too, since a
cycle through a lazy import is still a cycle in the design. ``from pkg import name`` counts as an
edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package each is installed as (pyproject.toml wheel.packages).
PACKAGES = {"tvm_compress": "tvm_compress", "passes": "tvm_compress.passes",
            "tuning": "tvm_compress.tuning"}
# The application layer: commands may drive any search, so they alone may import tuning.
APP = ("tvm_compress.cli",)


def module_files() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, mod, is_package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for target in targets:
                # `import a.b.c` also runs a and a.b, but those are packages whose __init__ we
                # keep free of imports (checked below), so the edge to the named module suffices.
                if target in mods and target != mod:
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    graph = import_graph()
    # runtime.deploy imports the build function lazily, inside a function.
    assert "tvm_compress.backend.build" in graph["tvm_compress.runtime.deploy"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_core_never_imports_tuning() -> None:
    graph = import_graph()
    offenders = sorted(
        f"{mod} -> {dep}" for mod, deps in graph.items() for dep in deps
        if mod.startswith("tvm_compress.") and not mod.startswith(("tvm_compress.tuning", *APP))
        and dep.startswith("tvm_compress.tuning"))
    assert offenders == []


def test_passes_import_only_the_core() -> None:
    graph = import_graph()
    offenders = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                       if m.startswith("tvm_compress.passes")
                       and d.startswith(("tvm_compress.tuning", "tvm_compress.cli")))
    assert offenders == []


@pytest.mark.parametrize("package", ["frontend", "graph", "quant", "backend", "runtime", "cli"])
def test_subpackages_exist_and_init_is_light(package: str) -> None:
    init = ROOT / "tvm_compress" / package / "__init__.py"
    assert init.is_file()
    tree = ast.parse(init.read_text())
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
               and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    assert imports == [], f"{init} imports at module level; keep package __init__ files light"


def test_no_flat_core_modules() -> None:
    """The core's top level holds only the entry points; everything else lives in a role package."""
    flat = sorted(p.name for p in (ROOT / "tvm_compress").glob("*.py"))
    assert set(flat) <= {"__init__.py", "errors.py", "data.py", "plan.py", "api.py"}, flat
