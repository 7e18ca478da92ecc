"""``mmbridge plan``: the size of a configured model and its memory per GPU, without weights.

The model is assembled from the components' ``config.json`` alone on PyTorch's meta device
(tensors with shapes and dtypes but no storage): nothing is downloaded and nothing is
allocated, so a 7B model is planned on a laptop in seconds. The configs of the presets'
models ship in ``mmbridge/plugins/assets/configs/<hub id>/``; a local model directory works too.

Memory per GPU is an estimate of what training holds at its peak, in bytes:

* weights: every parameter and buffer at its dtype; sharded over the GPUs by FSDP and
  DeepSpeed ZeRO-3;
* gradients: the trained parameters at their dtype; sharded by ZeRO-2/3 and FSDP. Precision
  is decided by :func:`mmbridge.model.precision.plan_precision`, the rule a run applies: under
  ``bf16-mixed`` every trained parameter is an fp32 master weight (4 bytes, its gradient too)
  and frozen weights are bf16 (all fp32 under FSDP, cast to bf16 for compute);
* optimizer state: torch.optim keeps ``states`` tensors per trained weight in its dtype
  (AdamW 2, SGD 1: fp32 under mixed precision); DeepSpeed keeps bf16 weights with an fp32
  master copy plus fp32 states (``4 + 4 states`` bytes per weight, ZeRO 1910.02054 §3);
  sharded by ZeRO-1/2/3 and FSDP;
* activations of the LLM's decoder blocks for ``B`` sequences of ``T`` tokens, per block and
  token ``5 D + 2 D_kv + 4 I`` values (the residual stream and norm outputs, queries / keys /
  values kept by SDPA, the attention output, gate / up / activation / product of the MLP; this
  is the ``34 s b h`` bytes of 2205.05198 eq. 1 for Llama's shapes, without the ``s^2`` term
  that SDPA / flash attention do not store). With gradient checkpointing each block keeps only
  its input (``D`` values) and one block's full set exists during its recomputation;
* the LM head: logits in the compute dtype plus their fp32 copy and log-softmax for the loss
  (``(a + 8) V`` bytes per position), counted for every text position (an upper bound: only
  supervised answer tokens reach the head, media positions never; with a large vocabulary this
  term dominates, and real batches are padded to their longest sample, not to the maximum);
* a trained encoder's blocks likewise, over its ``N`` tokens per image.

CUDA's own context, the allocator's fragmentation and communication buffers are not counted;
:data:`HEADROOM` of the GPU is kept free for them in the ``fits`` verdict.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mmbridge.config.build import split_node
from mmbridge.config.model_spec import branch_nodes
from mmbridge.config.sections import trainer_arg
from mmbridge.errors import ConfigError
from mmbridge.model import MultimodalModel, assemble
from mmbridge.model.precision import (
    encoder_mode,
    keep_trained_fp32,
    plan_precision,
    resolve_auto_dtypes,
)
from mmbridge.registry import Registry
from mmbridge.runtime.config import RunConfig
from mmbridge.training.optimizers import STATES_PER_WEIGHT
from mmbridge.training.stages import configure_trainable, stage_steps

if TYPE_CHECKING:
    from transformers import PreTrainedModel


GiB = 2**30
#: Share of the GPU's memory kept free for what the estimate leaves out (CUDA context, the
#: caching allocator's fragmentation, NCCL buffers).
HEADROOM = 0.1
#: ``trainer.strategy`` -> what it shards over the GPUs (weights, gradients, optimizer state).
SHARDING: dict[str, tuple[bool, bool, bool]] = {
    "auto": (False, False, False),
    "ddp": (False, False, False),
    "dp": (False, False, False),
    "ddp_spawn": (False, False, False),
    "single_device": (False, False, False),
    "deepspeed_stage_1": (False, False, True),
    "deepspeed_stage_2": (False, True, True),
    "deepspeed_stage_2_offload": (False, True, True),
    "deepspeed_stage_3": (True, True, True),
    "deepspeed_stage_3_offload": (True, True, True),
    "fsdp": (True, True, True),
}


def shipped_configs_dir() -> Path:
    """``mmbridge/plugins/assets/configs``: the HF configs shipped for the presets' models."""
    return Path(str(resources.files("mmbridge.plugins.assets") / "configs"))


def shipped_configs() -> list[str]:
    """Hub ids (``org/name``) whose ``config.json`` ships with mmbridge."""
    root = shipped_configs_dir()
    return sorted(str(p.parent.relative_to(root)) for p in root.glob("**/config.json"))


