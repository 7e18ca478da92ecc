"""``init_from=RUN_DIR[:STAGE]``: a new run starts from another run's trained weights.

LLaVA's two stages are two runs (they read different files); the second starts from the
first's projector (LLaVA's ``--pretrain_mm_mlp_adapter``). ``init_from`` names the earlier run's
directory and, optionally, the stage whose ``checkpoints/<stage>_final`` to read (default: the
run's ``checkpoints/final``, everything it trained); a checkpoint directory works as well.

The weights are copied into the model before the first stage. They join the weights this run
saves (``model.ever_trained``), since the config's pretrained weights no longer describe them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mmbridge.config.schema import Root, Stage
from mmbridge.config.sections import section, stages_of
from mmbridge.contracts.connector import Connector
from mmbridge.contracts.prefix import SequencePrefix
from mmbridge.errors import CheckpointError, ConfigError
from mmbridge.model import MultimodalModel
from mmbridge.model.lora import has_lora, inject_lora, lora_settings
from mmbridge.model.precision import encoder_mode
from mmbridge.registry import Registry
from mmbridge.training.checkpoint import WEIGHTS, read_checkpoint
from mmbridge.training.stages import frozen_encoders

log = logging.getLogger(__name__)


def init_checkpoint(value: str) -> Path:
    """The checkpoint directory ``init_from`` names.

    ``RUN_DIR`` -> ``RUN_DIR/checkpoints/final``; ``RUN_DIR:STAGE`` ->
    ``RUN_DIR/checkpoints/STAGE_final``; a directory holding ``weights.safetensors`` -> itself.

    Raises:
        ConfigError: nothing there, naming the stages the run did finish.
    """
    raw = Path(value).expanduser()
    if (raw / WEIGHTS).is_file():
        return raw
    run, stage = raw, None
    head, sep, tail = value.rpartition(":")
    if sep and head and "/" not in tail and not raw.exists():
        run, stage = Path(head).expanduser(), tail
    ckpts = run / "checkpoints"
    path = ckpts / (f"{stage}_final" if stage else "final")
    if (path / WEIGHTS).is_file():
        return path
    done = sorted(
        p.name[: -len("_final")] for p in ckpts.glob("*_final") if (p / WEIGHTS).is_file()
    )
    if not run.is_dir():
        raise ConfigError(f"init_from={value}: run directory '{run}' does not exist")
    raise ConfigError(
        f"init_from={value}: no {path.relative_to(run)}/{WEIGHTS} in '{run}'; "
        f"finished stages there: {', '.join(done) or '(none)'} "
        f"(use init_from=RUN_DIR:STAGE, or RUN_DIR for checkpoints/final)"
    )


def _add_lora_like_source(
    model: MultimodalModel, source: Mapping[str, Stage], stages: list[str]
) -> None:
    """Inject the LoRA adapters the source run trained, with its settings, so their tensors
    have somewhere to go (the first of its stages that trained LoRA)."""
    for name in stages:
        stage = source.get(name)
        if stage is not None and stage.train.llm == "lora":
            model.llm.apply_lora(lora_settings(stage.lora))
            return
    raise CheckpointError(
        "init_from: the checkpoint holds LoRA adapters but none of its stages "
        f"({', '.join(stages)}) trained LoRA"
    )


def _add_encoder_lora_like_source(
    model: MultimodalModel, source: Mapping[str, Stage], stages: list[str]
) -> None:
    """The same for the encoders' adapters (``train.encoder: lora`` in a source stage)."""
    for name in stages:
        stage = source.get(name)
        if stage is not None and encoder_mode(stage.train.encoder) == "lora":
            for branch in model.branches.values():
                if not has_lora(branch.encoder):
                    inject_lora(branch.encoder, lora_settings(stage.encoder_lora), "encoder_lora")
            return
    raise CheckpointError(
        "init_from: the checkpoint holds encoder LoRA adapters but none of its "
        f"stages ({', '.join(stages)}) trained the encoder with LoRA"
    )


