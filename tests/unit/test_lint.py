"""The code is ruff-clean and ruff-formatted (pyproject.toml's [tool.ruff]: line length 100).

``ruff format core plugins tests scripts examples`` formats; ``ruff check --fix`` fixes what it can.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIRS = ["core", "plugins", "tests", "scripts", "examples"]


def ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return [exe]


def test_ruff_check_is_clean() -> None:
    proc = subprocess.run(
        [*ruff(), "check", "--output-format", "concise", *DIRS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"


def test_code_is_ruff_formatted() -> None:
    proc = subprocess.run(
        [*ruff(), "format", "--check", *DIRS], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, (
        f"files not formatted (run: ruff format {' '.join(DIRS)}):\n{proc.stdout}{proc.stderr}"
    )
