"""A run directory belongs to one run: a second training into it is refused naming the holder
(pid, host), through the CLI (exit 1, one line, nothing written there) and the Python API (a
RunLockedError, never SystemExit); the first run ends intact; a lock left by a dead process is
taken over with one warning. A new training into a directory that holds a run, finished or
started, is refused too (RunExistsError: resume it or train elsewhere), and a failed attempt's
error.txt is moved aside once the run is resumed and finishes."""

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
from helpers import TINY_FAST, mmbridge_exe

import mmbridge
from mmbridge.cli import main
from mmbridge.errors import RunExistsError, RunLockedError
from mmbridge.reporting.runs import held_run, retire_error, unfinished_runs
from mmbridge.training.resume import KILL_ENV
from mmbridge.utils.run_lock import HOLDER, RunLock, holder

FAST = [
    *TINY_FAST,
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


def test_what_holds_a_run_and_retiring_an_old_error(tmp_path):
    d = tmp_path / "run"
    assert held_run(d) is None
    d.mkdir()
    assert held_run(d) is None and retire_error(d) is None
    # what a run that failed before training leaves: a new training may start there
    (d / "config.yaml").write_text("seed: 0\n")
    (d / "train.log").write_text("")
    (d / "error.txt").write_text("ConfigError: evaluation.max_new_tokens=0\n")
    assert held_run(d) is None
    (d / "checkpoints" / "align").mkdir(parents=True)
    (d / "checkpoints" / "align" / "last.ckpt").write_bytes(b"")
    assert held_run(d) == "a started run"
    (d / "metrics.json").write_text("{}")
    assert held_run(d) == "a finished run"
    os.utime(d / "error.txt", (0, 86400 * 365))  # written on 1971-01-01 (local time)
    moved = retire_error(d)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(86400 * 365))
    assert moved == d / f"error-{stamp}.txt" and not (d / "error.txt").exists()
    assert moved.read_text() == "ConfigError: evaluation.max_new_tokens=0\n"


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_new_training_refuses_a_run_and_a_resumed_run_retires_its_error(tmp_path, capsys):
    """A run killed during its last validation holds a started run; a new training into it is
    refused (CLI: exit 1, one line), every file left as it was; a resume that fails writes
    error.txt; the resume that finishes moves it aside (``mmbridge report`` no longer lists the
    run as failed); a new training into the finished run is refused through the CLI and the
    Python API (RunExistsError), every file's bytes unchanged."""
    run = tmp_path / "runs" / "run"
    cache = f"paths.cache_dir={tmp_path}/cache"
    env = {**os.environ, KILL_ENV: "align:2:validation"}
    first = subprocess.run(
        [mmbridge_exe(), "train", *FAST, cache, f"hydra.run.dir={run}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert first.returncode == -9, first.stderr[-3000:]
    assert held_run(run) == "a started run"

    def refused_by_the_cli(what: str) -> None:
        before = _files(run)
        rc = main(["train", *FAST, cache, "seed=7", f"hydra.run.dir={run}"])
        err = capsys.readouterr().err
        assert rc == 1 and err == (
            f"mmbridge train: error: hydra.run.dir={run}: this directory holds {what}, which a "
            f"new training would overwrite; continue it with resume={run}, or train into "
            f"another directory\n"
        )
        assert _files(run) == before

    refused_by_the_cli("a started run")
    assert main(["train", f"resume={run}", "evaluation.max_new_tokens=0"]) == 1
    assert "evaluation.max_new_tokens" in capsys.readouterr().err
    error = (run / "error.txt").read_text()
    assert error.startswith("ConfigError: ") and "evaluation.max_new_tokens" in error
    assert [d for d, _ in unfinished_runs(run.parent)] == [run]

    resumed = subprocess.run(
        [mmbridge_exe(), "train", f"resume={run}"], capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run / "error.txt").exists()
    (old,) = run.glob("error-*.txt")
    assert old.read_text() == error
    assert unfinished_runs(run.parent) == [] and held_run(run) == "a finished run"
    history = json.loads((run / "metrics.json").read_text())["stages"]["align"]["history"]
    assert [h["step"] for h in history] == [0.0, 2.0]  # the validation the kill came in

    refused_by_the_cli("a finished run")
    before = _files(run)
    with pytest.raises(RunExistsError) as exc:
        mmbridge.train([*FAST, cache, "seed=7"], run_dir=run)
    assert str(exc.value) == (
        f"run_dir={run}: this directory holds a finished run, which a new training would "
        f"overwrite; continue it with resume={run}, or train into another directory"
    )
    assert _files(run) == before
