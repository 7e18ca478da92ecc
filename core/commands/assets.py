"""``mmbridge assets``: list the offline model catalogue and convert entries into the cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmbridge.errors import AssetError, did_you_mean
from mmbridge.registry.assets import Asset, cache_root, dir_size
from mmbridge.registry.plugin_manager import load_registry

DESCRIPTION = """\
List mmbridge's offline model catalogue: real pretrained weights that ship inside locally
installed packages (no model hub is needed). Each asset is converted once into a standard
format (an HF model directory, an openai-whisper checkpoint) inside the cache and checked
against its source; afterwards its name works in any model-path config field
(e.g. llm.path=smollm2-135m-instruct).

Install the source packages with:  bash scripts/setup_assets.sh .venv/bin/python
"""

EPILOG = """\
examples:
  mmbridge assets                       # table of assets and their state
  mmbridge assets --convert dinov2-small
  mmbridge assets --convert all         # convert every installed asset
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmbridge assets",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--convert",
        metavar="NAME|all",
        help="convert this asset (or every asset whose source is installed) into the cache, "
        "then print the result of its conversion check",
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        type=Path,
        help="cache directory (default: $MMBRIDGE_CACHE, else ~/.cache/mmbridge)",
    )
    return parser


def human_size(n_bytes: int) -> str:
    """``1536 -> "1.5 KiB"``."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def main(argv: list[str]) -> int:
    """Run ``mmbridge assets``; returns the exit status (1 when a conversion failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that paths stay on one line
        console = Console(width=160)
    registry = load_registry()
    assets = {e.name: e.create() for e in registry.entries("asset")}
    root = args.cache.expanduser() if args.cache else cache_root()

    status = 0
    if args.convert:
        if args.convert == "all":
            todo = [a for a in assets.values() if a.source_available()]
        elif args.convert in assets:
            todo = [assets[args.convert]]
        else:
            parser.error(
                f"unknown asset '{args.convert}'{did_you_mean(args.convert, assets)}; "
                f"available: {', '.join(assets) or '(none)'}, all"
            )
        for asset in todo:
            status |= _convert(console, asset, root)
    console.print(_table(assets, root))
    if not assets:
        console.print("no assets are registered")
    return status


def _convert(console, asset: Asset, root: Path) -> int:
    """Convert one asset (unless it already is) and print its check line; 1 on failure."""
    if asset.is_converted(root):
        console.print(
            f"[bold]{asset.name}[/]: already converted: {escape(_check_line(asset, root))}"
        )
        return 0
    start = time.perf_counter()
    try:
        with console.status(f"converting {asset.name} from {asset.source} ..."):
            asset.ensure(root)
    except AssetError as exc:
        console.print(f"[bold red]{asset.name}: conversion failed[/]: {escape(str(exc))}")
        return 1
    seconds = time.perf_counter() - start
    console.print(
        f"[bold]{asset.name}[/]: converted in {seconds:.1f} s; check: "
        f"{escape(_check_line(asset, root))}"
    )
    return 0


def _check_line(asset: Asset, root: Path) -> str:
    """The recorded check of a converted asset (CHECK.txt holds ``version=N``, then it)."""
    check = asset.location(root) / "CHECK.txt"
    if not check.is_file():
        return "(no check recorded)"
    lines = [ln for ln in check.read_text().splitlines() if not ln.startswith("version=")]
    return " ".join(lines).strip() or "(no check recorded)"


def _table(assets: dict[str, Asset], root: Path):
    table = Table(
        title=f"offline model assets (locations relative to the cache {escape(str(root))})"
    )
    table.add_column("name", no_wrap=True)
    table.add_column("format")
    table.add_column("source", overflow="fold")
    table.add_column("available")
    table.add_column("converted")
    table.add_column("location", overflow="fold")
    table.add_column("size", no_wrap=True, justify="right")
    for name, asset in assets.items():
        converted = asset.is_converted(root)
        table.add_row(
            escape(name),
            asset.format,
            escape(asset.source),
            "[green]yes[/]" if asset.source_available() else "[red]no[/]",
            "[green]yes[/]" if converted else "no",
            escape(
                str((asset.target(root) if converted else asset.location(root)).relative_to(root))
            ),
            human_size(dir_size(asset.location(root))) if converted else "-",
        )
    return table
