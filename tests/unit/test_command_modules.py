"""Command modules are safe to run as scripts.

Lightning's DDP launcher starts ranks > 0 as ``python core/commands/train.py ...``, which puts
``core/commands/`` first on ``sys.path``: a command module named like a standard-library module
(``inspect``, ``json``, ...) would then replace it for every import in those processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mmbridge.commands
from mmbridge.cli import COMMANDS


def test_no_command_module_shadows_the_standard_library():
    folder = Path(mmbridge.commands.__file__).parent
    names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert names, folder
    clashes = sorted(names & set(sys.stdlib_module_names))
    assert not clashes, f"core/commands/ modules named like standard-library modules: {clashes}"


def test_every_command_module_exists():
    folder = Path(mmbridge.commands.__file__).parent
    for name, (module, _) in COMMANDS.items():
        assert module.startswith("mmbridge.commands."), (name, module)
        assert (folder / f"{module.rsplit('.', 1)[1]}.py").is_file(), (name, module)
