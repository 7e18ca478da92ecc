"""Plain helpers shared by the test modules (imported as ``helpers``: ``tests/`` is on the
path through pytest's ``pythonpath``). Fixtures live in ``conftest.py``."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def mmbridge_exe() -> str:
    """The ``mmbridge`` console script of the interpreter running the tests."""
    exe = VENV_BIN / "mmbridge"
    return str(exe) if exe.exists() else "mmbridge"
