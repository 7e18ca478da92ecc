"""The raw config object (OmegaConf's ``DictConfig``) is taken by the entry points and the parser
only (issue 28): every other module of ``core/`` reads the run's typed sections
(:class:`mmbridge.runtime.config.RunConfig`: ``session.run``) or is handed a component node as a
mapping.

Two grep-level rules, each failing when another module starts to:

1. Only the modules in :data:`ALLOWED` name ``DictConfig`` (what ``grep -rln DictConfig core``
   lists), each for the reason given.
2. Outside the entry points and the parser, no module navigates the raw config a session or a
   run carries (``session.cfg.stages``, ``run.composed["trainer"]``, ``session.cfg.get(...)``);
   handing it on whole to what stores it (a checkpoint's ``config.yaml``) is fine.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"

ENTRY = "an entry point: composes or loads the config, validates it, parses it into RunConfig"
PARSER = "the parser: composition, validation, the typed sections"
STORED = "stores the config as composed (config.yaml) and reads a stored one back"

#: file (relative to core/) -> why it may name ``DictConfig``.
ALLOWED: dict[str, str] = {
    "commands/train.py": ENTRY,
    "config/__init__.py": PARSER,
    "config/build.py": PARSER + " (a component node as composed goes to build())",
    "config/preflight.py": PARSER + " (the overrides a resumed run accepts)",
    "config/store.py": PARSER + " (the schema's structured configs, Hydra's ConfigStore)",
    "config/validation.py": PARSER,
    "runtime/config.py": PARSER + ": RunConfig.parse, and the config it keeps to be stored",
    "runtime/session.py": ENTRY + " (open_session, session_from_checkpoint)",
    "runtime/task.py": ENTRY + " (a training job: checks the config whole, resumes a stored one)",
    "training/checkpoint.py": STORED,
    "export/bundle.py": STORED + " (a bundle's, its model paths made relative)",
    "contracts/recipe.py": "the deprecated RecipeContext.cfg, kept for old callers",
}

#: Where the raw config may be navigated as well: the entry points and the parser.
NAVIGATE = (
    "commands/",
    "config/",
    "api.py",
    "cli.py",
    "lmms.py",
    "serving.py",
    "runtime/config.py",
    "runtime/session.py",
    "runtime/task.py",
)
#: Attributes holding the raw config (``Session.cfg``, ``RunConfig.composed``).
RAW = ("cfg", "composed")


def modules() -> dict[str, Path]:
    return {p.relative_to(CORE).as_posix(): p for p in sorted(CORE.rglob("*.py"))}


def names_dict_config(path: Path) -> bool:
    """What ``grep -l DictConfig`` says of the file."""
    return re.search(r"\bDictConfig\b", path.read_text()) is not None


def raw_navigation(path: Path) -> list[str]:
    """``line: expression`` of each read into a raw config held as ``<x>.cfg`` / ``<x>.composed``:
    an attribute or an item of it, or its ``get``."""

    def raw(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr in RAW

    found = [
        (node.lineno, ast.unparse(node))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute | ast.Subscript) and raw(node.value)
    ]
    return [f"{line}: {text}" for line, text in sorted(found)]


def test_only_the_entry_points_and_the_parser_name_dict_config():
    found = {rel for rel, path in modules().items() if names_dict_config(path)}
    unlisted = sorted(found - set(ALLOWED))
    assert not unlisted, (
        "these modules take the raw config (DictConfig): read the run's typed sections instead "
        "(mmbridge.runtime.config.RunConfig, session.run), or list the module in ALLOWED with "
        "why:\n  " + "\n  ".join(f"core/{m}" for m in unlisted)
    )
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"listed but no longer naming DictConfig (drop them): {stale}"


def test_no_module_below_the_entry_points_navigates_the_raw_config():
    found = [
        f"core/{rel}:{hit}"
        for rel, path in modules().items()
        if not rel.startswith(NAVIGATE)
        for hit in raw_navigation(path)
    ]
    assert not found, (
        "read the typed sections (session.run.stages, run.trainer, ...) instead of the raw "
        "config:\n  " + "\n  ".join(found)
    )


def test_the_checks_see_a_module_that_starts_to(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from omegaconf import DictConfig\n\n"
        "def f(session, run):\n"
        "    n = session.cfg.stages['align'].batch_size\n"
        "    t = run.composed['trainer']\n"
        "    d = session.cfg.get('device')\n"
        "    store(session.cfg)\n"  # handed on whole: fine
        "    return n, t, d, session.run.stages['align']\n"
    )
    assert names_dict_config(module)
    assert raw_navigation(module) == [
        "4: session.cfg.stages",
        "5: run.composed['trainer']",
        "6: session.cfg.get",
    ]
