"""Contract of a sequence prefix: learned tokens placed at the start of the LLM's input,
computed per sample (AlignGPT's alignment-level indicator is one, arXiv 2405.14129).

One concept, named per layer: this contract (registry kind ``prefix``); the config node that
chooses one, ``alignment`` (group ``conf/alignment/``; ``null`` = no prefix), with a stage's
settings for it under ``stages.<name>.prefix``; the built-in ``aligngpt`` in
:mod:`mmbridge.plugins.alignment`. ``docs/concepts/index.md`` says the same.

The collator reserves ``n_tokens`` slots at the start of every sequence (after a BOS token
when the template starts with one); the model fills them with ``forward``'s output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from mmbridge.config.schema import Stage

#: Slot name of the prefix in ``batch["slots"]``.
PREFIX_SLOT = "_prefix"


class SequencePrefix(nn.Module, ABC):
    """Learned tokens at the start of the sequence.

    Args:
        dim: ``D_llm``, injected by the assembly.

    ``meta_keys`` lists the ``Sample.meta`` keys the collator passes along as ``batch["meta"]``
    (integer tensors ``[B]``, ``-1`` where a sample lacks the key).
    """

    meta_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        #: What the last forward in eval mode decided, one JSON-able dict per sample (e.g.
        #: AlignGPT's gate weights), or None; evaluation copies it into predictions.jsonl.
        self.last_info: list[dict[str, Any]] | None = None

    @property
    @abstractmethod
    def n_tokens(self) -> int:
        """How many positions the prefix takes."""

    @abstractmethod
    def forward(
        self, embeds: torch.Tensor, prompt_mask: torch.Tensor, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        """The prefix tokens ``[B, n_tokens, D]``.

        Args:
            embeds: The input embeddings ``[B, T, D]`` with media tokens in place (prefix slots
                still hold pad embeddings).
            prompt_mask: ``[B, T]`` True at prompt positions: attended, before the first
                supervised answer token, not a prefix slot. Answers are never visible here, in
                training as at inference.
            batch: The batch (``batch["meta"]`` holds the ``meta_keys`` values).
        """

    def configure(self, stage: Stage) -> None:  # noqa: B027 - optional hook
        """Adapt to a stage (e.g. which parts train, which mode runs); ``stage.prefix`` (a
        mapping, or ``None``) holds the stage's settings for it, if any. Called before the
        stage's optimiser is built."""
