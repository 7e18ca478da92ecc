"""Checks made when a command starts, before any work: outputs that can be written, and the
overrides that a resumed run may take.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from mmbridge.errors import ConfigError

log = logging.getLogger(__name__)


def dir_problem(path: str | Path) -> str | None:
    """Why directory ``path`` cannot be written, or ``None``.

    The directory is created if missing (every caller needs it anyway) and a file is created
    and removed in it, so read-only file systems and ACLs are judged as the run will meet them.
    """
    p = Path(str(path)).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        if p.exists() and not p.is_dir():
            return "it is a file, not a directory"
        blocking = next((q for q in p.parents if q.exists() and not q.is_dir()), None)
        return f"{blocking} is a file, not a directory" if blocking else (exc.strerror or str(exc))
    return None


def writable_dir_error(path: str | Path, key: str) -> str | None:
    """The error line for directory ``path`` of config key ``key``, or ``None`` if writable."""
    reason = dir_problem(path)
    return (
        f"{key}={path}: cannot write there ({reason}); give a writable directory"
        if reason
        else None
    )


def writable_file_error(path: str | Path, key: str) -> str | None:
    """The error line for output file ``path`` of option ``key``, or ``None`` if it can be
    written (its directory is created if missing; the file itself is not touched)."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return f"{key}={path}: is a directory; give a file name"
    reason = dir_problem(p.parent)
    return f"{key}={path}: cannot write its directory {p.parent} ({reason})" if reason else None


def output_errors(data: Mapping[str, Any], output_dir: str | Path | None) -> list[str]:
    """Problems with the places a training run writes: its run directory and the caches
    (``data``: the resolved config)."""
    paths = p if isinstance(p := data.get("paths"), Mapping) else {}
    errors = []
    if output_dir is not None and (reason := dir_problem(output_dir)):
        errors.append(
            f"run directory {output_dir} (paths.output_root={paths.get('output_root')}): "
            f"cannot write there ({reason}); give a writable paths.output_root"
        )
    keys = ["cache_dir", "feature_cache_dir"] if data.get("cache_features", True) else ["cache_dir"]
    for key in keys:
        if isinstance(paths.get(key), str) and (
            problem := writable_dir_error(paths[key], f"paths.{key}")
        ):
            errors.append(problem)
    return errors


# -- resume with overrides ------------------------------------------------------------------------
# Keys a resumed run may take from the command line: they change when / how it is evaluated or
# how long it may run, not what has been trained so far. ``stages.<name>.max_steps`` is safe for
# the stages that have not finished (the learning-rate schedule of the remaining steps follows).
SAFE_ON_RESUME = (
    r"evaluation(\..+)?",
    r"budget_minutes",
    r"device",
    r"progress_every",
    r"stages\.[^.]+\.budget_fraction",
    r"loader\.num_workers",
    r"trainer\.(enable_progress_bar|log_every_n_steps)",
    r"resume",
)
_SAFE = re.compile("^(" + "|".join(SAFE_ON_RESUME) + ")$")
_STEPS = re.compile(r"^stages\.([^.]+)\.max_steps$")


def stages_done(run_dir: Path) -> list[str]:
    """The stages a run directory has finished (its ``state.json``)."""
    try:
        return list(json.loads((run_dir / "state.json").read_text()).get("stages_done", []))
    except (OSError, ValueError, AttributeError):
        return []


