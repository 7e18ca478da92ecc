"""What trains in a stage: freezing, LoRA (LLM and encoder), the encoder's last blocks, the
stage's step count from ``epochs``, and the checks on stage configs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn

from mmbridge.config import to_container
from mmbridge.config.schema import LLM_MODES, Stage, Train
from mmbridge.config.sections import trainer_arg
from mmbridge.config.validation import check_section, schedule_errors
from mmbridge.errors import ConfigError
from mmbridge.model import MultimodalModel
from mmbridge.model.lora import has_lora, inject_lora, lora_settings, mark_adapters_trainable
from mmbridge.model.precision import encoder_mode

__all__ = [
    "LLM_MODES",
    "check_schedule",
    "configure_trainable",
    "data_parallel_size",
    "encoder_blocks",
    "frozen_encoders",
    "stage_steps",
]


def _stage_errors(key: str, stage: dict[str, Any]) -> list[str]:
    """What the schema cannot say about one stage: the step count, the encoder's last blocks."""
    errors = []
    if stage.get("epochs") is None and stage.get("max_steps") is None:
        errors.append(
            f"{key}: max_steps and epochs are both null; set one (epochs: passes over "
            f"the stage's data, e.g. {key}.epochs=1)"
        )
    train = stage.get("train") or {}
    if encoder_mode(train.get("encoder", Train().encoder)) == "last_n" and not train.get(
        "encoder_last_n"
    ):
        errors.append(
            f"{key}.train.encoder=last_n: set {key}.train.encoder_last_n to the number "
            f"of the encoder's last blocks that train"
        )
    return errors


def check_schedule(cfg: Mapping[str, Any]) -> None:
    """Every scheduled stage of a composed config (or its plain form) exists and its settings
    fit the schema (modes, steps, batch size, optimizer); errors name the keys. A check of the
    raw config beside :func:`mmbridge.config.validation.validate_config`, which checks the rest;
    the run's entry (:func:`mmbridge.runtime.task.run_task`) calls both."""
    data = to_container(cfg)
    errors = schedule_errors(data)
    stages = s if isinstance(s := data.get("stages"), dict) else {}
    for name in data.get("schedule") or []:
        if name in stages:
            errors += check_section(f"stages.{name}", stages[name], Stage)
            errors += _stage_errors(f"stages.{name}", stages[name])
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def frozen_encoders(stages: Iterable[Stage]) -> bool:
    """Whether none of ``stages`` (the scheduled ones: ``RunConfig.scheduled``) trains the
    encoders (then their features can be cached)."""
    return all(encoder_mode(s.train.encoder) == "frozen" for s in stages)


def data_parallel_size(trainer: Mapping[str, Any]) -> int:
    """Processes that each read their own batches: ``trainer.devices`` (a count, a list, or
    ``-1`` / ``auto``: every visible GPU, one CPU process) times ``trainer.num_nodes``."""
    devices = trainer_arg(trainer, "devices")
    if isinstance(devices, list | tuple) or (
        hasattr(devices, "__len__") and not isinstance(devices, str)
    ):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif (
        str(trainer_arg(trainer, "accelerator")) in ("auto", "gpu", "cuda")
        and torch.cuda.is_available()
    ):
        n = torch.cuda.device_count()
    else:
        n = 1
    return n * int(trainer_arg(trainer, "num_nodes") or 1)


def stage_steps(stage: Stage, n_samples: int, world_size: int = 1, accumulate: int = 1) -> int:
    """The optimizer steps of a stage: ``max_steps``, or with ``epochs`` set, ``epochs`` passes
    over ``n_samples``: ``ceil(epochs x ceil(n / (batch_size x world_size)) / accumulate)``
    (each process reads ``ceil(n / world)`` samples per epoch, the last batch may be short).

    Args:
        stage: The stage (``epochs``, ``max_steps``, ``batch_size``).
        n_samples: Training samples of the stage's data.
        world_size: Data-parallel processes (:func:`data_parallel_size`).
        accumulate: ``trainer.accumulate_grad_batches``.
    """
    if stage.epochs is None:
        if stage.max_steps is None:
            raise ConfigError("max_steps and epochs are both null; set one")
        return int(stage.max_steps)
    batches = math.ceil(n_samples / (int(stage.batch_size) * max(1, world_size)))
    return max(1, math.ceil(float(stage.epochs) * batches / max(1, accumulate)))


def encoder_blocks(encoder: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The encoder's stack of transformer blocks: the first ``ModuleList`` / ``Sequential`` of
    composite modules of one class (HF vision towers, timm ViTs, Whisper's encoder)."""
    for m in encoder.modules():
        if (
            isinstance(m, nn.ModuleList | nn.Sequential)
            and len(m) > 0
            and len({type(b) for b in m}) == 1
            and len(list(m[0].children())) >= 2
        ):
            return m
    raise ConfigError(
        f"train.encoder=last_n: {type(encoder).__name__} has no stack of blocks "
        f"(a ModuleList of one block class); use train.encoder=full or lora"
    )


def _configure_encoder(encoder: nn.Module, stage: Stage) -> None:
    mode = encoder_mode(stage.train.encoder)
    if mode == "lora":
        settings = lora_settings(stage.encoder_lora)
        if has_lora(encoder):  # added by an earlier stage (or a restored checkpoint)
            mark_adapters_trainable(encoder, settings)
        else:
            inject_lora(encoder, settings, "encoder_lora")
        return
    encoder.requires_grad_(mode == "full")
    if mode == "last_n":
        blocks = encoder_blocks(encoder)
        last_n = cast(int, stage.train.encoder_last_n)  # set with last_n: check_schedule
        for block in list(blocks)[-int(last_n) :]:
            block.requires_grad_(True)


def configure_trainable(model: MultimodalModel, stage: Stage) -> None:
    """Freeze / unfreeze the parts of ``model`` as the stage says; add LoRA once if asked.

    Encoders: ``frozen | lora | last_n | full`` (``train.encoder``, see
    :func:`mmbridge.model.precision.encoder_mode`); the LLM: ``frozen | lora | full``; LoRA settings
    from ``stages.<s>.lora`` / ``encoder_lora`` as ``peft.LoraConfig`` takes them
    (:mod:`mmbridge.model.lora`). Adapters added by an earlier stage stay and keep training under
    ``full``.
    """
    train = stage.train
    for branch in model.branches.values():
        _configure_encoder(branch.encoder, stage)
        branch.connector.requires_grad_(bool(train.connector))
    mode = train.llm
    if mode == "lora":
        model.llm.apply_lora(lora_settings(stage.lora))  # adds adapters once, then re-marks them
    else:  # full: the adapters of an earlier stage, if any, train with the rest
        model.llm.requires_grad_(mode == "full")
    # Connector layers that live inside the LLM (gated cross-attention) follow the connector.
    for branch in model.branches.values():
        branch.connector.requires_grad_(bool(train.connector))
    if model.prefix is not None:
        model.prefix.configure(stage)  # decides which of its own parts train in this stage
    model.ever_trained |= {n for n, p in model.named_parameters() if p.requires_grad}
