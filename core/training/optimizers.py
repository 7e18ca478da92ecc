"""The stage optimizer chosen by ``stages.<name>.optimizer.name`` (torch.optim classes) and its
parameter groups.

Every optimizer receives the same parameter groups (:func:`param_groups`): one per trained
component (``connector`` -- with the sequence prefix --, ``encoder``, ``llm``) and per weight
decay, each with its own learning rate (``optimizer.connector_lr`` / ``encoder_lr`` /
``llm_lr``, as LLaVA's ``--mm_projector_lr``; null: the stage's ``lr``). Biases and the weights
of normalisation layers get no weight decay (as Hugging Face's Trainer and LLaVA: decaying a
LayerNorm gain towards 0 shrinks the whole activation). Each optimizer reads the further keys
it understands (``betas`` for Adam/AdamW, ``momentum`` for SGD).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmbridge.config.schema import OPTIMIZERS, Optimizer
from mmbridge.errors import ConfigError

Groups = list[dict[str, Any]]


def _no_decay(module: nn.Module, name: str, p: torch.Tensor) -> bool:
    """Biases, normalisation weights (LayerNorm, RMSNorm, GroupNorm, ... by class name) and any
    other vector or scalar (gates, scales): no weight decay."""
    return p.dim() < 2 or name == "bias" or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, cfg: Optimizer) -> Groups:
    """The trainable parameters of ``model`` (a :class:`~mmbridge.model.MultimodalModel`) in
    groups by component and weight decay, each named ``<component>`` or
    ``<component>.no_decay`` and carrying its ``lr`` and ``weight_decay``; empty groups are left
    out.

    Components: every branch's connector and the sequence prefix -> ``connector``; every
    branch's encoder -> ``encoder``; the rest (the LLM, LoRA adapters in it) -> ``llm``.

    Args:
        model: The model, frozen / unfrozen for the stage.
        cfg: The stage's ``optimizer`` section (``lr``, ``weight_decay``, ``<component>_lr``).
    """
    owner: dict[int, str] = {}
    for branch in getattr(model, "branches", {}).values():
        owner |= {id(p): "encoder" for p in branch.encoder.parameters()}
        owner |= {id(p): "connector" for p in branch.connector.parameters()}
    prefix = getattr(model, "prefix", None)
    if prefix is not None:
        owner |= {id(p): "connector" for p in prefix.parameters()}
    lr = float(cfg.lr)
    decay = float(cfg.weight_decay or 0.0)
    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            component = owner.get(id(p), "llm")
            own_lr = getattr(cfg, f"{component}_lr")
            key = component + (".no_decay" if _no_decay(module, name, p) else "")
            group = groups.setdefault(
                key,
                {
                    "name": key,
                    "params": [],
                    "lr": lr if own_lr is None else float(own_lr),
                    "weight_decay": 0.0 if key.endswith(".no_decay") else decay,
                },
            )
            group["params"].append(p)
    return list(groups.values())


def _betas(cfg: Optimizer) -> tuple[float, float]:
    beta1, beta2 = cfg.betas
    return float(beta1), float(beta2)


def _adamw(groups: Groups, cfg: Optimizer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=float(cfg.lr), betas=_betas(cfg))


def _adam(groups: Groups, cfg: Optimizer) -> torch.optim.Optimizer:
    # Adam's weight_decay is an L2 term in the gradient (AdamW's is decoupled, 1711.05101)
    return torch.optim.Adam(groups, lr=float(cfg.lr), betas=_betas(cfg))


def _sgd(groups: Groups, cfg: Optimizer) -> torch.optim.Optimizer:
    momentum = float(cfg.momentum)
    return torch.optim.SGD(groups, lr=float(cfg.lr), momentum=momentum, nesterov=momentum > 0)


def _adafactor(groups: Groups, cfg: Optimizer) -> torch.optim.Optimizer:
    # factored second moments (1804.04235): row and column statistics instead of one per weight
    return torch.optim.Adafactor(groups, lr=float(cfg.lr))


#: optimizer name -> ``(param groups, the stage's optimizer section) -> torch optimizer``.
BUILDERS: dict[str, Callable[[Groups, Optimizer], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
    "adafactor": _adafactor,
}
assert set(BUILDERS) == set(OPTIMIZERS), "schema.OPTIMIZERS and optimizers.BUILDERS disagree"

#: optimizer state tensors per trained weight (full-size ones; Adafactor's are factored), for
#: the memory estimate of ``mmbridge plan``.
STATES_PER_WEIGHT = {"adamw": 2, "adam": 2, "sgd": 1, "adafactor": 0}


def make_optimizer(groups: Groups, cfg: Optimizer, key: str = "optimizer") -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``groups``.

    Raises:
        ConfigError: an unknown name, naming ``key`` and the valid names.
    """
    name = str(cfg.name)
    if name not in BUILDERS:
        raise ConfigError(f"{key}.name: unknown optimizer '{name}'; valid: {', '.join(BUILDERS)}")
    return BUILDERS[name](groups, cfg)
