"""Precision, decided once per run: the Lightning ``precision``, the dtype of every component's
weights, and the fp32 master weights of mixed-precision training.

Two decisions live here and nowhere else:

* **The Trainer precision and the frozen weights' dtype** (:func:`decide_precision`). On the
  CPU this is the decision that matters most: a bf16 matmul is about 4x faster than fp32 on CPUs
  with AMX / AVX512-BF16 and about 100x *slower* on CPUs with AVX2 only, where it is emulated
  (measured: ../shared/ENVIRONMENT.md). So ``precision: auto`` and component ``dtype: auto`` are
  decided per machine, from the CPU flags confirmed by a short measured probe (cached per
  machine), never from a preset. ``mmbridge plan`` calls the same function for the planned GPU.
* **Which weights are fp32** (:func:`component_dtypes`, :func:`keep_trained_fp32`). Under
  ``bf16-mixed`` every parameter that trains is an fp32 master weight and the matmuls run in
  bf16 under autocast (Micikevicius et al., 1710.03740 §3.1: updates smaller than the weight's
  half-precision spacing would otherwise be rounded away); frozen weights stay bf16. A
  component whose own weights train in any scheduled stage (``train.llm: full``,
  ``train.encoder: full | last_n``) is therefore loaded in fp32; LoRA adapters are fp32 beside
  a bf16 base, as PEFT's ``get_peft_model`` makes them. Under FSDP every weight is fp32 (one
  flat parameter per unit holds one dtype) and FSDP's ``MixedPrecision`` casts them to bf16 for
  compute (:func:`fsdp_mixed_precision`); DeepSpeed keeps its own fp32 master copy, so the
  model's weights stay at the weight dtype there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmbridge.config.model_spec import ModelConfig, node_at, weight_nodes
from mmbridge.config.schema import Paths, Stage
from mmbridge.config.sections import trainer_arg
from mmbridge.errors import ConfigError
from mmbridge.utils.io import atomic_write_json

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
        weight_dtype: The dtype of frozen components configured with ``dtype: auto``:
            ``bfloat16`` when bf16 is native and fast, else ``float32``. A component whose own
            weights train under a ``*-mixed`` precision is kept in fp32 instead
            (:func:`component_dtypes`).
        reason: One line saying why.
    """

    precision: str
    weight_dtype: str
    reason: str

    @property
    def mixed(self) -> bool:
        """Lightning's ``*-mixed``: low-precision compute under autocast over fp32 master weights
        (every parameter that trains is kept in fp32, see :func:`keep_trained_fp32`)."""
        return self.precision.endswith("-mixed")

    @property
    def compute_dtype(self) -> str:
        """The dtype matmuls run in: ``bfloat16`` / ``float16`` (autocast or pure), else
        ``float32``."""
        if self.precision.startswith("bf16"):
            return "bfloat16"
        return "float16" if self.precision.startswith("16") else "float32"


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
    return Hardware(
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        cpu_flags=flags,
        cpu_model=model,
    )


def _matmul_gflops(
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    shape: tuple[int, int, int] = (256, 576, 1536),
    min_s: float = 0.4,
) -> dict[torch.dtype, float]:
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
ISA_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)


def probe_cpu_bf16(cache_dir: Path | None, hw: Hardware) -> dict[str, float]:
    """Measured fp32 and bf16 matmul speed (GFLOP/s) on this CPU with the current thread count,
    cached in ``cache_dir`` per (CPU model, flags, torch version, threads): it takes well under a
    second, even where bf16 is emulated, and is measured once per machine."""
    # the libraries' instruction-set limits change the speed as much as the CPU does
    isa = {k: os.environ[k] for k in ISA_ENV if k in os.environ}
    ident = json.dumps(
        [
            PROBE_VERSION,
            hw.cpu_model,
            sorted(hw.cpu_flags),
            torch.__version__,
            torch.get_num_threads(),
        ]
        + ([isa] if isa else [])
    )
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"hardware-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            got = json.loads(path.read_text())
            return {
                "fp32_gflops": float(got["fp32_gflops"]),
                "bf16_gflops": float(got["bf16_gflops"]),
            }
        except (ValueError, KeyError, TypeError, OSError):
            pass  # unreadable: measure again
    speeds = _matmul_gflops((torch.float32, torch.bfloat16))
    result = {"fp32_gflops": speeds[torch.float32], "bf16_gflops": speeds[torch.bfloat16]}
    if path is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the probe again
            atomic_write_json(
                path, {**result, "cpu_model": hw.cpu_model, "torch": torch.__version__}
            )
    return result


