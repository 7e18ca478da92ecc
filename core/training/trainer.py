"""What the Lightning ``Trainer`` of a run is given: precision and weight dtypes decided from the
hardware, the device, the Trainer arguments, and Lightning's console output made quiet.

Precision is the decision that matters most on the CPU: a bf16 matmul is about 4x faster than
fp32 on CPUs with AMX / AVX512-BF16 and about 100x *slower* on CPUs with AVX2 only, where it is
emulated (measured: ../shared/ENVIRONMENT.md). So ``precision: auto`` and component
``dtype: auto`` are decided per machine, from the CPU flags confirmed by a short measured probe
(cached per machine), never from a preset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import resource
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from mmbridge.errors import ConfigError
from mmbridge.io import atomic_write_json
from mmbridge.training.strategies import make_strategy

log = logging.getLogger("mmbridge.hardware")

#: Fast bf16 on the CPU needs one of these instruction-set flags (/proc/cpuinfo).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: bf16 is chosen on such a CPU when the probe's bf16 matmul reaches this share of fp32's speed.
BF16_MIN_SPEEDUP = 1.0


@dataclass(frozen=True)
class Hardware:
    """What the precision decision looks at (gathered by :func:`detect_hardware`)."""

    cuda: bool
    cuda_bf16: bool
    cpu_flags: frozenset[str]
    cpu_model: str


@dataclass(frozen=True)
class PrecisionDecision:
    """The run's numeric setup.

    Attributes:
        precision: Lightning's ``precision`` (``bf16-mixed``, ``32-true``, or what was asked).
        weight_dtype: The dtype of components configured with ``dtype: auto`` (frozen LLM and
            encoder weights): ``bfloat16`` when bf16 is native and fast, else ``float32``.
        reason: One line saying why.
    """

    precision: str
    weight_dtype: str
    reason: str


def detect_hardware() -> Hardware:
    flags: frozenset[str] = frozenset()
    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = frozenset(value.split())
        elif key == "model name" and value.strip():
            model = value.strip()
    cuda = torch.cuda.is_available()
    return Hardware(cuda=cuda, cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
                    cpu_flags=flags, cpu_model=model)


def _matmul_gflops(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
                   shape: tuple[int, int, int] = (256, 576, 1536),
                   min_s: float = 0.4) -> dict[torch.dtype, float]:
    """GFLOP/s of an ``[m, k] @ [k, n]`` matmul in each of ``dtypes`` (the default shape is a
    small LLM's MLP on a short batch, where small-matrix overheads show as they do in training).

    The dtypes are timed in turns, one repetition each, until ``min_s`` has passed (at least
    three turns), and each keeps its fastest repetition: other work on the machine then slows
    both alike instead of one of them, so their ratio holds even on a busy machine."""
    m, k, n = shape
    pairs = {dt: (torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)) for dt in dtypes}
    for a, b in pairs.values():
        a @ b  # warm-up (kernel selection)
    best = dict.fromkeys(dtypes, float("inf"))
    t_start = time.perf_counter()
    for turn in range(200):
        for dt, (a, b) in pairs.items():
            t0 = time.perf_counter()
            a @ b
            best[dt] = min(best[dt], time.perf_counter() - t0)
        if turn >= 2 and time.perf_counter() - t_start >= min_s:
            break
    return {dt: 2 * m * k * n / t / 1e9 for dt, t in best.items()}


#: Part of the probe's cache key: 2 = the dtypes timed in turns (entries of version 1, timed one
#: after the other, could hold a ratio skewed by other work, e.g. "bf16 911 vs fp32 19").
PROBE_VERSION = 2
#: Environment variables that cap the instruction set PyTorch's kernels use (ATen's vectorised
#: ops, oneDNN -- bf16 matmuls --, MKL -- fp32 matmuls): part of the probe's cache key.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def probe_cpu_bf16(cache_dir: Path | None, hw: Hardware) -> dict[str, float]:
    """Measured fp32 and bf16 matmul speed (GFLOP/s) on this CPU with the current thread count,
    cached in ``cache_dir`` per (CPU model, flags, torch version, threads): it takes well under a
    second, even where bf16 is emulated, and is measured once per machine."""
    # the libraries' instruction-set limits change the speed as much as the CPU does
    isa = {k: os.environ[k] for k in ISA_ENV if k in os.environ}
    ident = json.dumps([PROBE_VERSION, hw.cpu_model, sorted(hw.cpu_flags), torch.__version__,
                        torch.get_num_threads()] + ([isa] if isa else []))
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"hardware-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            got = json.loads(path.read_text())
            return {"fp32_gflops": float(got["fp32_gflops"]), "bf16_gflops": float(got["bf16_gflops"])}
        except (ValueError, KeyError, TypeError, OSError):
            pass  # unreadable: measure again
    speeds = _matmul_gflops((torch.float32, torch.bfloat16))
    result = {"fp32_gflops": speeds[torch.float32], "bf16_gflops": speeds[torch.bfloat16]}
    if path is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the probe again
            atomic_write_json(path, {**result, "cpu_model": hw.cpu_model, "torch": torch.__version__})
    return result


def decide_precision(requested: str, accelerator: str, hw: Hardware | None = None,
                     probe: Callable[[Hardware], Mapping[str, float]] | None = None) -> PrecisionDecision:
    """Decide the Trainer precision and the ``dtype: auto`` weight dtype.

    ``requested`` other than ``auto`` is kept (its weight dtype follows it: bf16 for ``bf16*``).
    ``auto``: a CUDA device with bf16 support -> ``bf16-mixed``; a CUDA device without -> fp32;
    a CPU with AMX / AVX512-BF16 whose measured bf16 matmul is at least as fast as fp32 ->
    ``bf16-mixed``; any other CPU -> ``32-true``.

    Args:
        requested: ``trainer.precision``.
        accelerator: ``trainer.accelerator`` (``auto``, ``cpu``, ``gpu``, ``cuda``).
        hw: The hardware (detected when None).
        probe: ``hw -> {"fp32_gflops", "bf16_gflops"}`` (:func:`probe_cpu_bf16` when None).
    """
    requested = str(requested)
    if requested != "auto":
        wd = "bfloat16" if requested.startswith("bf16") else "float32"
        return PrecisionDecision(requested, wd, f"trainer.precision={requested} was set")
    hw = hw or detect_hardware()
    if accelerator in ("auto", "gpu", "cuda") and hw.cuda:
        if hw.cuda_bf16:
            return PrecisionDecision("bf16-mixed", "bfloat16", "CUDA device with bf16 support")
        return PrecisionDecision("32-true", "float32", "CUDA device without bf16 support")
    found = [f for f in BF16_CPU_FLAGS if f in hw.cpu_flags]
    if not found:
        return PrecisionDecision("32-true", "float32",
                                 f"CPU without {' / '.join(BF16_CPU_FLAGS)} ({hw.cpu_model}): "
                                 "bf16 would be emulated (about 100x slower)")
    speeds = (probe or (lambda h: probe_cpu_bf16(None, h)))(hw)
    ratio = speeds["bf16_gflops"] / max(speeds["fp32_gflops"], 1e-9)
    measured = (f"bf16 matmul {speeds['bf16_gflops']:.0f} vs fp32 {speeds['fp32_gflops']:.0f} "
                f"GFLOP/s (x{ratio:.2f})")
    if ratio >= BF16_MIN_SPEEDUP:
        return PrecisionDecision("bf16-mixed", "bfloat16", f"CPU with {', '.join(found)}: {measured}")
    return PrecisionDecision("32-true", "float32",
                             f"CPU with {', '.join(found)} but {measured}: fp32 is faster here")


def run_precision(cfg: DictConfig) -> PrecisionDecision:
    """The decision for a composed config (the probe cached under ``paths.cache_dir``)."""
    trainer = cfg.get("trainer") or {}
    cache_dir = Path(str(cfg.paths.cache_dir)) if cfg.get("paths") and cfg.paths.get("cache_dir") else None
    return decide_precision(str(trainer.get("precision", "auto")), str(trainer.get("accelerator", "auto")),
                            probe=lambda hw: probe_cpu_bf16(cache_dir, hw))


def resolve_device(device: str | torch.device | None, accelerator: str = "auto") -> torch.device:
    """The device a run's model lives on outside ``Trainer.fit`` (feature-cache fill,
    evaluation, ``eval``, ``generate``): ``device`` when given (``cpu``, ``cuda``, ``cuda:1``),
    else the trainer's accelerator (``auto``: CUDA when available). Under a multi-process
    launcher a bare ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
    if device in (None, "", "auto"):
        accelerator = str(accelerator)
        if accelerator == "cpu":
            device = "cpu"
        elif accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
            device = "cuda"
        else:
            device = "cpu"
    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device}: not a device; use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: CUDA is not available on this machine; use device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device={device}: MPS is not available on this machine; use device=cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"device={device}: only cpu, cuda[:N] and mps are supported")
    return dev


