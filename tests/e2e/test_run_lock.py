"""A run directory belongs to one run: a second training into it is refused naming the holder
(pid, host), through the CLI (exit 1, one line, nothing written there) and the Python API (a
RunLockedError, never SystemExit); the first run ends intact; a lock left by a dead process is
taken over with one warning."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import mmbridge_exe

import mmbridge
from mmbridge.cli import main
from mmbridge.errors import RunLockedError
from mmbridge.utils.run_lock import HOLDER, RunLock, holder

FAST = [
    "experiment=tiny",
    "data.n_train=48",
    "data.n_val=8",
    "data.n_test=8",
    "evaluation.max_samples=8",
    "evaluation.val_samples=4",
    "evaluation.batch_size=8",
    "trainer.enable_progress_bar=false",
    "stages.align.batch_size=8",
    "schedule=[align]",
    "stages.align.max_steps=2",
    "stages.align.val_every=2",
]
HOLD = (
    "import sys; from mmbridge.utils.run_lock import RunLock; "
    "lock = RunLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); sys.stdin.read()"
)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("MMBRIDGE_DISABLE_PLUGINS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _wait_for_holder(run: Path, proc: subprocess.Popen, timeout: float = 600) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if (run / HOLDER).is_file() and (note := holder(run)):
            return note
        time.sleep(0.2)
    raise AssertionError(f"no lock taken in {run} (exit {proc.poll()})")


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as err:
            RunLock(run).acquire()
        assert str(err.value).startswith(
            f"{run}: this run directory is in use by another run "
            f"(pid {proc.pid} on host {socket.gethostname()} since "
        )
    finally:
        proc.communicate("")  # the holder exits and the kernel frees its lock
    with RunLock(run) as lock:  # free again
        assert json.loads((run / HOLDER).read_text())["pid"] == os.getpid() and lock.run_dir == run
    assert not (run / HOLDER).exists()


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    proc.kill()  # kill -9: no release, its note stays
    proc.wait()
    assert json.loads((run / HOLDER).read_text())["pid"] == proc.pid
    assert holder(run) is None  # the kernel released the file lock with the process
    with caplog.at_level(logging.WARNING, logger="mmbridge.utils.run_lock"), RunLock(run):
        pass
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(
        f"{run}: taking over the lock of a run that ended without releasing it "
        f"(pid {proc.pid} on host {socket.gethostname()}"
    )


@pytest.mark.slow
def test_two_trainings_into_one_run_directory(tmp_path, capsys):
    """A real training holds its directory; a second `mmbridge train` into it (CLI and API)
    is refused while it runs, and the first finishes with its own files intact."""
    run = tmp_path / "run"
    cache = f"paths.cache_dir={tmp_path}/cache"
    first = subprocess.Popen(
        [mmbridge_exe(), "train", *FAST, cache, f"hydra.run.dir={run}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        note = _wait_for_holder(run, first)
        assert note["pid"] == first.pid
        rc = main(["train", *FAST, cache, "seed=7", f"hydra.run.dir={run}"])
        text = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in text
        assert f"this run directory is in use by another run (pid {first.pid} on host" in text
        with pytest.raises(RunLockedError, match=f"pid {first.pid} on host"):
            mmbridge.train([*FAST, cache, "seed=7"], run_dir=run)
        assert holder(run) is not None, "the first run ended before the second was tried"
    finally:
        out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["seed"] == 0 and "test" in metrics
    assert "seed=7" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert "seed=7" not in (run / "train.log").read_text() and not (run / "error.txt").exists()
    assert not (run / HOLDER).exists()
