"""The CLI, run as a user runs it: a subprocess, from a directory outside the repository."""

from __future__ import annotations

import os
import subprocess

from helpers import mmbridge_exe


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}
    return subprocess.run(
        [mmbridge_exe(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_help_lists_every_subcommand(tmp_path):
    from mmbridge.cli import COMMANDS

    out = run("--help", cwd=tmp_path)
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in out.stdout


def test_unknown_command_suggests(tmp_path):
    out = run("trian", cwd=tmp_path)
    assert out.returncode == 2 and "did you mean 'train'" in out.stderr


def test_plugins_lists_builtins_with_origin(tmp_path):
    out = run("plugins", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if " mlp " in line)
    assert "connector" in row and "mmbridge.plugins.converters" in row and "converter" in row


def test_config_prints_composed_yaml_and_applies_overrides(tmp_path):
    out = run("config", "connector=linear", "stages.align.max_steps=7", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: linear" in out.stdout and "max_steps: 7" in out.stdout


def test_config_groups_and_bad_option(tmp_path):
    out = run("config", "--groups", cwd=tmp_path)
    assert out.returncode == 0 and "connector:" in out.stdout and "experiment:" in out.stdout
    bad = run("config", "connector=nope", cwd=tmp_path)
    assert bad.returncode == 1 and "unknown option 'nope' of config group 'connector'" in bad.stderr
