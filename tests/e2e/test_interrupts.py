"""Interrupts that tell the truth ([M] item 5): SIGTERM / SIGINT stop at the end of the current
step, write a resumable checkpoint, print how to resume and exit 128 + signal; the resumed run
finishes the schedule."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import mmbridge_exe

FAST = [
    "experiment=tiny",
    "data.n_train=48",
    "data.n_val=8",
    "data.n_test=8",
    "evaluation.max_samples=8",
    "evaluation.val_samples=4",
    "evaluation.batch_size=8",
    "stages.align.batch_size=8",
    "stages.instruct.batch_size=8",
    "progress_every=1",
    "stages.align.max_steps=40",
    "stages.align.val_every=40",
    "stages.align.checkpoint_every=1000",
    "stages.instruct.max_steps=6",
    "stages.instruct.val_every=6",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}


def start(tmp_path: Path, run: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{run.name}.log"
    proc = subprocess.Popen(
        [
            mmbridge_exe(),
            "train",
            *FAST,
            *extra,
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run}",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=ENV,
        cwd=tmp_path,
    )
    return proc, log


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> re.Match:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = re.search(pattern, log.read_text())
        if m:
            return m
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no '{pattern}' within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_says_how_to_resume_and_exits_nonzero(tmp_path, sig, status):
    run = tmp_path / "run"
    proc, log = start(tmp_path, run)
    wait_for(log, r"stage align, step [3-9]/40", proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == status, log.read_text()[-3000:]
    text = log.read_text()
    m = re.search(
        r"interrupted at step (\d+) of stage align; resume with: mmbridge train resume=(\S+)", text
    )
    assert m, text[-3000:]
    step = int(m.group(1))
    assert 3 <= step < 40 and Path(m.group(2)) == run
    assert "Traceback" not in text
    assert (run / "checkpoints" / "align" / "last.ckpt").is_file()
    assert not (run / "metrics.json").exists()  # not reported as a finished run

    if sig != signal.SIGTERM:
        return
    done = subprocess.run(
        [mmbridge_exe(), "train", f"resume={run}"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stages"]["align"]["steps"] == 40 and metrics["stages"]["instruct"]["steps"] == 6
    assert "test" in metrics and (run / "checkpoints" / "final" / "weights.safetensors").is_file()


def test_a_second_sigint_aborts_at_once(monkeypatch, capsys):
    """In a step the first signal is deferred to the step's end; a second SIGINT exits at once
    with 130 (``os._exit``: no cleanup can hang)."""
    from mmbridge.training import callbacks

    exits = []
    monkeypatch.setattr(callbacks.os, "_exit", lambda code: exits.append(code))
    guard = callbacks.InterruptGuard()
    guard.deferred = True
    guard._handle(signal.SIGINT, None)
    assert guard.signum == signal.SIGINT and exits == []
    guard._handle(signal.SIGINT, None)
    assert exits == [130]
    assert "second interrupt: aborting now" in capsys.readouterr().err


def test_outside_a_step_a_signal_stops_at_once():
    from mmbridge.training.callbacks import Interrupted, InterruptGuard

    guard = InterruptGuard()
    with pytest.raises(Interrupted) as err:
        guard._handle(signal.SIGTERM, None)
    assert err.value.exit_status == 143 and err.value.stage is None
