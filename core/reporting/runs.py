"""Run directories of ``mmbridge train`` / ``mmbridge sweep``: reading them back, deciding
whether a sweep job already finished (skip it) or was interrupted (resume it), atomic writes.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.json`` once the run
finished, Hydra's ``.hydra/overrides.yaml`` and, when the job failed with a domain error,
``error.txt`` (moved aside as ``error-<time>.txt`` once the run is resumed and finishes).
A directory *holds a run* (:func:`held_run`) once it has something to continue from: a
finished run's ``metrics.json``, or a started run's ``state.json`` or a stage's
``last.ckpt``; a new training refuses it (:func:`refuse_held_run`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mmbridge.errors import ConfigError, RunExistsError
from mmbridge.utils.io import atomic_write_bytes as atomic_write_bytes  # re-exported for reports
from mmbridge.utils.io import atomic_write_json
from mmbridge.utils.io import atomic_write_text as atomic_write_text

log = logging.getLogger(__name__)

METRICS = "metrics.json"
ERROR = "error.txt"


def write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def override_key(override: str) -> str:
    """``+stages.x=1`` -> ``stages.x``; ``connector=mlp`` -> ``connector``."""
    return override.split("=", 1)[0].lstrip("+~")


def without_seed(overrides: list[str]) -> tuple[str, ...]:
    """A run's configuration: its overrides minus ``seed``, in a canonical (sorted) order."""
    return tuple(sorted(o for o in overrides if override_key(o) != "seed"))


def hydra_overrides(run_dir: Path) -> list[str] | None:
    """The task overrides Hydra recorded for the run (``.hydra/overrides.yaml``), if any."""
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None

    return [str(o) for o in OmegaConf.load(f)]


@dataclass
class Run:
    """One finished run: its directory, overrides and ``metrics.json`` content."""

    path: Path
    overrides: list[str]
    metrics: dict[str, Any] = field(repr=False)

    @property
    def config(self) -> tuple[str, ...]:
        return without_seed(self.overrides)

    @property
    def seed(self) -> int | None:
        return self.metrics.get("seed")


def load_run(run_dir: Path) -> Run | None:
    """The finished run in ``run_dir`` (``None`` when it has no readable ``metrics.json``)."""
    f = run_dir / METRICS
    try:
        metrics = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s); the run counts as unfinished", f, exc)
        return None
    overrides = metrics.get("overrides")
    if overrides is None:  # runs written before overrides were recorded
        overrides = hydra_overrides(run_dir) or []
    return Run(run_dir, [str(o) for o in overrides], metrics)


def finished_run(run_dir: Path, overrides: list[str]) -> Run | None:
    """The stored result when this job already ran to the end in ``run_dir``; else ``None``.

    Raises:
        ConfigError: ``run_dir`` holds the result of *other* overrides (a sweep directory
            reused for another grid): returning it would mislabel a result.
    """
    run = load_run(run_dir)
    if run is None:
        return None
    if sorted(run.overrides) != sorted(overrides):
        raise ConfigError(
            f"{run_dir / METRICS} holds the run of overrides {run.overrides}, not of this job's "
            f"{list(overrides)}; give the sweep another directory (mmbridge sweep --dir DIR, or "
            f"hydra.sweep.dir=DIR)"
        )
    return run


def interrupted(run_dir: Path, config_yaml: str) -> bool:
    """Whether ``run_dir`` holds an unfinished run of the very same resolved config, with
    something to resume from (a finished stage or a Lightning checkpoint)."""
    saved = run_dir / "config.yaml"
    if (run_dir / METRICS).is_file() or not saved.is_file():
        return False
    if saved.read_text() != config_yaml:
        return False
    return _resumable(run_dir)


def _resumable(run_dir: Path) -> bool:
    """A finished stage (``state.json``) or a stage's Lightning checkpoint to resume from."""
    return (run_dir / "state.json").is_file() or any((run_dir / "checkpoints").glob("*/last.ckpt"))


def held_run(run_dir: Path) -> str | None:
    """What run ``run_dir`` holds: ``"a finished run"`` (its ``metrics.json``), ``"a started
    run"`` (something :func:`interrupted` resumes from: ``state.json`` or a stage's
    ``last.ckpt``), or ``None`` (missing, empty, or what a run that failed before training
    left: ``config.yaml``, ``train.log``, ``error.txt``)."""
    if not run_dir.is_dir():
        return None
    if (run_dir / METRICS).is_file():
        return "a finished run"
    return "a started run" if _resumable(run_dir) else None


def held_run_error(run_dir: Path, key: str) -> str | None:
    """The refusal of a new training into ``run_dir`` (given as ``key=run_dir``) when it holds
    a run (:func:`held_run`), else ``None``."""
    what = held_run(run_dir)
    if what is None:
        return None
    return (
        f"{key}={run_dir}: this directory holds {what}, which a new training would overwrite; "
        f"continue it with resume={run_dir}, or train into another directory"
    )


def refuse_held_run(run_dir: Path, key: str) -> None:
    """Refuse a new training into a directory that holds a run (:func:`held_run_error`).

    Raises:
        RunExistsError: naming the directory and what to do instead.
    """
    problem = held_run_error(run_dir, key)
    if problem is not None:
        raise RunExistsError(problem)


def retire_error(run_dir: Path) -> Path | None:
    """Move a failed attempt's ``error.txt`` aside once the run has finished (resumed and
    ended): to ``error-<the time it was written>.txt``, so the run no longer reads as failed
    and the old error stays readable. Returns the new path (``None``: there was none)."""
    err = run_dir / ERROR
    try:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(err.stat().st_mtime))
    except FileNotFoundError:
        return None
    dst = run_dir / f"{err.stem}-{stamp}{err.suffix}"
    os.replace(err, dst)
    log.info("%s: the run finished; the error of an earlier attempt moved to %s", err, dst.name)
    return dst


def unfinished_runs(root: Path) -> list[tuple[Path, str]]:
    """Run directories under ``root`` without ``metrics.json``: (path, first line of error.txt
    or "unfinished")."""
    out = []
    for cfg in sorted(root.rglob("config.yaml")):
        d = cfg.parent
        parts = d.relative_to(root).parts
        if (
            any(p.startswith(".") for p in parts)
            or "checkpoints" in parts
            or (d / METRICS).is_file()
        ):
            continue
        err = d / ERROR
        reason = err.read_text().strip().splitlines()[0] if err.is_file() else "unfinished"
        out.append((d, reason))
    return out


def gather_runs(root: Path) -> list[Run]:
    """Every finished run under ``root`` (each ``metrics.json``), sorted by path."""
    runs = []
    for f in sorted(root.rglob(METRICS)):
        if any(p.startswith(".") for p in f.relative_to(root).parts[:-1]):
            continue
        run = load_run(f.parent)
        if run is not None:
            runs.append(run)
    return runs
