"""The import rules of ``core/`` (the package ``mmbridge``) and ``plugins/``
(``mmbridge.plugins``), checked on the import graph:

1. No cycle between modules of core/ (plugins are outside this graph: the registry loads them
   by design, ``plugin_manager``'s lazy ``import mmbridge.plugins``).
2. No cycle between packages of core/ + plugins/: a unit is a subpackage of core (``training``,
   ``evaluation``, ``runtime``, ``data``, ``export``, ...), a root module of core, or one plugin
   package (``mmbridge.plugins.encoders``, ...). So ``training`` and ``evaluation`` never import
   each other, and the run layer (``runtime``) sits above both.
3. Plugins import only the contracts, ``data`` and core's shared helpers: never the layers that
   run, evaluate, export or serve a model (:data:`ABOVE_PLUGINS`), and never another plugin
   package (what two plugin packages share lives in core, e.g. ``mmbridge.utils.media_io``,
   ``mmbridge.utils.nn_utils``, ``mmbridge.model.precision``).

Every import counts, function-local ones included (a cycle hidden inside a function is still a
cycle: the two modules cannot be understood, tested or loaded one without the other); imports
under ``if TYPE_CHECKING:`` are annotations only and do not. Run this file as a script to print
the graph (``python tests/unit/test_import_graph.py``).
"""

from __future__ import annotations

import ast
import graphlib
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"
PLUGINS = CORE.parent / "plugins"
#: Core layers a plugin never imports (rule 3): they run, evaluate, export or serve a model.
ABOVE_PLUGINS = (
    "mmbridge.training",
    "mmbridge.evaluation",
    "mmbridge.runtime",
    "mmbridge.commands",
    "mmbridge.export",
    "mmbridge.api",
    "mmbridge.cli",
    "mmbridge.lmms",
    "mmbridge.serving",
    "mmbridge.runtime.plan",
)


#: Package-level edges known to close a cycle, each with what removes it (rule 2 holds for
#: every other edge). Keep this empty.
PENDING_EDGES: dict[tuple[str, str], str] = {}


def core_modules(root: Path = CORE, prefix: str = "mmbridge") -> dict[str, Path]:
    """Dotted module name (``mmbridge.runtime.train``) -> its file, for every module under
    ``root`` (core/, or plugins/ with ``prefix="mmbridge.plugins"``)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join([prefix, *parts])] = path
    return mods


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def import_graph(root: Path = CORE, plugins: Path | None = None) -> dict[str, dict[str, int]]:
    """Module -> {imported module: line of the first such import}; self-edges and the package
    ``mmbridge`` itself are left out. Without ``plugins`` the graph is core's alone (imports of
    ``mmbridge.plugins`` left out); with it, the plugin modules under ``plugins`` join it."""
    mods = core_modules(root)
    if plugins is not None:
        mods |= core_modules(plugins, "mmbridge.plugins")

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
                if not target.startswith("mmbridge") or (
                    plugins is None and target.startswith("mmbridge.plugins")
                ):
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
    steps = [
        f"{a} ({mods[a].relative_to(CORE.parent)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])
    ]
    return " -> ".join([*steps, cycle[-1]])


def _where(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    return str(path.relative_to(CORE.parent)) if path.is_relative_to(CORE.parent) else str(path)


def unit(module: str, packages: set[str]) -> str:
    """The package-level unit of ``module`` (rule 2): ``mmbridge.runtime.train`` ->
    ``mmbridge.runtime``, ``mmbridge.plugins.encoders.hf_vision`` -> ``mmbridge.plugins.encoders``,
    a root module of core -> itself. ``packages``: the dotted names of core's subpackages."""
    parts = module.split(".")
    if parts[:2] == ["mmbridge", "plugins"]:
        return ".".join(parts[:3])
    head = ".".join(parts[:2])
    return head if head in packages else module


def package_graph(
    graph: dict[str, dict[str, int]], mods: dict[str, Path]
) -> dict[str, dict[str, tuple[str, str, int]]]:
    """Unit -> {imported unit: one ``(module, imported module, line)`` behind the edge}."""
    packages = {m for m, p in mods.items() if p.name == "__init__.py" and m.count(".") == 1}
    out: dict[str, dict[str, tuple[str, str, int]]] = {}
    for mod, deps in graph.items():
        a = unit(mod, packages)
        out.setdefault(a, {})
        for dep, line in deps.items():
            b = unit(dep, packages)
            if b != a:
                out[a].setdefault(b, (mod, dep, line))
    return out


def plugin_violations(graph: dict[str, dict[str, int]], mods: dict[str, Path]) -> list[str]:
    """Imports by plugin modules that break rule 3, as ``module (file:line) -> target: why``."""
    bad = []
    for mod, deps in graph.items():
        parts = mod.split(".")
        if parts[:2] != ["mmbridge", "plugins"] or len(parts) < 3:
            continue  # core, or the plugins package's own __init__ (it lists the packages)
        where = f"{mod} ({_where(mods[mod])}:{{}})"
        for dep, line in deps.items():
            dparts = dep.split(".")
            if dep.startswith(ABOVE_PLUGINS) and dep.split(".")[1] in {
                a.split(".")[1] for a in ABOVE_PLUGINS
            }:
                bad.append(
                    f"{where.format(line)} -> {dep}: a plugin imports only contracts, data "
                    f"and core helpers, not the layers that run or evaluate a model"
                )
            elif (
                dparts[:2] == ["mmbridge", "plugins"] and len(dparts) >= 3 and dparts[2] != parts[2]
            ):
                bad.append(
                    f"{where.format(line)} -> {dep}: another plugin package; move what the "
                    f"two share into core"
                )
    return bad


