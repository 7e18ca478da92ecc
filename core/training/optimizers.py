"""The stage optimizer chosen by ``stages.<name>.optimizer.name`` (torch.optim classes).

Every optimizer receives the same parameter groups (weight decay on matrices only, see
:meth:`mmbridge.training.module.BridgeModule.configure_optimizers`) and the stage's ``lr``;
each reads the further keys it understands (``betas`` for Adam/AdamW, ``momentum`` for SGD).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mmbridge.errors import ConfigError
from mmbridge.schema import OPTIMIZERS, Optimizer

Groups = list[dict[str, Any]]


def _adamw(groups: Groups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=float(cfg["lr"]), betas=tuple(cfg.get("betas", Optimizer().betas)))


def _adam(groups: Groups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    # Adam's weight_decay is an L2 term in the gradient (AdamW's is decoupled, 1711.05101)
    return torch.optim.Adam(groups, lr=float(cfg["lr"]), betas=tuple(cfg.get("betas", Optimizer().betas)))


def _sgd(groups: Groups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    momentum = float(cfg.get("momentum", Optimizer().momentum))
    return torch.optim.SGD(groups, lr=float(cfg["lr"]), momentum=momentum, nesterov=momentum > 0)


def _adafactor(groups: Groups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    # factored second moments (1804.04235): row and column statistics instead of one per weight
    return torch.optim.Adafactor(groups, lr=float(cfg["lr"]))


#: optimizer name -> ``(param groups, optimizer config) -> torch optimizer``.
BUILDERS: dict[str, Callable[[Groups, Mapping[str, Any]], torch.optim.Optimizer]] = {
    "adamw": _adamw, "adam": _adam, "sgd": _sgd, "adafactor": _adafactor}
assert set(BUILDERS) == set(OPTIMIZERS), "schema.OPTIMIZERS and optimizers.BUILDERS disagree"

#: optimizer state tensors per trained weight (full-size ones; Adafactor's are factored), for
#: the memory estimate of ``mmbridge plan``.
STATES_PER_WEIGHT = {"adamw": 2, "adam": 2, "sgd": 1, "adafactor": 0}


def make_optimizer(groups: Groups, cfg: Mapping[str, Any], key: str = "optimizer") -> torch.optim.Optimizer:
    """The optimizer ``cfg["name"]`` (default ``adamw``) over ``groups``.

    Raises:
        ConfigError: an unknown name, naming ``key`` and the valid names.
    """
    name = str(cfg.get("name") or Optimizer().name)
    if name not in BUILDERS:
        raise ConfigError(f"{key}.name: unknown optimizer '{name}'; valid: {', '.join(BUILDERS)}")
    return BUILDERS[name](groups, cfg)