def config_dir(path: str, key: str, registry: Registry | None = None) -> Path:
    """The directory holding ``config.json`` for a component's ``path``: the shipped copy of a
    hub id, an offline model (asset) already converted into the cache, else a local model
    directory. Nothing is downloaded or converted."""
    shipped = shipped_configs_dir() / path
    if (shipped / "config.json").is_file():
        return shipped
    if registry is not None and ("asset", path) in registry:
        asset = registry.get("asset", path).create()
        if not asset.is_converted():
            raise ConfigError(
                f"{key}: offline model '{path}' is not converted yet (mmbridge plan "
                f"converts nothing): run `mmbridge assets --convert {path}` or any run "
                f"that uses it first"
            )
        return asset.location()
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return local
    raise ConfigError(
        f"{key}: no config.json for '{path}': give a local model directory, a "
        f"converted offline model, or one of the hub ids whose config ships with "
        f"mmbridge: {', '.join(shipped_configs())}"
    )


def _from_config(registry: Registry, kind: str, node: Any, key: str, dtype: str) -> Any:
    """Build ``node`` through its class's ``from_config`` on the current default device (an
    instance of ``kind``'s base class: the registry checks the kind at registration)."""
    name, args = split_node(node, key)
    try:
        cls = registry.get(kind, name).cls
    except KeyError as exc:
        raise ConfigError(f"{key}.name: {exc}") from None
    if not hasattr(cls, "from_config"):
        raise ConfigError(
            f"{key}.name: {kind} '{name}' cannot be built from a config alone "
            f"(its class has no from_config); mmbridge plan supports hf_causal LLMs "
            f"and hf_vision encoders"
        )
    accepted = inspect.signature(cls.from_config).parameters
    kwargs = {k: v for k, v in args.items() if k in accepted and k != "config"}
    if kwargs.get("dtype") == "auto":
        kwargs["dtype"] = dtype
    return cls.from_config(config_dir(str(args.get("path")), f"{key}.path", registry), **kwargs)


def build_meta_model(
    cfg: Mapping[str, Any], registry: Registry, dtype: str = "bfloat16"
) -> MultimodalModel:
    """The model of ``cfg`` on the meta device, its LLM and encoder built from their configs.

    Args:
        cfg: The model's component nodes (``RunConfig.model``) or a composed config (one
            encoder branch; ``branches`` are not planned).
        registry: The run's registry.
        dtype: What ``dtype: auto`` means here (the planned GPU's weight dtype).
    """
    if len(branch_nodes(cfg)) > 1:
        raise ConfigError(
            "branches: mmbridge plan covers the main encoder branch only; "
            "plan a config without `branches`"
        )
    with torch.device("meta"):
        return assemble(
            cfg,
            registry,
            build_weights=lambda kind, node, key: _from_config(registry, kind, node, key, dtype),
        )


@dataclass
class StagePlan:
    """One stage's figures (counts in parameters, memory in bytes per GPU)."""

    name: str
    trainable: dict[str, int]
    batch_size: int
    global_batch: int
    steps: int
    samples: int
    optimizer: str
    memory: dict[str, float]
    total_bytes: float
    fits: bool
    #: component -> the dtype(s) of its weights, trained ones marked (``llm: float32 (trains)``).
    dtypes: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """What ``mmbridge plan`` prints (see :func:`format_plan`)."""

    params: dict[str, int]
    visual_tokens: int
    encoder_tokens: int
    text_tokens: int
    seq_len: int
    gpus: int
    strategy: str
    precision: str
    gradient_checkpointing: bool
    gpu_memory_gb: float
    stages: list[StagePlan] = field(default_factory=list)


