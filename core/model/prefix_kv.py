"""Reuse of the keys/values of the prefix that every sequence of a training batch shares.

The chat template opens each sequence the same way (SmolLM2's ChatML with its default system
prompt: ``<|im_start|>system\\nYou are a helpful AI assistant named SmolLM ...<|im_end|>\\n
<|im_start|>user\\n``, 20 tokens; without it ``<|im_start|>user\\n``, 3). Run once, its keys and
values serve the whole batch:

* **per step**, batch size 1, expanded over the batch, when something before the prefix's end
  trains (LoRA, a trained embedding): gradients flow through it and sum over the rows, as they
  would in the plain forward;
* **per stage**, when nothing that feeds it trains (frozen LLM, no media or learned tokens in
  it): kept as a constant, recomputed only when the LLM's weights, the device, the dtype or the
  autocast state change.

It is exact (the loss and gradients equal the plain forward's within float tolerance) and
switches itself off, with a reason (:attr:`PrefixPlan.reason`), where it cannot be: rows that
differ from the first token, a :class:`~mmbridge.contracts.prefix.SequencePrefix` (learned tokens at
the start), gated cross-attention layers attached to the LLM, left padding, dropout in training,
``llm.reuse_prefix_kv=false``, or an LLM that does not implement it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mmbridge.data.chat import IGNORE

if TYPE_CHECKING:
    from mmbridge.model import MultimodalModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixPlan:
    """What one batch's forward does with its shared prefix.

    Attributes:
        length: ``P``, the shared leading positions whose keys/values are reused (0: off).
        constant: Whether they are the stage's constant (computed without gradients, kept).
        reason: Why reuse is off, or what it does.
    """

    length: int
    constant: bool
    reason: str


def shared_prefix_length(batch: Mapping[str, Any]) -> int:
    """Leading positions that are the same text token in every row of a right-padded batch:
    real (attention mask 1), no media or learned-token slot, at least one real position left
    after them in every row, and no supervised label among positions ``1..P`` (the hidden
    states of the prefix itself are never computed, so none may be needed by the loss)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    same = (ids == ids[:1]).all(0) & mask.all(0)
    for slots in batch.get("slots", {}).values():
        same &= ~slots.any(0)
    n = int(same.long().cumprod(0).sum())
    n = min(n, int(mask.sum(1).min()) - 1)
    labels = batch.get("labels")
    if labels is not None:
        supervised = (labels != IGNORE).any(0).nonzero()
        if supervised.numel():
            n = min(n, int(supervised[0]) - 1)
    return max(n, 0)


def plan_prefix(model: MultimodalModel, batch: Mapping[str, Any]) -> PrefixPlan:
    """Decide for one batch whether and how its shared prefix's keys/values are reused."""
    llm = model.llm
    mode = getattr(llm, "reuse_prefix_kv", "auto")
    if mode is False:
        return PrefixPlan(0, False, "off: llm.reuse_prefix_kv=false")
    if model.prefix is not None:
        return PrefixPlan(
            0,
            False,
            f"off: the sequence prefix component ({type(model.prefix).__name__}) "
            f"writes per-sample tokens at the start",
        )
    xattn = [b.key or b.modality for b in model.branches.values() if not b.connector.in_sequence]
    if xattn:
        return PrefixPlan(
            0,
            False,
            f"off: gated cross-attention layers attached to the LLM "
            f"({', '.join(xattn)}) make every position per-sample",
        )
    blocker = llm.prefix_reuse_blocker()
    if blocker is not None:
        return PrefixPlan(0, False, f"off: {blocker}")
    mask = batch["attention_mask"]
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        return PrefixPlan(0, False, "off: left padding (a real token after a padded position)")
    n = shared_prefix_length(batch)
    if n == 0:
        return PrefixPlan(0, False, "off: the rows share no leading text token")
    constant = not any(p.requires_grad for p in llm.parameters())
    if not constant and mask.shape[0] == 1:
        return PrefixPlan(
            0, False, "off: a batch of one row with a trainable LLM (nothing to share)"
        )
    how = "kept for the stage (nothing before it trains)" if constant else "computed once per step"
    return PrefixPlan(n, constant, f"on: {n} shared tokens, {how}")


class PrefixStore:
    """The stage's constant prefix keys/values, keyed by everything that determines them."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._state: Any = None

    @staticmethod
    def key(llm: torch.nn.Module, prefix_ids: torch.Tensor, embeds: torch.Tensor) -> tuple:
        params = list(llm.parameters())
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's version counter;
        # a replaced tensor (.to(), .data =) has a new storage.
        weights = (sum(p._version for p in params), sum(p.data_ptr() for p in params))
        device = embeds.device.type
        autocast = (
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
        )
        return (tuple(prefix_ids.tolist()), str(embeds.device), embeds.dtype, autocast, weights)

    def get(self, llm: Any, prefix_ids: torch.Tensor, prefix_embeds: torch.Tensor) -> Any:
        """The keys/values of ``prefix_embeds [1, P, D]``, computed without gradients on a miss."""
        key = self.key(llm, prefix_ids, prefix_embeds)
        if key != self._key:
            with torch.no_grad():
                self._state = llm.prefix_states(prefix_embeds.detach())
            self._key = key
        return self._state

    def clear(self) -> None:
        self._key, self._state = None, None


_reported: set[str] = set()


def report(plan: PrefixPlan, mode: Any) -> None:
    """Log each distinct decision once per process (a warning when ``true`` was asked for)."""
    kind = f"on, constant={plan.constant}" if plan.length else plan.reason  # not per length
    if kind in _reported:
        return
    _reported.add(kind)
    level = logging.WARNING if mode is True and not plan.length else logging.INFO
    log.log(level, "llm.reuse_prefix_kv=%s: %s", str(mode).lower(), plan.reason)