def resume_config(
    saved: DictConfig, composed: DictConfig, overrides: Sequence[str], run_dir: Path
) -> DictConfig:
    """The saved config of ``run_dir`` with the command line's safe ``overrides`` applied
    (values taken from ``composed``, the command line's config); any other override is refused
    with the list, so that none is silently ignored."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(f"bad override: {exc}") from exc
    done = stages_done(run_dir)
    # a DictConfig converts to a dict
    cfg = OmegaConf.create(cast(dict[str, Any], OmegaConf.to_container(saved, resolve=False)))
    unsafe, safe = _resume_overrides(parsed, done)
    if unsafe:
        raise ConfigError(_resume_refusal(run_dir, unsafe, done))
    applied: list[str] = []
    for key, line in safe:
        OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False, force_add=True)
        applied.append(line)
    if applied:
        log.info("resume: applying %s", " ".join(applied))
    return cfg


def _resume_overrides(
    parsed: Sequence[Any], done: Sequence[str]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Hydra's parsed overrides of a resume: ``(refused lines, [(key, line)] safe to apply)``."""
    unsafe: list[str] = []
    safe: list[tuple[str, str]] = []
    for o in parsed:
        if o.is_hydra_override():
            continue
        key, line = o.key_or_group, cast(str, o.input_line)  # parse_overrides sets input_line
        if o.package:  # `group@package=option`: a whole component placed somewhere
            unsafe.append(f"{line} (a config group choice)")
            continue
        steps = _STEPS.match(key)
        if o.is_delete():
            unsafe.append(f"{line} (deletes a key)")
        elif steps and steps.group(1) in done:
            unsafe.append(f"{line} (stage '{steps.group(1)}' has finished)")
        elif not (_SAFE.match(key) or steps):
            unsafe.append(line)
        elif key != "resume":
            safe.append((key, line))
    return unsafe, safe


def _resume_refusal(run_dir: str | Path, unsafe: Sequence[str], done: Sequence[str]) -> str:
    return (
        f"resume={run_dir}: {len(unsafe)} override(s) cannot change a run that has started: "
        f"{', '.join(unsafe)}. On resume only these may change: evaluation.*, "
        f"stages.<stage>.max_steps of a stage not finished (done: {', '.join(done) or 'none'}), "
        f"stages.<stage>.budget_fraction, budget_minutes, device, progress_every, "
        f"loader.num_workers, trainer.enable_progress_bar, trainer.log_every_n_steps; "
        f"start a new run for the others"
    )


def resume_override_error(argv: Sequence[str]) -> str | None:
    """The resume refusal for a ``resume=RUN`` command line, checked before Hydra composes it
    (an override such as ``data.train=`` would otherwise fail composition with Hydra's
    ``+data.train`` hint instead of saying that a started run cannot change its data)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if not run_dir:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(
            [a for a in argv if not a.startswith("-")]
        )
    except HydraException:
        return None  # override_syntax_errors reports it
    done = stages_done(Path(run_dir).expanduser())
    unsafe, _ = _resume_overrides(parsed, done)
    return _resume_refusal(run_dir, unsafe, done) if unsafe else None


def run_root_error(argv: Sequence[str]) -> str | None:
    """Why the directory a ``mmbridge train`` command line writes into cannot be written, or
    ``None``: checked before Hydra creates the run directory (which would fail with a raw
    traceback). Looks at ``hydra.run.dir=`` / ``hydra.sweep.dir=`` (for ``-m``), else
    ``paths.output_root=`` (default ``outputs``); a value with an interpolation is skipped."""
    values = dict(a.lstrip("+").split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    multirun = bool({"-m", "--multirun"} & set(argv))
    for key in ("hydra.sweep.dir" if multirun else "hydra.run.dir", "paths.output_root"):
        path = values.get(key, "outputs" if key == "paths.output_root" else None)
        if path is None:
            continue
        path = path.strip("'\"")
        if "${" in path:  # Hydra resolves it; the root it names is checked next
            continue
        reason = dir_problem(path)
        return (
            f"{key}={path}: cannot write there ({reason}); give a writable directory"
            if reason
            else None
        )
    return None


def override_syntax_errors(argv: Sequence[str]) -> list[str]:
    """The ``key=value`` arguments of a command line that Hydra's override grammar cannot parse,
    each named (Hydra's own message names only the bad input, e.g. ``no viable alternative at
    input '[1'``). Flags (``-m``, ``--cfg job``) and their values are not overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    errors = []
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        try:
            parser.parse_overrides([arg])
        except HydraException as exc:
            errors.append(
                f"{arg}: not a valid override ({str(exc).splitlines()[0].strip()}); quote a value "
                f"with brackets, commas or '=' in it: key='value'"
            )
    return errors