def resolve_auto_dtypes(cfg: DictConfig, weight_dtype: str) -> DictConfig:
    """A copy of ``cfg`` where every component node's ``dtype: auto`` (``llm``, ``encoder``,
    ``branches.*.encoder``) is ``weight_dtype``."""
    cfg = cfg.copy()
    nodes = [cfg.get("llm"), cfg.get("encoder")]
    nodes += [b.get("encoder") for b in (cfg.get("branches") or {}).values()]
    for node in nodes:
        if isinstance(node, DictConfig) and node.get("dtype") == "auto":
            node.dtype = weight_dtype
    return cfg


def trainer_kwargs(cfg: DictConfig, decision: PrecisionDecision, device: torch.device | None = None,
                   interactive: bool = True, model: Any = None) -> dict[str, Any]:
    """``cfg.trainer`` as ``L.Trainer`` arguments, with the decided precision; an explicit
    ``device`` (``cuda:1``) selects the accelerator and device index; without a terminal
    Lightning's progress bar is off (the progress log lines replace it); with ``model``, a
    strategy name becomes its strategy object (FSDP wrapped per decoder / encoder block,
    :func:`mmbridge.training.strategies.make_strategy`)."""
    kw = dict(cast(dict[str, Any], OmegaConf.to_container(cfg.trainer, resolve=True)))  # a mapping node
    kw["precision"] = decision.precision
    if model is not None:
        kw["strategy"] = make_strategy(cfg.trainer, model)
    if cfg.get("device") not in (None, "", "auto") and device is not None:
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
