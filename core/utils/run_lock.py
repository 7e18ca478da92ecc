"""A run directory belongs to one run: an exclusive lock held while a run writes into it.

The lock is an OS file lock (``filelock``: ``flock`` on POSIX) on ``<run>/.mmbridge.lock``, so
the kernel releases it when its process dies however it dies (``kill -9`` included): a stale
lock is simply free. Beside it, ``.mmbridge.lock.json`` names the holder (pid, host, start time,
command line): a second process is refused with that name, and a process that finds the note of
a holder that died without releasing it takes over with one warning.

Only the global rank 0 of a multi-process run locks (the other ranks write nothing there).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock, Timeout

from mmbridge.errors import ConfigError, RunLockedError, StorageError
from mmbridge.utils.io import atomic_write_json

log = logging.getLogger(__name__)

LOCK = ".mmbridge.lock"
HOLDER = ".mmbridge.lock.json"


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock now (its note), or None when it is free."""
    run_dir = Path(run_dir)
    if not (run_dir / LOCK).is_file():
        return None
    probe = FileLock(str(run_dir / LOCK), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return _note(run_dir) or {"pid": "?", "host": "?"}
    except OSError:  # a read-only run directory: nobody writes there
        return None
    probe.release()
    return None


def describe(note: dict[str, Any]) -> str:
    """``pid 123 on host h since 2026-12-06 13:00:00 (mmbridge train ...)``."""
    since = note.get("started")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    cmd = f" ({note['command']})" if note.get("command") else ""
    return f"pid {note.get('pid', '?')} on host {note.get('host', '?')}{when}{cmd}"


class RunLock:
    """The exclusive lock of one run directory, as a context manager.

    Args:
        run_dir: The run directory (created when missing).
        purpose: What the holder does there, for a refused process's message.

    Raises:
        RunLockedError: on entering, when another live process holds the directory; the
            message names its pid and host.
        StorageError: when the lock file cannot be created (the directory is not writable).
    """

    def __init__(self, run_dir: str | Path, purpose: str = "training") -> None:
        self.run_dir = Path(run_dir)
        self.purpose = purpose
        self._lock: FileLock | None = None

    def acquire(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.run_dir / LOCK), timeout=0)
            lock.acquire()
        except Timeout:
            note = _note(self.run_dir) or {}
            raise RunLockedError(
                f"{self.run_dir}: this run directory is in use by another run ({describe(note)}); "
                f"wait for it to finish, stop it, or write into another directory"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"{self.run_dir}: cannot lock the run directory "
                f"({exc.strerror or exc}): is it writable?"
            ) from None
        self._lock = lock
        before = _note(self.run_dir)
        if before and not _same_process(before):
            log.warning(
                "%s: taking over the lock of a run that ended without releasing it (%s)",
                self.run_dir,
                describe(before),
            )
        atomic_write_json(
            self.run_dir / HOLDER,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "purpose": self.purpose,
                "command": " ".join(["mmbridge", *sys.argv[1:]])[:300],
            },
        )
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        (self.run_dir / HOLDER).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _note(run_dir: Path) -> dict[str, Any] | None:
    try:
        note = json.loads((run_dir / HOLDER).read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _same_process(note: dict[str, Any]) -> bool:
    return note.get("pid") == os.getpid() and note.get("host") == socket.gethostname()


def refuse_clobbering(out: str | Path, sources: Sequence[str | Path], key: str = "out") -> None:
    """Refuse an output directory that would delete or write into what a command reads.

    ``out`` may not be one of ``sources`` (a checkpoint, a bundle, a run directory), hold one
    of them (replacing ``out`` would delete it), or lie inside one; nor may it be a run
    directory another process holds. Called before ``overwrite`` removes anything.

    Raises:
        ConfigError: naming the key, the directory and what it holds.
    """
    dst = Path(out).expanduser().resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        if dst == s or dst in s.parents:
            raise ConfigError(
                f"{key}={out}: holds {s}, which this command reads; writing there would "
                f"delete it (overwrite=true included): choose another directory"
            )
        if s in dst.parents and s.is_dir():
            raise ConfigError(
                f"{key}={out}: lies inside {s}, which this command reads: choose a "
                f"directory outside it"
            )
    note = holder(dst) if dst.is_dir() else None
    if note is not None:
        raise RunLockedError(
            f"{key}={out}: a run is writing there ({describe(note)}): choose another directory"
        )
