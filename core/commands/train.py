"""``mmbridge train [overrides]``: a Hydra app (so ``-m``/``--multirun``, ``--cfg job`` and
launchers/sweepers work as in any Hydra app)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from mmbridge.config import searchpath_override
from mmbridge.config.preflight import override_syntax_errors, resume_override_error, run_root_error
from mmbridge.errors import MMBridgeError, RunExistsError, RunLockedError
from mmbridge.registry import Registry
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.training.callbacks import Interrupted
from mmbridge.training.distributed import is_global_zero
from mmbridge.utils.run_lock import describe, holder

log = logging.getLogger("mmbridge.train")

USAGE = """usage: mmbridge train [group=option ...] [key=value ...] [-m] [--cfg job]

Train the model that the composed config describes: every stage of `schedule` in order, then
the test-split evaluation. Writes into outputs/<run_name>/<time>/: config.yaml, metrics.json,
checkpoints/<stage>_final and checkpoints/final (trainable weights + config, safetensors),
logs/ (CSV and TensorBoard).

examples:
  mmbridge train                                  # the default experiment
  mmbridge train experiment=tiny connector=linear
  mmbridge train stages.align.max_steps=20 trainer=gpu
  mmbridge train resume=outputs/tiny/2026-11-22_10-00-00   # continue a killed run
  mmbridge train -m connector=linear,mlp seed=0,1           # a sweep (see `mmbridge sweep`):
        # finished runs are skipped when started again with the same hydra.sweep.dir=DIR, and
        # DIR/results.md, results.csv and plots are written at the end

`mmbridge config --groups` lists every option; `mmbridge config [overrides]` prints the config.
"""


def _job(cfg: DictConfig) -> float | None:
    """One Hydra job (a module-level function, so that joblib/submitit can pickle it). In a
    multirun, a job whose directory already holds its metrics.json is skipped (so an interrupted
    sweep can be started again). Returns the test exact match (what sweepers such as Optuna
    optimise)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mmbridge.reporting.runs import ERROR, atomic_write_text, finished_run
    from mmbridge.runtime.task import run_task

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    overrides = [str(o) for o in hc.overrides.task]
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        done = finished_run(out, overrides) if sweep else None
        if done is not None:
            log.info("skipping %s: finished already (metrics.json)", out)
            return done.metrics.get("test", {}).get("exact_match")
        metrics = run_task(cfg, out, overrides, resume_interrupted=sweep, registry=_job_registry())
    except Interrupted as exc:
        run_dir = Path(str(cfg.get("resume"))).expanduser() if cfg.get("resume") else out
        where = f" at step {exc.step} of stage {exc.stage}" if exc.stage is not None else ""
        print(
            f"mmbridge train: interrupted{where}; resume with: mmbridge train resume={run_dir}",
            file=sys.stderr,
            flush=True,
        )
        _STATUS["code"] = exc.exit_status
        if sweep:  # a sweep stops too: the interrupted job resumes when the sweep is started again
            raise SystemExit(exc.exit_status) from None
        return None
    except MMBridgeError as exc:
        print(f"mmbridge train: error: {exc}", file=sys.stderr)
        if not isinstance(exc, RunLockedError | RunExistsError):  # the directory is another run's
            atomic_write_text(out / ERROR, f"{type(exc).__name__}: {exc}\n")
        _STATUS["code"] = 1
        return None
    test = metrics.get("test", {})
    log.info("run directory: %s", out)
    if test:
        log.info(
            "test exact match %.3f (no media %.3f, chance %.3f)",
            test.get("exact_match", 0),
            test.get("no_media/exact_match", float("nan")),
            test.get("chance/exact_match", float("nan")),
        )
    return test.get("exact_match")


# Exit status of the jobs run in this process (the basic launcher's); joblib/submitit jobs
# leave error.txt in their run directory instead, which `mmbridge report` lists.
_STATUS = {"code": 0}

# The registry main() built for the jobs it starts. Hydra calls a task function with the config
# alone, and launchers (joblib, submitit) pickle `_job` by reference into other processes, so the
# registry cannot travel as an argument (nor could it be pickled: an in-process plugin object
# need not be). The basic launcher runs the jobs in main()'s own process and finds it here; a
# forked worker inherits it (the same plugins); a spawned or remote worker starts without it and
# builds its own, once per process (kept here for the process's later jobs).
_REGISTRY: dict[str, Registry] = {}


