"""The map of mmbridge's packages, read from the source: each package's docstring and the
mmbridge packages it imports (runtime imports, function-local ones included; ``TYPE_CHECKING``
blocks left out), in layer order, lowest first. ``python -m mmbridge.docs`` writes it into
``docs/concepts/architecture.md``; the import rules themselves are tests
(``tests/unit/test_import_graph.py``)."""

from __future__ import annotations

import ast
import re
from graphlib import TopologicalSorter
from pathlib import Path


def _docstring(path: Path) -> str:
    """The first paragraph of the module docstring, reST roles as Markdown code."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    return text.replace("``", "`")


def _imports(path: Path) -> set[str]:
    """The first component below ``mmbridge`` of each runtime import of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    out = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "mmbridge" else []
            if node.module == "mmbridge":
                names = [f"mmbridge.{a.name}" for a in node.names]
        out |= {n.split(".")[1] for n in names if n.startswith("mmbridge.")}
    return out


def units(core: Path) -> dict[str, tuple[str, set[str]]]:
    """``name -> (first paragraph of its docstring, the units it imports)`` for each package and
    root module of ``core`` (``mmbridge``'s own ``__init__`` and the plugins left out)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for path in sorted(core.iterdir()):
        if path.is_dir() and (path / "__init__.py").exists():
            files = sorted(path.rglob("*.py"))
            doc_of = path / "__init__.py"
        elif path.suffix == ".py" and path.name != "__init__.py":
            files, doc_of = [path], path
        else:
            continue
        name = path.name.removesuffix(".py")
        deps = set().union(*(_imports(f) for f in files))
        found[name] = (_docstring(doc_of), deps)
    known = set(found)
    return {
        n: (doc, {d for d in deps if d in known and d != n}) for n, (doc, deps) in found.items()
    }


def packages_markdown(core: Path) -> str:
    """A table of the packages (``name/``) and root modules (``name.py``), lowest layer first."""
    found = units(core)
    order = list(TopologicalSorter({n: deps for n, (_, deps) in found.items()}).static_order())
    rows = ["| unit | what it holds | imports (mmbridge) |", "|---|---|---|"]
    for name in order:
        doc, deps = found[name]
        label = f"`{name}/`" if (core / name).is_dir() else f"`{name}.py`"
        rows.append(f"| {label} | {doc.replace('|', '/')} | {', '.join(sorted(deps)) or '-'} |")
    return "\n".join(rows)
