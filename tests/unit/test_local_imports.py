"""Function-local imports in ``core/`` only where they are deliberate.

An import inside a function hides a dependency from the reader and from the import graph's
first glance; ``core/`` keeps one only for a reason listed here: an optional dependency, the
CLI's lazy loading (``mmbridge --help`` and ``mmbridge <command> --help`` import the command
module only, so its heavy dependencies load when the command runs), ``mmbridge.plugins``
(which imports core), or a heavy module one function needs. A new one fails this test until it
is moved to the top of its module or listed with its reason. Run this file as a script to print
the function-local imports per file.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"

CLI = "CLI: the command module is imported for `--help`; its work loads when it runs"
STARTUP = "imported at the top of command modules: keeps hydra / lightning out of `--help`"
IMPORT = "`import mmbridge` stays light (torch and omegaconf only)"
OPTIONAL = "optional dependency (an extra, or not a requirement)"
PLUGINS = "mmbridge.plugins imports core: loaded when used"
HEAVY = "heavy, and one function needs it"

#: file (relative to core/) -> {imported module: why it is imported inside a function}
ALLOWED: dict[str, dict[str, str]] = {
    "api.py": {"mmbridge.export.source": IMPORT, "mmbridge.runtime.task": IMPORT},
    "commands/evaluate.py": {
        "mmbridge.evaluation.benchmarks": CLI,
        "mmbridge.runtime.evaluate": CLI,
        "mmbridge.export.source": CLI,
        "mmbridge.registry.plugin_manager": CLI,
    },
    "commands/export.py": {"mmbridge.export": CLI},
    "commands/serve.py": {"uvicorn": OPTIONAL, "mmbridge.serving": OPTIONAL},
    "data/inputs.py": {"soundfile": OPTIONAL},
    # PEFT imports transformers (seconds); only runs that use LoRA or QLoRA need them
    "model/lora.py": {"peft": HEAVY, "transformers": HEAVY, "bitsandbytes": OPTIONAL},
    "config/schema.py": {
        "peft": HEAVY
    },  # only when a LoRA section has a key beyond the common ones
    "model/precision.py": {"torch.distributed.fsdp": HEAVY},  # FSDP runs only
    "commands/generate.py": {"mmbridge.reporting.attention_maps": CLI},
    "commands/plan.py": {"mmbridge.runtime.plan": CLI},
    "runtime/inspection.py": {
        "mmbridge.runtime.session": IMPORT,
        "mmbridge.runtime.stage": IMPORT,
    },
    "commands/plugins.py": {"mmbridge.testing.report": CLI},
    "commands/report.py": {
        "mmbridge.reporting.tables": CLI,
        "mmbridge.reporting.results": CLI,
        "mmbridge.reporting.run_report": CLI,
    },
    "commands/demo.py": {"gradio": OPTIONAL},
    "commands/sweep.py": {
        "hydra.core.override_parser.overrides_parser": CLI,
        "hydra.errors": CLI,
        "mmbridge.commands": CLI,
        "mmbridge.reporting.tables": CLI,
    },
    "commands/train.py": {
        "mmbridge.reporting.runs": CLI,
        "mmbridge.runtime.task": CLI,
        "hydra.core.hydra_config": CLI,
        "hydra.types": CLI,
        "hydra": CLI,
        "mmbridge.config.store": CLI,
    },
    "config/__init__.py": {
        "hydra": STARTUP,
        "hydra.core.global_hydra": STARTUP,
        "hydra.errors": STARTUP,
        "mmbridge.config.store": STARTUP,  # imports hydra's ConfigStore
    },
    "config/preflight.py": {
        "hydra.core.override_parser.overrides_parser": STARTUP,
        "hydra.errors": STARTUP,
    },
    "config/validation.py": {
        "lightning": STARTUP,
        "lightning.pytorch.accelerators": STARTUP,
        "hydra.core.override_parser.overrides_parser": STARTUP,
        "hydra.errors": STARTUP,
    },
    "lmms.py": {
        "lmms_eval.models.registry_v2": OPTIONAL,
        "soundfile": OPTIONAL,
        # lmms-eval imports this module for every model it lists (its entry point); Lightning
        # loads only when an mmbridge model is built
        "mmbridge.runtime.session": HEAVY,
    },
    "training/distributed.py": {"deepspeed": OPTIONAL},
    "reporting/tables.py": {"mmbridge.reporting.plots": OPTIONAL},  # matplotlib: the sweep extra
    "utils/metrics.py": {
        "whisper.normalizers": HEAVY
    },  # whisper loads numba; WER's English normaliser only
    "utils/media_io.py": {
        "soundfile": OPTIONAL,
        "scipy.signal": HEAVY,
    },  # the data extra; resampling only
    # transformers' model classes cost seconds, and plugins import this module at registry build
    "testing/tiny.py": {"tokenizers": HEAVY, "transformers": HEAVY},
    "registry/plugin_manager.py": {"mmbridge.plugins": PLUGINS},
    # PEFT and transformers' Llava (a second): `mmbridge.load` and `mmbridge eval` import this
    # package for mmbridge.export.source; only format=peft / format=hf need them
    "export/__init__.py": {"mmbridge.export.peft_format": HEAVY, "mmbridge.export.hf": HEAVY},
}


def local_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, function, imported module)`` of each import inside a function of ``path``."""
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name if function is None else f"{function}.{child.name}")
                continue
            if function is not None and isinstance(child, ast.Import):
                found.extend((child.lineno, function, a.name) for a in child.names)
            elif function is not None and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, function, "." * child.level + (child.module or "")))
            visit(child, function)

    visit(ast.parse(path.read_text(), str(path)), None)
    return found


def all_local_imports(root: Path = CORE) -> dict[str, list[tuple[int, str, str]]]:
    return {
        p.relative_to(root).as_posix(): found
        for p in sorted(root.rglob("*.py"))
        if (found := local_imports(p))
    }


def test_function_local_imports_are_deliberate():
    unlisted = [
        f"core/{file}:{line} {function}(): import {module}"
        for file, found in all_local_imports().items()
        for line, function, module in found
        if module not in ALLOWED.get(file, {})
    ]
    assert not unlisted, (
        "function-local imports without a reason: move each to the top of its "
        "module, or list it in ALLOWED with why:\n  " + "\n  ".join(unlisted)
    )


def test_every_listed_import_is_still_function_local():
    """A listed reason outlives its import only as a stale line: an entry whose import moved to
    the top of its module (or went) fails here."""
    found = {file: {m for _, _, m in imports} for file, imports in all_local_imports().items()}
    stale = [
        f"core/{file}: {module}"
        for file, modules in ALLOWED.items()
        for module in modules
        if module not in found.get(file, set())
    ]
    assert not stale, "listed in ALLOWED but no longer imported inside a function:\n  " + (
        "\n  ".join(stale)
    )


def test_the_checker_sees_nested_and_relative_imports(tmp_path):
    (tmp_path / "m.py").write_text(
        "import os\n\ndef f():\n    import json\n    def g():\n"
        "        from . import x\n    return json\n"
    )
    assert local_imports(tmp_path / "m.py") == [(4, "f", "json"), (6, "f.g", ".")]


if __name__ == "__main__":
    total = 0
    for file, found in all_local_imports().items():
        total += len(found)
        print(f"core/{file}: {len(found)}")
        for line, function, module in found:
            print(
                f"    {line:5} {function}: {module}  "
                f"[{ALLOWED.get(file, {}).get(module, 'NOT LISTED')}]"
            )
    print(f"{total} function-local imports")
    sys.exit(0)