def _job_registry() -> Registry:
    """The registry of the jobs in this process (see ``_REGISTRY``)."""
    if "run" not in _REGISTRY:
        _REGISTRY["run"] = load_registry()
    return _REGISTRY["run"]


def main(argv: list[str], registry: Registry | None = None) -> int:
    """``mmbridge train``: builds the run's registry (unless given one, e.g. with in-process
    plugins) and hands it to every job it runs."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    import hydra

    from mmbridge.config.store import register

    register()  # the schema's nodes that conf/train.yaml and conf/stage/ start from
    registry = registry if registry is not None else load_registry()
    _REGISTRY["run"] = registry
    _STATUS["code"] = 0
    task = hydra.main(config_path="pkg://mmbridge.conf", config_name="train", version_base="1.3")(
        _job
    )

    if {"-m", "--multirun"} & set(argv) and not any(
        a.startswith(("hydra.sweep.subdir=", "hydra.job.config.override_dirname")) for a in argv
    ):
        # Run directories are named by the swept values and the group choices only: fixed
        # `key.sub=value` overrides (paths, steps, ...) are the same in every run and would make
        # names too long (a path's "/" would even nest directories).
        fixed = [
            a.split("=", 1)[0].lstrip("+~")
            for a in argv
            if "=" in a
            and "." in a.split("=", 1)[0]
            and "," not in a.split("=", 1)[1]
            and not a.startswith("hydra")
        ]
        keys = ["seed", "experiment", *fixed]
        argv = [
            *argv,
            "hydra.job.config.override_dirname.exclude_keys=["
            + ",".join(f"'{k}'" for k in keys)
            + "]",
        ]
    if {"-m", "--multirun"} & set(argv) and not any("hydra.callbacks.report" in a for a in argv):
        # a sweep ends with its report (results.md/.csv, plots) in the sweep directory
        argv = [*argv, "+hydra.callbacks.report._target_=mmbridge.reporting.tables.ReportCallback"]
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if resume and not any(a.startswith("hydra.run.dir=") for a in argv):
        # Log into the resumed run's own directory; keep its .hydra/ record of the first start.
        argv = [
            *argv,
            f"hydra.run.dir={Path(resume).expanduser().resolve()}",
            "hydra.output_subdir=null",
        ]
    problems = override_syntax_errors(argv) or [
        p
        for p in [resume_override_error(argv), run_root_error(argv), _busy(argv) or _held(argv)]
        if p
    ]
    if problems:
        print("mmbridge train: error: " + "\n  ".join(problems), file=sys.stderr)
        return 1
    old = sys.argv
    # argv[0] = this file: Lightning's DDP launcher re-runs `python argv[0] argv[1:]` for the
    # other ranks (with the same Hydra run dir), which lands in main() below.
    sys.argv = [str(Path(__file__).resolve()), *argv, *searchpath_override(registry)]
    try:
        task()
    finally:
        sys.argv = old
        _REGISTRY.clear()
    return _STATUS["code"]


def _busy(argv: list[str]) -> str | None:
    """A run directory named on the command line that another live run holds: refused before
    Hydra writes its ``.hydra/`` record and ``train.log`` there."""
    if {"-m", "--multirun"} & set(argv) or not is_global_zero():
        return None  # a DDP launcher's rank > 0 shares rank 0's directory
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    note = holder(Path(run_dir).expanduser()) if run_dir else None
    if note is None:
        return None
    return (
        f"hydra.run.dir={run_dir}: this run directory is in use by another run ({describe(note)}); "
        f"wait for it to finish, stop it, or write into another directory"
    )


def _held(argv: list[str]) -> str | None:
    """A new training (no ``resume=``) into a run directory named on the command line that
    holds a run (:func:`mmbridge.reporting.runs.held_run`): refused before Hydra writes its
    ``.hydra/`` record and ``train.log`` there."""
    from mmbridge.reporting.runs import held_run_error

    if {"-m", "--multirun"} & set(argv) or not is_global_zero():
        return None  # a sweep skips or resumes its jobs; rank > 0 shares rank 0's directory
    if any(a.startswith("resume=") for a in argv):
        return None
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    return held_run_error(Path(run_dir).expanduser(), "hydra.run.dir") if run_dir else None


if __name__ == "__main__":  # the DDP launcher's entry for ranks > 0
    raise SystemExit(main(sys.argv[1:]))