def decide_precision(
    requested: str,
    accelerator: str,
    hw: Hardware | None = None,
    probe: Callable[[Hardware], Mapping[str, float]] | None = None,
) -> PrecisionDecision:
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
        return PrecisionDecision(
            "32-true",
            "float32",
            f"CPU without {' / '.join(BF16_CPU_FLAGS)} ({hw.cpu_model}): "
            "bf16 would be emulated (about 100x slower)",
        )
    speeds = (probe or (lambda h: probe_cpu_bf16(None, h)))(hw)
    ratio = speeds["bf16_gflops"] / max(speeds["fp32_gflops"], 1e-9)
    measured = (
        f"bf16 matmul {speeds['bf16_gflops']:.0f} vs fp32 {speeds['fp32_gflops']:.0f} "
        f"GFLOP/s (x{ratio:.2f})"
    )
    if ratio >= BF16_MIN_SPEEDUP:
        return PrecisionDecision(
            "bf16-mixed", "bfloat16", f"CPU with {', '.join(found)}: {measured}"
        )
    return PrecisionDecision(
        "32-true", "float32", f"CPU with {', '.join(found)} but {measured}: fp32 is faster here"
    )


def run_precision(trainer: Mapping[str, Any], paths: Paths) -> PrecisionDecision:
    """The decision for a run's ``trainer`` arguments (``precision``, ``accelerator``), the
    probe cached under its ``paths.cache_dir``."""
    cache_dir = Path(paths.cache_dir) if paths.cache_dir else None
    return decide_precision(
        str(trainer_arg(trainer, "precision")),
        str(trainer_arg(trainer, "accelerator")),
        probe=lambda hw: probe_cpu_bf16(cache_dir, hw),
    )


#: ``dtype`` values of component nodes (``auto``: decided per run, see :func:`component_dtypes`).
DTYPES = ("auto", "float32", "float16", "bfloat16")


