"""The wheel: every module inside, the configs inside, and it works installed elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("mmbridge-*.whl")
    return whl


def test_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for src, pkg in (
        ("core", "mmbridge"),
        ("plugins", "mmbridge/plugins"),
        ("conf", "mmbridge/conf"),
    ):
        for f in (REPO / src).rglob("*"):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                rel = f"{pkg}/{f.relative_to(REPO / src).as_posix()}"
                assert rel in names, (
                    f"{rel} is missing from the wheel: list its package in pyproject.toml"
                )
    assert "mmbridge/py.typed" in names
    assert any(
        n.endswith("entry_points.txt")
        and "console_scripts" in zipfile.ZipFile(wheel).read(n).decode()
        for n in names
    )


def test_wheel_installed_in_a_fresh_venv_runs_from_elsewhere(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    site = Path(
        subprocess.check_output(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            text=True,
        ).strip()
    )
    # The dependencies come from the test venv (added as a plain path: its .pth files, among
    # them the editable mmbridge, are not processed), mmbridge itself from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    # a user has a HOME (the default cache dir lives under it); `config` refuses a config it
    # cannot resolve
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "MMBRIDGE_DISABLE_PLUGINS": "1",
        "COLUMNS": "200",
        "HOME": str(tmp_path / "home"),
    }
    py = str(venv / "bin" / "python")
    where = subprocess.run(
        [py, "-c", "import mmbridge, mmbridge.plugins; print(mmbridge.__file__)"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(site)), where.stdout
    out = subprocess.run(
        [py, "-m", "mmbridge.cli", "config", "connector=linear"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "name: linear" in out.stdout
    out = subprocess.run(
        [py, "-m", "mmbridge.cli", "plugins"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "PATH": os.environ.get("PATH", "")},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "mmbridge.plugins.converters" in out.stdout
