"""``mmbridge sweep [overrides with comma lists]``: a Hydra multirun of ``mmbridge train`` in a
stable directory (started again, it skips the finished runs), then the results report."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import cast

from mmbridge.config.preflight import writable_dir_error
from mmbridge.config.validation import override_errors
from mmbridge.errors import ConfigError, did_you_mean
from mmbridge.registry import Registry

log = logging.getLogger("mmbridge.sweep")

USAGE = """usage: mmbridge sweep [overrides ...] [--dir DIR] [--metric KEY] [--no-report]

Train every combination of the comma lists (a Hydra multirun of `mmbridge train`), then write
results.md, results.csv, runs.csv and plots into the sweep directory (see `mmbridge report`).

  sweep directory   --dir DIR, or ${paths.output_root}/sweeps/${run_name}/<hash of the
                    overrides>: the same command line always uses the same directory
  run directories   <sweep dir>/<swept key=value,...> (e.g. connector=mlp,seed=1), each with
                    config.yaml, metrics.json, checkpoints/, logs/
  started again     runs whose directory holds metrics.json are skipped; an interrupted run
                    of the same config resumes from its last checkpoint
  feature cache     frozen-encoder features are computed once (paths.feature_cache_dir) and
                    shared by every run of the sweep

examples:
  mmbridge sweep connector=linear,mlp seed=0,1
  mmbridge sweep experiment=ablation_connector              # the grid is in the preset
  mmbridge sweep connector=linear,mlp hydra/launcher=local_parallel       # 2 jobs at a time
  mmbridge sweep experiment=ablation_connector hydra/launcher=slurm \
hydra.launcher.partition=gpu trainer=gpu
  mmbridge sweep hydra/sweeper=optuna_search hydra.sweeper.n_trials=30    # hyper-parameter search

options:
  --dir DIR       the sweep directory (default: derived from the overrides, see above)
  --metric KEY    the metric of the plots (default test/exact_match)
  --no-report     do not write the report at the end (`mmbridge report DIR` writes it later)
"""

# Hydra overrides that change *what* runs (part of the directory hash); launcher overrides
# only change *where* it runs, so a sweep moved to SLURM finds its finished local runs.
_HASHED_HYDRA = ("hydra/sweeper", "hydra.sweeper")
REPORT_CALLBACK = "mmbridge.reporting.tables.ReportCallback"


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan(
    overrides: list[str], sweep_dir: str | None = None, metric: str | None = "test/exact_match"
) -> list[str]:
    """The Hydra arguments of a sweep: ``-m``, the user's overrides, and the sweep directory,
    the run-directory naming (the swept keys only) and the report callback."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"bad override: {exc}") from exc
    task = [o for o in parsed if not o.is_hydra_override()]
    hashed = sorted(
        cast(str, o.input_line)
        for o in parsed  # parse_overrides sets input_line
        if not o.is_hydra_override() or o.key_or_group.startswith(_HASHED_HYDRA)
    )
    fixed = [o.key_or_group for o in task if not o.is_sweep_override()]
    given = {o.key_or_group for o in parsed}
    args = ["-m", *overrides]
    if sweep_dir is not None:
        args.append(f"hydra.sweep.dir={_quote(str(Path(sweep_dir).expanduser().absolute()))}")
    elif "hydra.sweep.dir" not in given:
        digest = hashlib.sha1("\n".join(hashed).encode()).hexdigest()[:10]
        args.append(f"hydra.sweep.dir=${{paths.output_root}}/sweeps/${{run_name}}/{digest}")
    if "hydra.sweep.subdir" not in given:
        # A run's directory is named by its swept values only (stable across restarts and
        # independent of the job's position in the grid); the fixed overrides are in every run.
        args += [
            "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(map(_quote, fixed)) + "]",
            "hydra.sweep.subdir=${hydra.job.override_dirname}",
        ]
    if metric is not None:
        args += [
            f"+hydra.callbacks.report._target_={REPORT_CALLBACK}",
            f"+hydra.callbacks.report.metric={_quote(metric)}",
        ]
    else:  # Hydra's base callback does nothing: it takes the place of `mmbridge train -m`'s report
        args.append("+hydra.callbacks.report._target_=hydra.experimental.callback.Callback")
    return args


OPTIONS = ("--dir", "--metric", "--no-report")
# Hydra's own flags, passed through to the multirun.
HYDRA_FLAGS = (
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--resolve",
    "--package",
    "-p",
    "--config-dir",
    "-cd",
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--hydra-help",
    "--shell-completion",
    "-sc",
)


def check_options(overrides: list[str], sweep_dir: str | None, metric: str | None) -> None:
    """Refuse, before any run starts, unknown options (with a did-you-mean), an unwritable
    ``--dir``, an empty ``--metric`` and override values that do not fit the config schema
    (each value of a comma list); every problem reported together."""
    errors = []
    for a in overrides:
        flag = a.split("=", 1)[0]
        if a.startswith("-") and flag not in HYDRA_FLAGS:
            errors.append(
                f"{a}: not an option of mmbridge sweep{did_you_mean(flag, OPTIONS)}; "
                f"options: {', '.join(OPTIONS)} (and Hydra's flags)"
            )
    if sweep_dir is not None and (problem := writable_dir_error(sweep_dir, "--dir")):
        errors.append(problem)
    if metric is not None and not metric.strip():
        errors.append("--metric='': give a metric key, e.g. test/exact_match")
    errors += override_errors([a for a in overrides if "=" in a and not a.startswith("-")])
    if errors:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(errors))


def main(argv: list[str], registry: Registry | None = None) -> int:
    """``mmbridge sweep``: one Hydra multirun through :func:`mmbridge.commands.train.main`,
    which builds the registry the jobs share (or uses ``registry``)."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    overrides: list[str] = []
    sweep_dir: str | None = None
    metric: str | None = "test/exact_match"
    it = iter(argv)
    for a in it:
        if a in ("--dir", "--metric"):
            value = next(it, None)
            if value is None:
                raise ConfigError(f"{a} needs a value\n{USAGE}")
            sweep_dir, metric = (value, metric) if a == "--dir" else (sweep_dir, value)
        elif a.startswith(("--dir=", "--metric=")):
            k, v = a[2:].split("=", 1)
            sweep_dir, metric = (v, metric) if k == "dir" else (sweep_dir, v)
        elif a == "--no-report":
            metric = None
        elif a in ("-m", "--multirun"):
            continue
        else:
            overrides.append(a)
    check_options(overrides, sweep_dir, metric)
    from mmbridge.commands import train
    from mmbridge.reporting.tables import LAST_REPORT

    LAST_REPORT.clear()
    code = train.main(plan(overrides, sweep_dir, metric), registry=registry)
    for report in LAST_REPORT:
        n = sum(len(r.runs) for r in report.rows)
        print(
            f"mmbridge sweep: {n} runs in {len(report.rows)} configurations; "
            f"report: {report.root / 'results.md'}"
        )
        failed = [(d, why) for d, why in report.unfinished if why != "unfinished"]
        for d, why in report.unfinished:
            print(f"  not finished: {d}: {why}")
        code = code or int(bool(failed))
    return code
