"""The import graph of ``core/`` (the package ``mmbridge``) has no cycles.

Every import counts, function-local ones included (a cycle hidden inside a function is still a
cycle: the two modules cannot be understood, tested or loaded one without the other); imports
under ``if TYPE_CHECKING:`` are annotations only and do not. ``mmbridge.plugins`` is outside the
graph. Run this file as a script to print the graph (``python tests/test_import_graph.py``).
"""

from __future__ import annotations

import ast
import graphlib
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"


def core_modules(root: Path = CORE) -> dict[str, Path]:
    """Dotted module name (``mmbridge.training.run``) -> its file, for every module of core/."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(["mmbridge", *parts])] = path
    return mods


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def import_graph(root: Path = CORE) -> dict[str, dict[str, int]]:
    """Module -> {imported core module: line of the first such import}; self-edges, the
    package ``mmbridge`` itself and ``mmbridge.plugins`` are left out."""
    mods = core_modules(root)

    def owner(name: str) -> str | None:  # mmbridge.errors.ConfigError -> mmbridge.errors
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, ``level - 1`` packages up
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                if not target.startswith("mmbridge") or target.startswith("mmbridge.plugins"):
                    continue
                dep = owner(target)
                if dep and dep not in (mod, "mmbridge"):
                    graph[mod].setdefault(dep, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]`` (``graphlib`` finds it), or ``None``."""
    try:
        tuple(graphlib.TopologicalSorter({m: set(d) for m, d in graph.items()}).static_order())
    except graphlib.CycleError as exc:
        return list(reversed(exc.args[1]))  # graphlib lists it against the import direction
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]], mods: dict[str, Path]) -> str:
    """``a (core/a.py:12) -> b (core/b.py:40) -> a``: where each import of the cycle is."""
    steps = [f"{a} ({mods[a].relative_to(CORE.parent)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join([*steps, cycle[-1]])


def test_core_import_graph_has_no_cycles() -> None:
    graph, mods = import_graph(), core_modules()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in core/: {describe(cycle, graph, mods)}"


def test_the_checker_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    """The analysis itself: a cycle closed by a function-local import (the kind that hid
    ``assets -> plugin_manager -> registry -> assets``) or a relative import is found and named
    with its lines; one under ``TYPE_CHECKING`` is not an edge."""
    root = tmp_path / "core"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from mmbridge.b import x\n")
    (root / "b.py").write_text("x = 1\n\n\ndef f():\n    from mmbridge.sub.c import y\n    return y\n")
    (root / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                       "if TYPE_CHECKING:\n    from mmbridge.b import x\n"
                                       "from .. import a\nfrom mmbridge.plugins import z\ny = 2\n")
    graph = import_graph(root)
    assert graph == {"mmbridge": {}, "mmbridge.a": {"mmbridge.b": 1},
                     "mmbridge.b": {"mmbridge.sub.c": 5}, "mmbridge.sub": {},
                     "mmbridge.sub.c": {"mmbridge.a": 4}}
    cycle = find_cycle(graph)
    assert cycle is not None and len(cycle) == 4 and cycle[0] == cycle[-1]
    assert set(cycle) == {"mmbridge.a", "mmbridge.b", "mmbridge.sub.c"}
    for a, b in zip(cycle, cycle[1:]):
        assert b in graph[a]  # the cycle follows the import direction
    (root / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                       "if TYPE_CHECKING:\n    from mmbridge.a import q\ny = 2\n")
    assert find_cycle(import_graph(root)) is None


if __name__ == "__main__":
    g, m = import_graph(), core_modules()
    for module in sorted(g):
        print(f"{module} -> {', '.join(sorted(g[module])) or '(none)'}")
    found = find_cycle(g)
    print(f"{len(g)} core modules, {sum(map(len, g.values()))} import edges, "
          f"{'cycle: ' + describe(found, g, m) if found else 'no cycle'}")
    sys.exit(1 if found else 0)
