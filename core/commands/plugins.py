"""``mmbridge plugins``: the registered components, by kind, with who registered them."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from mmbridge.plugin_manager import load_registry
from mmbridge.registry import KINDS

HELP = "list registered components by kind; `plugins check` runs the contract kit"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmbridge plugins", description=(
        "List every component that plugins (built-in and installed) registered, by kind, with "
        "the plugin, package and version that registered it. `mmbridge plugins check` runs the "
        "contract suite (mmbridge.testing) on every registered connector and encoder."))
    p.add_argument("action", nargs="?", choices=["list", "check"], default="list")
    p.add_argument("--kind", choices=sorted(KINDS), help="only this kind")
    p.add_argument("--plugin", help="(check) only components of this plugin")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    registry = load_registry()
    console = Console(width=max(Console().width, 140))
    if args.action == "check":
        from mmbridge.testing.report import run_contract_checks
        return run_contract_checks(registry, console, kind=args.kind, plugin=args.plugin)
    table = Table(title="mmbridge components")
    for col in ("kind", "name", "family", "plugin", "package", "version", "description"):
        table.add_column(col, overflow="fold")
    for entry in registry.entries(args.kind):
        family = getattr(entry.cls, "family", "") or getattr(entry.cls, "modality", "") or getattr(entry.cls, "mode", "")
        o = entry.origin
        table.add_row(entry.kind, entry.name, str(family), o.plugin, o.package, o.version, entry.summary)
    console.print(table)
    if registry.config_dirs:
        console.print("config dirs from plugins: " + ", ".join(f"{d} ({o.plugin})" for d, o in registry.config_dirs))
    return 0
