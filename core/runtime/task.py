"""One training job: the config checked whole, the run directory locked, a started run resumed
or a new one trained (:func:`mmbridge.runtime.train.train`). ``mmbridge train`` (each Hydra
job), ``mmbridge sweep`` and :func:`mmbridge.train` run it."""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmbridge.config.preflight import resume_config
from mmbridge.config.validation import validate_config
from mmbridge.errors import ConfigError, reading
from mmbridge.registry import Registry
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.reporting.runs import METRICS, interrupted, refuse_held_run, write_json
from mmbridge.runtime import train as run_train
from mmbridge.runtime.config import RunConfig
from mmbridge.training.distributed import is_global_zero
from mmbridge.training.stages import check_schedule
from mmbridge.utils.run_lock import RunLock, holder

log = logging.getLogger("mmbridge.train")


def run_task(
    cfg: DictConfig,
    output_dir: Path,
    overrides: list[str] | None = None,
    resume_interrupted: bool = False,
    registry: Registry | None = None,
    run_dir_key: str = "hydra.run.dir",
) -> dict:
    """The body of a training job (also used by the sweep command's jobs).

    ``registry`` is the run's one registry (everything that resolves a name uses it); ``None``
    builds one, for a job started on its own.

    ``overrides`` (the job's Hydra task overrides) are recorded in ``metrics.json``. With
    ``resume_interrupted`` (sweep jobs), a run of the same resolved config that was
    interrupted in ``output_dir`` is resumed there instead of started again.

    The whole config (and the run directory and caches being writable) is checked before
    anything is built: every problem is reported in one :class:`ConfigError`. With
    ``resume=RUN_DIR``, the overrides that are safe on a started run (evaluation, steps of
    unfinished stages, budget) are applied to its saved config; any other is refused.

    A new run (no ``resume``) refuses an ``output_dir`` that holds a run, finished or started
    (:class:`~mmbridge.errors.RunExistsError`, naming it as ``run_dir_key=output_dir``),
    except in a sweep job (``resume_interrupted``), which resumes or starts over its own.
    """
    registry = registry if registry is not None else load_registry()
    resume = cfg.get("resume")
    if resume:
        run_dir = Path(str(resume)).expanduser()
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(
                f"resume={resume}: no config.yaml there (pass a run directory "
                f"written by `mmbridge train`)"
            )
        with _locked(run_dir):
            with reading(
                saved,
                expected="the YAML mapping `mmbridge train` wrote",
                also=(Exception,),
                error=ConfigError,
            ):  # YAML's and OmegaConf's own errors
                stored = OmegaConf.load(saved)
            if not isinstance(stored, DictConfig):
                raise ConfigError(
                    f"resume={resume}: {saved} is not a run's config (a YAML mapping)"
                )
            _check_state(run_dir / "state.json")
            cfg = resume_config(stored, cfg, overrides or [], run_dir)
            validate_config(cfg, registry, output_dir=run_dir)
            check_schedule(cfg)
            log.info("resuming %s", run_dir)
            return run_train.train(RunConfig.parse(cfg), registry, run_dir, resume=True)
    fresh = not resume_interrupted and is_global_zero()
    if fresh and holder(output_dir) is None:  # held by a live run: the lock refuses it below
        refuse_held_run(output_dir, run_dir_key)
    validate_config(cfg, registry, output_dir=output_dir)
    check_schedule(cfg)
    with _locked(output_dir):
        if fresh:  # a run that ended between the check above and the lock
            refuse_held_run(output_dir, run_dir_key)
        again = resume_interrupted and interrupted(output_dir, OmegaConf.to_yaml(cfg, resolve=True))
        if again:
            log.info("resuming the interrupted run in %s", output_dir)
        metrics = run_train.train(RunConfig.parse(cfg), registry, output_dir, resume=again)
        if overrides is not None and (output_dir / METRICS).is_file():
            metrics["overrides"] = list(overrides)
            write_json(output_dir / METRICS, metrics)
    return metrics


def _check_state(state: Path) -> None:
    """A resumed run's ``state.json`` (stages done) is what `mmbridge train` writes, or absent."""
    if not state.is_file():
        return
    with reading(
        state,
        expected="the JSON object {'stages_done': [stage, ...], ...} a run writes",
        error=ConfigError,
    ):
        data = json.loads(state.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("stages_done", []), list):
            raise TypeError(f"got {json.dumps(data)[:80]}")


def _locked(run_dir: Path) -> AbstractContextManager[object]:
    """The run directory's lock (:mod:`mmbridge.utils.run_lock`), held by the global rank 0
    alone."""
    return RunLock(run_dir) if is_global_zero() else nullcontext()
