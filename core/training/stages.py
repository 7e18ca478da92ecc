"""What trains in a stage: freezing, LoRA, and the checks on stage configs."""

from __future__ import annotations

from omegaconf import DictConfig

from mmbridge.errors import ConfigError
from mmbridge.model import MultimodalModel

LLM_MODES = ("frozen", "lora", "full")


def check_schedule(cfg: DictConfig) -> None:
    """Every scheduled stage exists and names valid training modes (errors name the keys)."""
    stages = cfg.get("stages") or {}
    errors = []
    if not cfg.get("schedule"):
        errors.append("schedule: empty; list the stages to run, e.g. schedule=[align]")
    for name in cfg.get("schedule") or []:
        if name not in stages:
            errors.append(f"schedule: stage '{name}' is not defined under stages; defined: {', '.join(stages) or '(none)'}")
            continue
        st = stages[name]
        mode = st.train.llm
        if mode not in LLM_MODES:
            errors.append(f"stages.{name}.train.llm: '{mode}' is not one of {', '.join(LLM_MODES)}")
        for key in ("max_steps", "batch_size"):
            if int(st.get(key, 0)) <= 0:
                errors.append(f"stages.{name}.{key}: must be a positive integer, got {st.get(key)}")
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
