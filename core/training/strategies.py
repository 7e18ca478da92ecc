"""The Lightning strategy object for ``trainer.strategy``, built with the model in hand.

``trainer.strategy: fsdp`` as a bare string gives Lightning's FSDP without a wrap policy: the
whole model is one flat parameter, gathered in full on every GPU for every forward pass, which
defeats sharding. Here it becomes an :class:`~lightning.pytorch.strategies.FSDPStrategy` whose
auto-wrap policy makes every transformer block (the LLM's decoder layer class, and the vision
tower's block class when it has one) its own FSDP unit, so one block at a time is gathered
(FSDP, 2304.11277 §3.2). Every other strategy value is passed through as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from mmbridge.config.sections import trainer_arg
from mmbridge.errors import ConfigError
from mmbridge.model import MultimodalModel
from mmbridge.model.precision import fsdp_mixed_precision


def _is_block_stack(m: nn.Module) -> TypeGuard[nn.ModuleList | nn.Sequential]:
    """A ``ModuleList`` / ``Sequential`` of composite modules of one class (transformer blocks,
    not the layers of an MLP)."""
    return (
        isinstance(m, nn.ModuleList | nn.Sequential)
        and len(m) > 0
        and len({type(b) for b in m}) == 1
        and len(list(m[0].children())) >= 2
    )


def block_classes(model: MultimodalModel) -> set[type[nn.Module]]:
    """The classes of the repeated blocks: the LLM's decoder layer and, for encoders that have
    a stack of blocks (HF vision towers, timm ViTs), the encoder's block."""
    classes = {type(model.llm.decoder_layers[0])}
    for branch in model.branches.values():
        blocks = next((m for m in branch.encoder.modules() if _is_block_stack(m)), None)
        if blocks is not None:
            classes.add(type(blocks[0]))
    return classes


#: Strategies that shard the model's parameters in place for the whole ``fit``: outside the
#: strategy's own forward pass a process holds only its shards of them.
SHARDING_PREFIXES = ("fsdp", "deepspeed_stage_3")


def shards_parameters(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether ``trainer.strategy`` shards the parameters (FSDP, DeepSpeed ZeRO-3).

    Under such a strategy a run skips what would call into the model outside Lightning's
    forward pass, where the shards are not gathered: the generated validation questions
    (the validation loss stays) and the separate opening validation, whose own Trainer would
    wrap the blocks before ``fit`` does. The final evaluation runs on rank 0 with an unsharded
    copy (:mod:`mmbridge.training.distributed`)."""
    strategy = trainer_arg(trainer_cfg, "strategy")
    name = getattr(strategy, "strategy_name", strategy)
    return isinstance(name, str) and name.startswith(SHARDING_PREFIXES)


def make_strategy(
    trainer_cfg: Mapping[str, Any], model: MultimodalModel, precision: str | None = None
) -> Any:
    """``trainer.strategy`` as ``L.Trainer(strategy=...)`` takes it.

    ``fsdp``: full sharding (parameters, gradients and optimizer state: ZeRO-3), one FSDP unit
    per block (:func:`block_classes`), ``use_orig_params`` (frozen and trained parameters share
    units: the frozen encoder / LLM beside LoRA adapters or a trained connector), and a full
    state dict gathered on rank 0 when Lightning saves; under ``bf16-mixed`` the fp32 weights are
    cast to bf16 for compute and gradients reduced in fp32
    (:func:`mmbridge.model.precision.fsdp_mixed_precision`). Other values are returned unchanged.

    Args:
        trainer_cfg: The ``trainer`` config node (its ``strategy``).
        model: The assembled model (the block classes are read from it).
        precision: The run's decided Lightning precision (FSDP's mixed-precision policy).
    """
    strategy = trainer_arg(trainer_cfg, "strategy")
    if strategy != "fsdp":
        return strategy
    try:
        classes = block_classes(model)
    except AttributeError as exc:
        raise ConfigError(
            f"trainer.strategy=fsdp: no decoder blocks to wrap ({exc}); use trainer.strategy=ddp"
        ) from exc
    return FSDPStrategy(
        auto_wrap_policy=classes,
        sharding_strategy="FULL_SHARD",
        use_orig_params=True,
        state_dict_type="full",
        limit_all_gathers=True,
        cpu_offload=False,
        mixed_precision=fsdp_mixed_precision(str(precision)),
    )