def load_init_weights(
    model: MultimodalModel,
    root: Root,
    scheduled: Sequence[Stage],
    registry: Registry | None = None,
) -> list[str]:
    """Copy the weights of ``root.init_from`` into ``model``; returns the names loaded (empty
    when ``init_from`` is not set).

    ``root`` is the run's top-level section (``init_from``, ``cache_features``), ``scheduled``
    its scheduled stages (:attr:`mmbridge.runtime.config.RunConfig.scheduled`); the source
    run's stages are read from its checkpoint's config.

    Every tensor of the checkpoint must be a parameter of ``model`` with the same shape, and a
    connector (or sequence prefix) it holds must be whole; the rest of the model may differ (a
    new run may train more than the source did). LoRA adapters of the source are injected
    first, with its settings.

    Raises:
        ConfigError: ``init_from`` names no checkpoint, or it carries trained encoder weights
            while this run reads cached features of the pretrained encoder.
        CheckpointError: tensors the model does not have, of another shape, or part of a
            connector only (nothing is loaded then).
    """
    value = root.init_from
    if not value:
        return []
    path = init_checkpoint(str(value))
    source_cfg, weights, meta = read_checkpoint(path, registry)
    source = stages_of(source_cfg)  # the source run's stages, typed
    stages = json.loads(meta.get("stages", "[]"))
    if (
        any("lora_" in k and k.startswith("llm.") for k in weights)
        and model.llm.lora_config is None
    ):
        _add_lora_like_source(model, source, stages)
    if any("lora_" in k and ".encoder." in k for k in weights) and not all(
        has_lora(b.encoder) for b in model.branches.values()
    ):
        _add_encoder_lora_like_source(model, source, stages)
    own = dict(model.named_parameters())
    unknown = sorted(k for k in weights if k not in own)
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and own[k].shape != v.shape
    )
    # a connector or prefix is small and whole: some of its tensors without the others means
    # another architecture (connector.depth=3 over a depth-2 checkpoint), not a choice
    partial = []
    wholes = [
        f"{n}." for n, m in model.named_modules() if isinstance(m, Connector | SequencePrefix)
    ]
    for whole in [w for w in wholes if not any(w != o and w.startswith(o) for o in wholes)]:
        if any(k.startswith(whole) for k in weights):
            partial += sorted(k for k in own if k.startswith(whole) and k not in weights)
    if unknown or shapes or partial:
        problems = (
            [f"{len(unknown)} tensor(s) this model does not have: {', '.join(unknown[:6])}"]
            if unknown
            else []
        )
        problems += [f"{len(shapes)} shape mismatch(es): {', '.join(shapes[:6])}"] if shapes else []
        problems += (
            [
                f"{len(partial)} tensor(s) of a loaded connector/prefix missing from the "
                f"checkpoint: {', '.join(partial[:6])}"
            ]
            if partial
            else []
        )
        raise CheckpointError(
            f"init_from={value}: '{path}' does not fit this model (another "
            f"encoder, connector or LLM than the source run's?):\n  " + "\n  ".join(problems)
        )
    encoder_keys = [k for k in weights if k.startswith("branches.") and ".encoder." in k]
    if encoder_keys and root.cache_features and frozen_encoders(scheduled):
        raise ConfigError(
            f"init_from={value}: the checkpoint holds trained encoder weights "
            f"({encoder_keys[0]}, ...), but cache_features=true would read the "
            f"pretrained encoder's features; set cache_features=false"
        )
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v.to(own[k].dtype))
    model.ever_trained |= set(weights)
    log.info(
        "init_from: %d tensors from %s (stages %s of run config %s)",
        len(weights),
        path,
        ", ".join(stages) or "-",
        section(source_cfg, Root).run_name,
    )
    return sorted(weights)
