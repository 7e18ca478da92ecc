"""What trains in a stage: freezing, LoRA, and the checks on stage configs."""

from __future__ import annotations

from omegaconf import DictConfig

from mmbridge.config import to_container
from mmbridge.errors import ConfigError
from mmbridge.model import MultimodalModel
from mmbridge.schema import LLM_MODES, Stage
from mmbridge.validation import check_section, schedule_errors

__all__ = ["LLM_MODES", "check_schedule", "configure_trainable", "frozen_encoders"]


def check_schedule(cfg: DictConfig) -> None:
    """Every scheduled stage exists and its settings fit the schema (modes, steps, batch size,
    optimizer); errors name the keys. Part of :func:`mmbridge.validation.validate_config`,
    which checks the rest of the config as well."""
    data = to_container(cfg)
    errors = schedule_errors(data)
    stages = s if isinstance(s := data.get("stages"), dict) else {}
    for name in data.get("schedule") or []:
        if name in stages:
            errors += check_section(f"stages.{name}", stages[name], Stage)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def frozen_encoders(cfg: DictConfig) -> bool:
    """Whether no scheduled stage trains the encoders (then their features can be cached)."""
    return not any(bool(cfg.stages[s].train.encoder) for s in cfg.schedule)


def configure_trainable(model: MultimodalModel, stage: DictConfig) -> None:
    """Freeze / unfreeze the parts of ``model`` as the stage says; add LoRA once if asked."""
    train = stage.train
    for branch in model.branches.values():
        branch.encoder.requires_grad_(bool(train.encoder))
        branch.connector.requires_grad_(bool(train.connector))
    mode = train.llm
    if mode == "lora":
        if not getattr(model.llm, "lora_applied", False):
            lora = stage.lora
            model.llm.apply_lora(r=int(lora.r), alpha=int(lora.alpha), dropout=float(lora.dropout),
                                 target_modules=list(lora.target_modules))
            model.llm.lora_applied = True
        for n, p in model.llm.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        model.llm.requires_grad_(mode == "full")
        if mode == "full" and getattr(model.llm, "lora_applied", False):
            for n, p in model.llm.named_parameters():
                p.requires_grad_(True if "lora_" in n else p.requires_grad)
    # Connector layers that live inside the LLM (gated cross-attention) follow the connector.
    for branch in model.branches.values():
        branch.connector.requires_grad_(bool(train.connector))
    if model.prefix is not None:
        model.prefix.configure(stage)  # decides which of its own parts train in this stage
    model.ever_trained |= {n for n, p in model.named_parameters() if p.requires_grad}
