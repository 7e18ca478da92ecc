"""core/ type-checks clean under mypy, with the configuration in pyproject.toml ([tool.mypy])."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mypy_reports_no_errors_in_core() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    # pyproject.toml's [tool.mypy] names what to check (the package mmbridge = core/, through
    # typecheck/mmbridge); the incremental cache (.mypy_cache, ignored by git) keeps reruns short.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    report = (proc.stdout + proc.stderr).strip()
    print(report)
    assert proc.returncode == 0, (
        f"mypy found errors in core/ (typecheck/mmbridge = core):\n{report}"
    )
    checked = re.search(r"Success: no issues found in (\d+) source files", report)
    assert checked is not None, report
    # every module of core/ was checked (not only those reachable from an import)
    assert int(checked.group(1)) == len(list((ROOT / "core").rglob("*.py"))), report