def _numel(module: nn.Module | None, trainable: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _dtypes(module: nn.Module) -> str:
    """``float32 (trains)``, ``bfloat16``, or both kinds: ``bfloat16, float32 (trains)``."""
    kinds = {(str(p.dtype).removeprefix("torch."), p.requires_grad) for p in module.parameters()}
    return ", ".join(f"{d}{' (trains)' if t else ''}" for d, t in sorted(kinds)) or "-"


def _components(model: MultimodalModel) -> dict[str, nn.Module | None]:
    branch = next(iter(model.branches.values()))
    return {
        "encoder": branch.encoder,
        "connector": branch.connector,
        "llm": model.llm,
        "prefix": model.prefix,
    }


def _block_values(config: Any) -> tuple[int, int]:
    """(values kept per token by one block, block count) of an HF transformer config."""
    d = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    d_kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = int(getattr(config, "intermediate_size", None) or 4 * d)
    return 5 * d + 2 * d_kv + 4 * inter, int(config.num_hidden_layers)


def activation_bytes(
    config: Any, batch: int, tokens: int, act_bytes: int, checkpointing: bool
) -> float:
    """Activation memory of a decoder stack (see the module docstring) for ``batch`` x
    ``tokens``."""
    per_block, blocks = _block_values(config)
    bt = batch * tokens
    if checkpointing:
        return float(bt * act_bytes * (blocks * int(config.hidden_size) + per_block))
    return float(bt * act_bytes * blocks * per_block)


def _gpus(trainer: Mapping[str, Any], gpus: int | None) -> int:
    if gpus is not None:
        return int(gpus)
    devices = trainer_arg(trainer, "devices")
    if isinstance(devices, list):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    else:
        raise ConfigError(
            f"trainer.devices={devices}: mmbridge plan needs a GPU count; set "
            f"trainer.devices=N or pass gpus=N"
        )
    return n * int(trainer_arg(trainer, "num_nodes") or 1)


def make_plan(
    run: RunConfig,
    registry: Registry,
    gpu_memory_gb: float = 80.0,
    gpus: int | None = None,
    images_per_sample: int = 1,
    data_samples: int | None = None,
) -> Plan:
    """Plan every scheduled stage of ``run`` (see the module docstring for the estimates).

    Args:
        run: A composed config, parsed.
        registry: The run's registry.
        gpu_memory_gb: Memory of one GPU in GiB (an "80 GB" A100 / H100 holds 80 GiB).
        gpus: GPUs in all; default ``trainer.devices x trainer.num_nodes``.
        images_per_sample: Images per sequence (LLaVA data: one).
        data_samples: Training samples of a stage that counts in ``epochs``
            (:func:`mmbridge.training.stages.stage_steps`: ``ceil(epochs x ceil(n / global
            batch))`` steps, accumulation included).
    """
    trainer = run.trainer
    strategy = str(trainer_arg(trainer, "strategy"))
    if strategy not in SHARDING:
        raise ConfigError(f"trainer.strategy={strategy}: mmbridge plan knows {', '.join(SHARDING)}")
    decision = plan_precision(trainer)  # the rule a run on that machine applies
    precision = decision.precision
    act_bytes = 2 if decision.compute_dtype != "float32" else 4
    n_gpu = _gpus(trainer, gpus)
    shard_w, shard_g, shard_o = SHARDING[strategy]
    deepspeed = strategy.startswith("deepspeed")
    accumulate = int(trainer_arg(trainer, "accumulate_grad_batches") or 1)

    model_cfg = resolve_auto_dtypes(run.model, run.scheduled, trainer, decision)
    model = build_meta_model(model_cfg, registry, decision.weight_dtype)
    parts = _components(model)
    branch = next(iter(model.branches.values()))
    encoder, connector, llm = branch.encoder, branch.connector, model.llm
    encoder_tokens = int(encoder.num_tokens(None))
    visual = int(connector.out_tokens(encoder_tokens)) if connector.in_sequence else 0
    prefix_tokens = int(model.prefix.n_tokens) if model.prefix is not None else 0
    text = run.loader.max_text_tokens
    seq_len = visual * images_per_sample + text + prefix_tokens
    checkpointing = bool(getattr(llm, "gradient_checkpointing", False))
    # the planned llm / encoder are HF-backed (_from_config accepts only from_config classes)
    llm_config = cast("PreTrainedModel", llm.model).config.get_text_config(decoder=True)
    plan = Plan(
        params={k: _numel(m) for k, m in parts.items() if m is not None},
        visual_tokens=visual,
        encoder_tokens=encoder_tokens,
        text_tokens=text,
        seq_len=seq_len,
        gpus=n_gpu,
        strategy=strategy,
        precision=precision,
        gradient_checkpointing=checkpointing,
        gpu_memory_gb=float(gpu_memory_gb),
    )
    for name in run.schedule:
        stage = run.stages[name]
        configure_trainable(model, stage)
        if (
            decision.mixed and not deepspeed
        ):  # fp32 master weights, as BridgeModule.setup makes them
            keep_trained_fp32(model)
        weights = float(_bytes(model.parameters()) + _bytes(model.buffers()))
        trained = [p for p in model.parameters() if p.requires_grad]
        opt_name = str(stage.optimizer.name)
        states = STATES_PER_WEIGHT.get(opt_name, 2)
        grads = float(_bytes(trained))
        n_trained = sum(p.numel() for p in trained)
        if deepspeed:
            optim = float(n_trained * (4 + 4 * states))
        elif opt_name == "adafactor":  # row + column statistics per matrix, one per vector
            optim = float(
                sum(
                    (p.shape[-2] + p.shape[-1]) * p[..., 0, 0].numel()
                    if p.dim() >= 2
                    else p.numel()
                    for p in trained
                )
                * 4
            )
        else:
            optim = float(states * grads)
        batch = int(stage.batch_size)
        epochs = stage.epochs
        if epochs is not None and data_samples is None:
            raise ConfigError(
                f"stages.{name}.epochs={epochs}: the step count depends on the data's "
                f"length; pass data_samples=N (the stage's training samples)"
            )
        steps = stage_steps(stage, data_samples or 0, n_gpu, accumulate)
        acts = activation_bytes(llm_config, batch, seq_len, act_bytes, checkpointing)
        head = float(batch * text * int(llm_config.vocab_size) * (act_bytes + 8))
        if encoder_mode(stage.train.encoder) != "frozen":
            enc_cfg = cast("PreTrainedModel", encoder.model).config
            acts += activation_bytes(
                enc_cfg, batch * images_per_sample, encoder_tokens, act_bytes, False
            )
        memory = {
            "weights": weights / (n_gpu if shard_w else 1),
            "gradients": grads / (n_gpu if shard_g else 1),
            "optimizer": optim / (n_gpu if shard_o else 1),
            "activations": acts,
            "lm_head": head,
        }
        total = sum(memory.values())
        global_batch = batch * n_gpu * accumulate
        plan.stages.append(
            StagePlan(
                name=str(name),
                trainable={k: _numel(m, trainable=True) for k, m in parts.items() if m is not None},
                batch_size=batch,
                global_batch=global_batch,
                steps=steps,
                samples=steps * global_batch,
                optimizer=opt_name,
                memory=memory,
                total_bytes=total,
                fits=total <= (1 - HEADROOM) * gpu_memory_gb * GiB,
                dtypes={k: _dtypes(m) for k, m in parts.items() if m is not None},
            )
        )
    return plan


def _count(n: int) -> str:
    """``6738415616`` -> ``6,738,415,616 (6.74B)``."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.{3 - len(str(int(n // div)))}f}{unit})"
    return f"{n:,}"


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def format_plan(plan: Plan) -> str:
    """The plan as the lines ``mmbridge plan`` prints."""
    lines = ["parameters (total):"]
    lines += [f"  {k:<10} {_count(v)}" for k, v in plan.params.items()]
    lines.append(f"  {'all':<10} {_count(sum(plan.params.values()))}")
    lines += [
        f"tokens per sample: {plan.encoder_tokens} encoder features -> {plan.visual_tokens} "
        f"visual tokens; sequence length {plan.seq_len} (visual + {plan.text_tokens} text)",
        f"GPUs: {plan.gpus}, strategy {plan.strategy}, precision {plan.precision}, gradient "
        f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
        f"{plan.gpu_memory_gb:g} GiB each",
    ]
    for s in plan.stages:
        lines.append(
            f"stage {s.name}: {s.steps:,} steps x global batch {s.global_batch} "
            f"({s.batch_size} per GPU) = {s.samples:,} samples; optimizer {s.optimizer}"
        )
        lines.append(
            "  trainable: " + ", ".join(f"{k} {_count(v)}" for k, v in s.trainable.items())
        )
        lines.append("  weights: " + "; ".join(f"{k} {v}" for k, v in s.dtypes.items()))
        lines.append(
            "  memory per GPU: " + ", ".join(f"{k} {_gib(v)}" for k, v in s.memory.items())
        )
        limit = (1 - HEADROOM) * plan.gpu_memory_gb * GiB
        verdict = "fits" if s.fits else "does NOT fit"
        lines.append(
            f"  total {_gib(s.total_bytes)}: {verdict} in {plan.gpu_memory_gb:g} GiB "
            f"({_gib(limit)} usable, {HEADROOM:.0%} kept free)"
        )
    return "\n".join(lines)
