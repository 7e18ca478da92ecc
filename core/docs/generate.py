"""Documentation generated from the registry, the config schema and the CLI, so it cannot drift.

One region of ``README.md`` is generated: the components of the four families
(``<!-- generated:components -->`` ... ``<!-- /generated -->``). Three reference pages of the
documentation site are generated whole: ``docs/reference/components.md`` (every registered
component with its constructor arguments), ``docs/reference/config.md`` (every config group with
its options, every schema key with its type, default, valid range and doc) and
``docs/reference/cli.md`` (every command's ``--help``); one region of
``docs/concepts/architecture.md`` is the map of the packages (:mod:`mmbridge.docs.packages`).
``mmbridge plugins --markdown components|config-groups`` prints one table;
``python -m mmbridge.docs [--check]`` rewrites (or only checks) the README region and the pages,
and ``tests/contract/test_builtin_layout.py`` fails when they differ from what this module writes.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mmbridge.cli import COMMANDS
from mmbridge.config import builtin_conf_dir
from mmbridge.contracts.connector import Converter, Perceiver
from mmbridge.docs.packages import packages_markdown
from mmbridge.docs.pages import cli_page, components_page, config_page
from mmbridge.errors import ConfigError
from mmbridge.registry import Entry, Registry
from mmbridge.registry.plugin_manager import load_registry


@dataclass(frozen=True)
class Family:
    """One row of the components table: a family of the survey (arXiv 2311.07594)."""

    title: str
    contract: str
    #: ``(label, selects)``: each non-empty selection is listed, prefixed by its label.
    parts: tuple[tuple[str, Callable[[Entry], bool]], ...]


def _connector_of(base: type) -> Callable[[Entry], bool]:
    return lambda e: e.kind == "connector" and issubclass(e.cls, base)


FAMILIES: tuple[Family, ...] = (
    Family(
        "Multimodal **Converter** (§3.1)",
        "`mmbridge.Converter` (a `Connector`): features `[B, N, D_enc]` + mask -> tokens "
        "`[B, M, D_llm]` + mask, `out_tokens(N) -> M` known before running",
        (("", _connector_of(Converter)),),
    ),
    Family(
        "Multimodal **Perceiver** (§3.2)",
        "`mmbridge.Perceiver` (a `Connector`), optionally `attach(llm)` to add layers inside "
        "the LLM",
        (("", _connector_of(Perceiver)),),
    ),
    Family(
        "**Tool Learning** (§3.3)",
        "`mmbridge.Tool` (name, description, JSON-schema arguments, `__call__ -> str`), "
        "`mmbridge.ToolCaller` (`pipeline` or `llm` mode)",
        (("", lambda e: e.kind == "tool"), ("callers ", lambda e: e.kind == "tool_caller")),
    ),
    Family(
        "**Data-Driven** (§3.4)",
        "`mmbridge.DataRecipe` (`annotate` a split, then map each sample to the stage's "
        "conversation)",
        (("", lambda e: e.kind == "recipe"),),
    ),
)

#: Config group -> what choosing one of its options decides (the README's "chooses" column).
GROUP_HELP: dict[str, str] = {
    "alignment": "AlignGPT level indicators (a sequence prefix)",
    "connector": "the bridge (Converter or Perceiver)",
    "conversation": "the conversation format the prompts are written in (LLaVA's `conv_mode`)",
    "data": "the data set",
    "encoder": "the main modality encoder",
    "experiment": "a named experiment: a small diff over the defaults",
    "hydra/launcher": "where sweep jobs run",
    "hydra/sweeper": "how sweep jobs are chosen",
    "llm": "the language model",
    "paths": "output and cache directories",
    "recipe": "a stage's data recipe (`recipe@stages.align.recipe=...`)",
    "scorer": "image-text similarity for `align_levels`",
    "stage": "what trains in a stage (used as `stages.align`, `stages.instruct`)",
    "tool_caller": "a Tool Learning caller and its settings (`pipeline` or `llm`)",
    "tools": (
        "each tool's settings; a caller takes its tools in `evaluation.tool_callers.<entry>.tools`"
    ),
    "trainer": "Lightning Trainer arguments",
}

BEGIN = "<!-- generated:{name} -->"
END = "<!-- /generated -->"
REGIONS = ("components", "config-groups", "commands")


def _names(names: Iterable[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def components_markdown(registry: Registry) -> str:
    """The four families, their contracts and the registered components of each (by name)."""
    entries = list(registry.entries())
    rows = ["| family (2311.07594) | contract | registered components |", "|---|---|---|"]
    for fam in FAMILIES:
        cells = []
        for label, selects in fam.parts:
            chosen = [e.name for e in entries if selects(e)]
            if chosen:
                cells.append(label + _names(chosen))
        rows.append(f"| {fam.title} | {fam.contract} | {'; '.join(cells) or '(none)'} |")
    return "\n".join(rows)


def config_groups(roots: Iterable[Path]) -> dict[str, list[str]]:
    """Config group -> its options in the trees ``roots``: a group is a folder holding YAML
    files (``hydra/launcher`` for a nested one); the primary config at a root is no option."""
    groups: dict[str, set[str]] = {}
    for root in roots:
        for f in root.rglob("*.yaml"):
            rel = f.relative_to(root)
            if len(rel.parts) < 2 or any(p.startswith(("_", ".")) for p in rel.parts):
                continue
            groups.setdefault(rel.parent.as_posix(), set()).add(f.stem)
    return {g: sorted(o) for g, o in sorted(groups.items())}


def config_groups_markdown(conf_dirs: Iterable[Path], strict: bool = True) -> str:
    """The config groups of ``conf_dirs`` with their options and what each group chooses.

    Raises:
        ConfigError: with ``strict``, a group of the tree has no entry in :data:`GROUP_HELP`
            (without it, such a group, e.g. one a plugin adds, is described as "(from a plugin)").
    """
    groups = config_groups(conf_dirs)
    missing = sorted(set(groups) - set(GROUP_HELP))
    if missing and strict:
        raise ConfigError(
            f"config group(s) {', '.join(missing)} have no description; add them to "
            f"GROUP_HELP in {__name__}"
        )
    rows = ["| group | options | chooses |", "|---|---|---|"]
    for group, options in groups.items():
        rows.append(
            f"| `{group}` | {_names(options)} | {GROUP_HELP.get(group, '(from a plugin)')} |"
        )
    return "\n".join(rows)


def commands_markdown() -> str:
    """The commands of the ``mmbridge`` CLI with their one-line help (``mmbridge.cli.COMMANDS``)."""
    rows = ["| command | what it does |", "|---|---|"]
    pipe = "\\|"  # a literal | inside a table cell
    rows += [
        f"| `mmbridge {name}` | {help_.replace('|', pipe)} |"
        for name, (_, help_) in COMMANDS.items()
    ]
    return "\n".join(rows)


def builtin_tables() -> dict[str, str]:
    """The README tables for the built-ins only (installed plugins are left out)."""
    return {
        "components": components_markdown(load_registry(autoload=False)),
        "config-groups": config_groups_markdown([builtin_conf_dir()]),
        "commands": commands_markdown(),
    }


def _region(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(BEGIN.format(name=name)) + r"\n.*?" + re.escape(END), re.S)


def update_regions(text: str, tables: dict[str, str], source: str = "README.md") -> str:
    """``text`` with each generated region replaced by its table.

    Raises:
        ConfigError: a region's markers are missing from ``text`` (named with ``source``).
    """
    for name, table in tables.items():
        pattern = _region(name)
        if not pattern.search(text):
            raise ConfigError(f"{source}: no region {BEGIN.format(name=name)} ... {END}")
        block = f"{BEGIN.format(name=name)}\n{table}\n{END}"
        # a function, so no escapes are read in `block`; sub calls it before the loop moves on
        text = pattern.sub(lambda _m: block, text)  # noqa: B023
    return text


#: The generated pages of the documentation site, relative to the repository root.
PAGES = ("docs/reference/components.md", "docs/reference/config.md", "docs/reference/cli.md")
#: The page whose ``packages`` region is the map of mmbridge's packages.
ARCHITECTURE = "docs/concepts/architecture.md"
#: The regions of README.md that are generated (the other tables live in the reference pages).
README_REGIONS = ("components",)


def builtin_pages() -> dict[str, str]:
    """Path (relative to the repository root) -> the generated reference page, built-ins only."""
    registry = load_registry(autoload=False)
    groups = config_groups_markdown([builtin_conf_dir()])
    return dict(zip(PAGES, (components_page(registry), config_page(groups), cli_page())))


def generated_files(root: Path) -> dict[Path, tuple[str, str]]:
    """Each generated file under ``root`` -> (its text now, the text the code gives)."""
    readme = root / "README.md"
    old = readme.read_text(encoding="utf-8")
    tables = builtin_tables()
    files = {
        readme: (old, update_regions(old, {r: tables[r] for r in README_REGIONS}, str(readme)))
    }
    for rel, text in builtin_pages().items():
        path = root / rel
        files[path] = (path.read_text(encoding="utf-8") if path.exists() else "", text)
    arch = root / ARCHITECTURE
    old_arch = arch.read_text(encoding="utf-8")
    core = Path(__file__).resolve().parents[1]  # the installed mmbridge package: core/
    files[arch] = (
        old_arch,
        update_regions(old_arch, {"packages": packages_markdown(core)}, str(arch)),
    )
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mmbridge.docs",
        description=(
            "Rewrite the generated parts of the documentation from the code: README.md's "
            "components table and the reference pages under docs/reference/."
        ),
    )
    p.add_argument(
        "root",
        type=Path,
        nargs="?",
        default=Path("."),
        help="the repository root (default: the current directory)",
    )
    p.add_argument("--check", action="store_true", help="only check; exit 1 if one is out of date")
    args = p.parse_args(argv)
    stale = []
    for path, (old, new) in generated_files(args.root).items():
        if new == old:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(new, encoding="utf-8")
            print(f"{path}: updated")
    if args.check and stale:
        print(
            f"out of date: {', '.join(map(str, stale))}; run python -m mmbridge.docs {args.root}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
