"""What the Lightning ``Trainer`` of a run is given: the precision decided once
(:mod:`mmbridge.model.precision`, re-exported here), the device, the Trainer arguments, and
Lightning's console output made quiet."""

from __future__ import annotations

import copy
import logging
import os
import resource
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from mmbridge.errors import ConfigError
from mmbridge.model.precision import (
    BF16_CPU_FLAGS,
    BF16_MIN_SPEEDUP,
    ISA_ENV,
    PROBE_VERSION,
    Hardware,
    PrecisionDecision,
    _matmul_gflops,
    decide_precision,
    detect_hardware,
    probe_cpu_bf16,
    resolve_auto_dtypes,
    run_precision,
)
from mmbridge.training.strategies import make_strategy

__all__ = [
    "BF16_CPU_FLAGS",
    "BF16_MIN_SPEEDUP",
    "ISA_ENV",
    "PROBE_VERSION",
    "Hardware",
    "PrecisionDecision",
    "_matmul_gflops",
    "decide_precision",
    "detect_hardware",
    "peak_memory_mb",
    "probe_cpu_bf16",
    "resolve_auto_dtypes",
    "resolve_device",
    "run_precision",
    "tidy_lightning_output",
    "trainer_kwargs",
]


def resolve_device(device: str | torch.device | None, accelerator: str = "auto") -> torch.device:
    """The device a run's model lives on outside ``Trainer.fit`` (feature-cache fill,
    evaluation, ``eval``, ``generate``): ``device`` when given (``cpu``, ``cuda``, ``cuda:1``),
    else the trainer's accelerator (``auto``: CUDA when available). Under a multi-process
    launcher a bare ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
    if device in (None, "", "auto"):
        accelerator = str(accelerator)
        if accelerator == "cpu":
            device = "cpu"
        elif accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        ):
            device = "cuda"
        else:
            device = "cpu"
    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device}: not a device; use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device}: CUDA is not available on this machine; use device=cpu"
            )
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(
                f"device={device}: MPS is not available on this machine; use device=cpu"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"device={device}: only cpu, cuda[:N] and mps are supported")
    return dev


def trainer_kwargs(
    trainer: Mapping[str, Any],
    run_device: str | None,
    decision: PrecisionDecision,
    device: torch.device | None = None,
    interactive: bool = True,
    model: Any = None,
) -> dict[str, Any]:
    """The run's ``trainer`` arguments as ``L.Trainer`` takes them, with the decided precision;
    a ``device`` the run sets (``run_device``: ``device=cuda:1``; ``device`` is it resolved)
    selects the accelerator and device index; without a terminal Lightning's progress bar is
    off (the progress log lines replace it); with ``model``, a strategy name becomes its
    strategy object (FSDP wrapped per decoder / encoder block,
    :func:`mmbridge.training.strategies.make_strategy`, with FSDP's mixed-precision policy
    for the decided precision)."""
    kw = copy.deepcopy(dict(trainer))  # a fresh copy for Lightning
    kw["precision"] = decision.precision
    if model is not None:
        kw["strategy"] = make_strategy(trainer, model, precision=decision.precision)
    if run_device not in (None, "", "auto") and device is not None:
        kw["accelerator"] = {"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu")
        if device.type == "cuda":
            kw["devices"] = [device.index]
    if not interactive:
        kw["enable_progress_bar"] = False
    return kw


class _DropLightningAdverts(logging.Filter):
    """Drops Lightning's "try installing litlogger" tip (printed at every ``fit``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def tidy_lightning_output() -> None:
    """One line per Lightning message, no adverts, no warnings about what is meant.

    The ``lightning`` package installs its own console handler and also propagates to the root
    logger; under Hydra (whose handlers write the console and the run's log file) every message
    appeared twice. With root handlers present, Lightning's own handler is removed, so its
    records go through the run's logging only. Two warnings that describe this framework's
    intended state are silenced: frozen modules kept in eval mode (the frozen encoder and LLM),
    and a deprecation inside Lightning's own pytree helper.
    """
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningAdverts())
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, the resident set otherwise."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