def test_core_import_graph_has_no_cycles() -> None:
    graph, mods = import_graph(), core_modules()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in core/: {describe(cycle, graph, mods)}"


def test_no_package_level_cycle_in_core_and_plugins() -> None:
    mods = core_modules() | core_modules(PLUGINS, "mmbridge.plugins")
    pgraph = package_graph(import_graph(plugins=PLUGINS), mods)
    for a, b in PENDING_EDGES:
        assert b in pgraph[a], f"{a} -> {b} no longer imported: remove it from PENDING_EDGES"
    cycle = find_cycle(
        {u: {d: 0 for d in deps if (u, d) not in PENDING_EDGES} for u, deps in pgraph.items()}
    )
    if cycle is not None:
        steps = [
            f"{a} ({_where(mods[pgraph[a][b][0]])}:{pgraph[a][b][2]})"
            for a, b in zip(cycle, cycle[1:])
        ]
        raise AssertionError("package-level import cycle: " + " -> ".join([*steps, cycle[-1]]))
    # the layering the rules promise, spelled out
    assert "mmbridge.training" not in pgraph["mmbridge.evaluation"]
    assert "mmbridge.evaluation" not in pgraph["mmbridge.training"]
    assert "mmbridge.runtime" not in pgraph["mmbridge.training"]
    assert {"mmbridge.training", "mmbridge.evaluation", "mmbridge.data"} <= set(
        pgraph["mmbridge.runtime"]
    )


def test_plugins_import_only_contracts_data_and_core_helpers() -> None:
    mods = core_modules() | core_modules(PLUGINS, "mmbridge.plugins")
    assert plugin_violations(import_graph(plugins=PLUGINS), mods) == []


def test_the_package_rules_see_a_violation(tmp_path: Path) -> None:
    """The checks themselves: a plugin importing the training layer or another plugin
    package's private module is named with its line; a two-package cycle is found."""
    graph = {
        "mmbridge.plugins.a.x": {
            "mmbridge.training.run": 3,
            "mmbridge.plugins.b._p": 4,
            "mmbridge.errors": 5,
            "mmbridge.plugins.a._own": 6,
        },
        "mmbridge.plugins.a._own": {},
        "mmbridge.plugins.b._p": {},
        "mmbridge.training.run": {},
        "mmbridge.errors": {},
    }
    mods = {m: tmp_path / "core" / f"{m.replace('.', '_')}.py" for m in graph}
    problems = plugin_violations(graph, mods)
    assert [p.split(" -> ")[1].split(":")[0] for p in problems] == [
        "mmbridge.training.run",
        "mmbridge.plugins.b._p",
    ]
    assert all(p.startswith("mmbridge.plugins.a.x (") for p in problems)
    mods |= {
        "mmbridge.training": tmp_path / "training" / "__init__.py",
        "mmbridge.evaluation": tmp_path / "evaluation" / "__init__.py",
    }
    cyclic = {
        "mmbridge.training.run": {"mmbridge.evaluation.runner": 1},
        "mmbridge.evaluation.runner": {"mmbridge.training.session": 2},
        "mmbridge.training.session": {},
    }
    pg = package_graph(cyclic, mods)
    assert pg["mmbridge.training"] == {
        "mmbridge.evaluation": ("mmbridge.training.run", "mmbridge.evaluation.runner", 1)
    }
    assert find_cycle({u: dict.fromkeys(d, 0) for u, d in pg.items()}) is not None


def test_the_checker_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    """The analysis itself: a cycle closed by a function-local import (the kind that hid
    ``assets -> plugin_manager -> registry -> assets``) or a relative import is found and named
    with its lines; one under ``TYPE_CHECKING`` is not an edge."""
    root = tmp_path / "core"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from mmbridge.b import x\n")
    (root / "b.py").write_text(
        "x = 1\n\n\ndef f():\n    from mmbridge.sub.c import y\n    return y\n"
    )
    (root / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from mmbridge.b import x\n"
        "from .. import a\nfrom mmbridge.plugins import z\ny = 2\n"
    )
    graph = import_graph(root)
    assert graph == {
        "mmbridge": {},
        "mmbridge.a": {"mmbridge.b": 1},
        "mmbridge.b": {"mmbridge.sub.c": 5},
        "mmbridge.sub": {},
        "mmbridge.sub.c": {"mmbridge.a": 4},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and len(cycle) == 4 and cycle[0] == cycle[-1]
    assert set(cycle) == {"mmbridge.a", "mmbridge.b", "mmbridge.sub.c"}
    for a, b in zip(cycle, cycle[1:]):
        assert b in graph[a]  # the cycle follows the import direction
    (root / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mmbridge.a import q\ny = 2\n"
    )
    assert find_cycle(import_graph(root)) is None


if __name__ == "__main__":
    g, m = import_graph(), core_modules()
    everything = core_modules() | core_modules(PLUGINS, "mmbridge.plugins")
    for u, d in sorted(package_graph(import_graph(plugins=PLUGINS), everything).items()):
        print(f"[package] {u} -> {', '.join(sorted(d)) or '(none)'}")
    for module in sorted(g):
        print(f"{module} -> {', '.join(sorted(g[module])) or '(none)'}")
    found = find_cycle(g)
    print(
        f"{len(g)} core modules, {sum(map(len, g.values()))} import edges, "
        f"{'cycle: ' + describe(found, g, m) if found else 'no cycle'}"
    )
    sys.exit(1 if found else 0)
