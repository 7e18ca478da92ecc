"""Contracts of the two connector families of 2311.07594: Converter and Perceiver.

Both map encoder features ``[B, N, D_in]`` (+ mask ``[B, N]``) to LLM-space tokens
``[B, M, D_out]`` (+ mask ``[B, M]``) with ``M = out_tokens(N)`` known before running.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from mmbridge.contracts.llm import LanguageModel


class Connector(nn.Module, ABC):
    """Bridges one encoder into the LLM.

    ``in_dim`` and ``out_dim`` are injected by the assembly from the encoder's ``out_dim`` and the
    LLM's ``hidden_size``; the other constructor arguments come from the ``connector`` config.

    Args:
        in_dim: ``D_in``, the encoder's feature width.
        out_dim: ``D_out``, the LLM's hidden size.
    """

    #: ``"converter"`` or ``"perceiver"`` (the survey's family).
    family: ClassVar[str] = ""
    #: False for connectors whose output is read by layers inside the LLM (Flamingo's gated
    #: cross-attention) instead of being placed into the token sequence. Such a connector's
    #: ``out_tokens(N)`` is 0 (no sequence slots) while ``forward`` returns its context tokens
    #: ``[B, K, D_out]``; the model hands them over with :meth:`set_context` before the LLM runs
    #: and calls :meth:`clear_context` after.
    in_sequence: ClassVar[bool] = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(
                f"connector dimensions must be positive, got in_dim={in_dim}, out_dim={out_dim}"
            )
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)

    @classmethod
    def for_testing(cls, tmp_dir: Path, in_dim: int, out_dim: int) -> Connector:
        """A small instance for the contract suite (:mod:`mmbridge.testing`). Override when the
        constructor needs more than the dimensions."""
        return cls(in_dim=in_dim, out_dim=out_dim)

    @abstractmethod
    def out_tokens(self, n_in: int) -> int:
        """``M``: how many tokens ``forward`` yields for ``N = n_in`` input features."""

    @abstractmethod
    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map features ``[B, N, D_in]`` with ``mask [B, N]`` to ``tokens [B, M, D_out]`` and
        ``mask [B, M]`` (bool, True = real token)."""

    @property
    def context_tokens(self) -> int:
        """Tokens per media item that a connector which is not ``in_sequence`` hands to the
        LLM's inner layers (:meth:`set_context`); 0 for one that places its tokens in the
        sequence (count those with :meth:`out_tokens`)."""
        return 0

    def attach(self, llm: LanguageModel) -> None:  # noqa: B027 - optional hook
        """Add layers inside the LLM (Perceiver family, e.g. gated cross-attention). Default:
        none."""

    def set_context(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Hand this batch's tokens to the layers added by :meth:`attach` (only when
        ``in_sequence`` is False)."""
        raise NotImplementedError(f"{type(self).__name__} places its tokens in the sequence")

    def clear_context(self) -> None:  # noqa: B027 - optional hook
        """Forget the context set by :meth:`set_context`."""


class Converter(Connector, ABC):
    """Token-wise projection into the LLM embedding space (LLaVA's linear / MLP projector)."""

    family = "converter"


class Perceiver(Connector, ABC):
    """Learned queries that perceive the features with a fixed token budget (Q-Former,
    Perceiver Resampler), optionally with layers inside the LLM via :meth:`attach`."""

    family = "perceiver"
