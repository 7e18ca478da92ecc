"""Plain helpers shared by the test modules (imported as ``helpers``: ``tests/`` is on the
path through pytest's ``pythonpath``). Fixtures live in ``conftest.py``."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmbridge.registry import Registry

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def mmbridge_exe() -> str:
    """The ``mmbridge`` console script of the interpreter running the tests."""
    exe = VENV_BIN / "mmbridge"
    return str(exe) if exe.exists() else "mmbridge"


@cache
def shared_registry(autoload: bool = False) -> Registry:
    """The registry of the built-in components (``autoload=True``: and of the installed
    plugins), built on first use and shared by the test session: importing or collecting a test
    module builds none (modules that parametrise over it do so in ``pytest_generate_tests``).
    Tests that register components build their own."""
    from mmbridge.plugin_manager import load_registry

    return load_registry(autoload=autoload)
