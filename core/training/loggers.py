"""The Lightning loggers of a stage, chosen in config (``loggers: [csv, tensorboard]``).

* ``csv``: ``logs/<stage>/metrics.csv`` (no dependency; what ``mmbridge`` itself reads back);
* ``tensorboard``: ``logs/tb_<stage>/`` event files; optional — without the ``tensorboard``
  (or ``tensorboardX``) package the stage logs to CSV alone, after one warning;
* ``wandb``: Weights & Biases in offline mode, ``logs/wandb/`` (upload later with
  ``wandb sync``); needs the ``wandb`` package.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from mmbridge.config.schema import LOGGERS, Root
from mmbridge.errors import ConfigError

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tensorboard_available() -> bool:
    """Whether Lightning's ``TensorBoardLogger`` can write (``tensorboard`` or ``tensorboardX``)."""
    return _available("tensorboard") or _available("tensorboardX")


def check_loggers(names: Iterable[str]) -> list[str]:
    """``names`` as a list, each one of :data:`LOGGERS`, without repeats.

    Raises:
        ConfigError: naming ``loggers``, the bad value and the options.
    """
    out: list[str] = []
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"loggers: unknown logger {name!r}; available: {', '.join(LOGGERS)}")
        if name not in out:
            out.append(name)
    return out


def make_loggers(run: Root, out_dir: Path, stage: str) -> list[Logger]:
    """The loggers of stage ``stage`` of a run in ``out_dir``, as ``run.loggers`` lists them.

    Args:
        run: The run's top-level section (``session.run.root``: ``loggers``, the schema's
            default ``[csv, tensorboard]``; ``run_name`` names the W&B run).
        out_dir: The run directory; everything is written under ``out_dir/logs``.
        stage: The stage name (a CSV / TensorBoard folder per stage, a W&B run per stage).

    Returns:
        The loggers, in the configured order; CSV alone when ``tensorboard`` is asked for but
        not installed (one warning per process).

    Raises:
        ConfigError: for an unknown logger, or ``wandb`` without the ``wandb`` package.
    """
    names = check_loggers(run.loggers or Root().loggers)  # an empty list: the default
    root = Path(out_dir) / "logs"
    loggers: list[Logger] = []
    for name in names:
        if name == "csv":
            loggers.append(CSVLogger(root, name=stage, version=""))
        elif name == "tensorboard":
            if tensorboard_available():
                loggers.append(TensorBoardLogger(root, name=f"tb_{stage}", version=""))
                continue
            if "tensorboard" not in _warned:
                _warned.add("tensorboard")
                log.warning(
                    "loggers: tensorboard is not installed (pip install tensorboard); "
                    "logging to CSV only (%s)",
                    root / stage / "metrics.csv",
                )
            if "csv" not in names:
                loggers.append(CSVLogger(root, name=stage, version=""))
        elif name == "wandb":
            if not _available("wandb"):
                raise ConfigError(
                    "loggers: 'wandb' needs the wandb package (pip install wandb); "
                    f"or drop it from loggers (available: {', '.join(LOGGERS)})"
                )
            root.mkdir(parents=True, exist_ok=True)
            run_name = str(run.run_name or Root().run_name)
            loggers.append(
                WandbLogger(
                    name=f"{run_name}-{stage}",
                    save_dir=str(root),
                    offline=True,
                    project="mmbridge",
                    group=run_name,
                    job_type=stage,
                )
            )
    return loggers
