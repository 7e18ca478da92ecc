"""``mmbridge plugins``: the registered components, by kind, with who registered them."""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmbridge.config import builtin_conf_dir
from mmbridge.docs.generate import REGIONS, components_markdown, config_groups_markdown
from mmbridge.registry import KINDS, Registry
from mmbridge.registry.plugin_manager import load_registry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmbridge plugins",
        description=(
            "List every component that plugins (built-in and installed) registered, by kind, with "
            "the plugin, package and version that registered it. `mmbridge plugins check` runs the "
            "contract suite (mmbridge.testing) on every registered connector and encoder."
        ),
    )
    p.add_argument("action", nargs="?", choices=["list", "check"], default="list")
    p.add_argument("--kind", choices=sorted(KINDS), help="only this kind")
    p.add_argument("--plugin", help="(check) only components of this plugin")
    p.add_argument(
        "--markdown",
        nargs="?",
        const="components",
        choices=REGIONS,
        help=(
            "print a README table as Markdown: the components of the four families (default) or "
            "the config groups with their options (`python -m mmbridge.docs` rewrites README.md)"
        ),
    )
    return p


def _markdown(registry: Registry, which: str) -> str:
    if which == "components":
        return components_markdown(registry)
    dirs = [builtin_conf_dir()] + [
        Path(str(files(d[len("pkg://") :]))) if d.startswith("pkg://") else Path(d)
        for d, _ in registry.config_dirs
    ]
    return config_groups_markdown(dirs, strict=False)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    registry = load_registry()
    if args.markdown:
        print(_markdown(registry, args.markdown))
        return 0
    console = Console(width=max(Console().width, 140))
    if args.action == "check":
        from mmbridge.testing.report import run_contract_checks

        return run_contract_checks(registry, console, kind=args.kind, plugin=args.plugin)
    table = Table(title="mmbridge components")
    for col in ("kind", "name", "family", "plugin", "package", "version", "description"):
        table.add_column(col, overflow="fold")
    for entry in registry.entries(args.kind):
        family = (
            getattr(entry.cls, "family", "")
            or getattr(entry.cls, "modality", "")
            or getattr(entry.cls, "mode", "")
        )
        o = entry.origin
        table.add_row(
            entry.kind, entry.name, str(family), o.plugin, o.package, o.version, entry.summary
        )
    console.print(table)
    if registry.config_dirs:
        console.print(
            "config dirs from plugins: "
            + ", ".join(f"{d} ({o.plugin})" for d, o in registry.config_dirs)
        )
    return 0