def parse_dtype(value: str, key: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` -> bf16 where this machine runs it
    natively and fast, else fp32 (a run resolves ``auto`` once for all its components, see
    :func:`resolve_auto_dtypes`; this covers a component built on its own).

    Raises:
        ConfigError: ``value`` is not one of :data:`DTYPES`, naming ``key``.
    """
    if value not in DTYPES:
        raise ConfigError(f"{key}: unknown dtype '{value}'; valid: {', '.join(DTYPES)}")
    if value == "auto":
        value = decide_precision("auto", "auto").weight_dtype
    return getattr(torch, value)


def _strategy_name(trainer: Mapping[str, Any]) -> str:
    strategy = trainer_arg(trainer, "strategy")
    return str(getattr(strategy, "strategy_name", strategy))


def encoder_mode(value: bool | str) -> str:
    """``stages.<s>.train.encoder`` as one of ``frozen | lora | last_n | full`` (``false`` and
    ``true`` are ``frozen`` and ``full``)."""
    if isinstance(value, bool):
        return "full" if value else "frozen"
    return str(value)


def _trains_whole(stages: Sequence[Stage], component: str) -> bool:
    """Whether one of ``stages`` (the scheduled ones) trains ``component``'s own weights (not
    only LoRA adapters)."""
    for stage in stages:
        if component == "llm" and stage.train.llm == "full":
            return True
        if component == "encoder" and encoder_mode(stage.train.encoder) in ("full", "last_n"):
            return True
    return False


def component_dtypes(
    model: Mapping[str, Any],
    stages: Sequence[Stage],
    trainer: Mapping[str, Any],
    decision: PrecisionDecision,
) -> dict[str, str]:
    """The weight dtype of each component node with weights (``llm``, ``encoder``,
    ``branches.<m>.encoder``: :func:`mmbridge.config.model_spec.weight_nodes`) that says
    ``dtype: auto``, keyed by its config key.

    ``decision.weight_dtype``, except under a ``*-mixed`` precision: a component whose own
    weights train in one of ``stages`` (the scheduled ones) gets ``float32`` (its fp32 master
    weights), and under FSDP (``trainer.strategy``) every component does (FSDP's
    ``MixedPrecision`` casts for compute). DeepSpeed keeps its own fp32 master copy: its
    components stay at ``weight_dtype``.

    Args:
        model: The model's nodes (:attr:`mmbridge.runtime.config.RunConfig.model`).
        stages: The scheduled stages, in order.
        trainer: The ``trainer`` arguments.
        decision: The run's precision decision.
    """
    strategy = _strategy_name(trainer)
    everything_fp32 = decision.mixed and strategy.startswith("fsdp")
    masters = decision.mixed and not strategy.startswith("deepspeed")
    out = {}
    for spec in weight_nodes(model):  # the nodes with weights: mmbridge.config.model_spec
        node = node_at(model, spec.key)
        if not isinstance(node, Mapping) or node.get("dtype") != "auto":
            continue  # a node without `dtype: auto` keeps its own (or its class's default)
        whole = _trains_whole(stages, spec.kind)
        out[spec.key] = (
            "float32" if everything_fp32 or (masters and whole) else decision.weight_dtype
        )
    return out


def resolve_auto_dtypes(
    model: ModelConfig,
    stages: Sequence[Stage],
    trainer: Mapping[str, Any],
    decision: PrecisionDecision | str,
) -> ModelConfig:
    """``model`` (the run's component nodes) with every node's ``dtype: auto`` decided
    (:func:`component_dtypes`): what the run assembles.

    ``decision`` may be a bare weight dtype (``"bfloat16"``): it then means the mixed precision
    of that dtype (``bf16-mixed``; ``float32``: ``32-true``), unless ``trainer.precision`` names
    one."""
    if isinstance(decision, str):
        asked = str(trainer_arg(trainer, "precision"))
        mixed = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}.get(decision, "32-true")
        decision = PrecisionDecision(mixed if asked == "auto" else asked, decision, "given")
    return model.with_dtypes(component_dtypes(model, stages, trainer, decision))


def keep_trained_fp32(model: nn.Module) -> int:
    """Cast every parameter of ``model`` that requires grad and is not fp32 to fp32 (its master
    weight under mixed precision); frozen ones keep their dtype. Returns how many were cast.

    Works on the meta device too (``mmbridge plan`` counts the same bytes a run holds)."""
    cast = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.to(torch.float32)
                cast += 1
    return cast


def fsdp_mixed_precision(precision: str) -> Any:
    """FSDP's ``MixedPrecision`` for a Lightning precision: under ``bf16-mixed`` / ``16-mixed``
    the fp32 sharded weights are cast to the low dtype for compute and their gradients are
    reduced in fp32 (Lightning's own policy reduces in bf16); ``None`` otherwise (Lightning's)."""
    from torch.distributed.fsdp import MixedPrecision  # torch.distributed, on demand

    low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    if low is None:
        return None
    return MixedPrecision(param_dtype=low, reduce_dtype=torch.float32, buffer_dtype=low)


#: What ``mmbridge plan`` assumes a GPU offers (a current data-centre GPU: bf16 support).
PLANNED_GPU = Hardware(cuda=True, cuda_bf16=True, cpu_flags=frozenset(), cpu_model="planned GPU")
PLANNED_CPU = Hardware(cuda=False, cuda_bf16=False, cpu_flags=frozenset(), cpu_model="planned CPU")


def plan_precision(trainer: Mapping[str, Any]) -> PrecisionDecision:
    """The decision :func:`decide_precision` makes on the machine ``mmbridge plan`` plans for:
    a bf16-capable GPU when the accelerator is ``auto`` / ``gpu`` / ``cuda``, else a CPU (whose
    bf16 speed is not probed: fp32)."""
    accelerator = str(trainer_arg(trainer, "accelerator"))
    hw = PLANNED_GPU if accelerator in ("auto", "gpu", "cuda") else PLANNED_CPU
    return decide_precision(str(trainer_arg(trainer, "precision")), accelerator, hw=hw)
