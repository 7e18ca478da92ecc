"""``linear``: LLaVA-1's projector (2304.08485), one linear map applied to every token."""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.contracts.connector import Converter
from mmbridge.contracts.llava_parts import LlavaProjector


class LinearConverter(Converter):
    """One ``nn.Linear(D_in, D_out)`` per token (LLaVA-1, 2304.08485 §4.1).

    ``M = N``; the output mask is the input mask.

    Args:
        in_dim: ``D_in`` (injected from the encoder).
        out_dim: ``D_out`` (injected from the LLM).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(self.in_dim, self.out_dim)

    def llava_parts(self) -> LlavaProjector:
        """Llava's ``multi_modal_projector`` with one linear layer
        (:mod:`mmbridge.contracts.llava_parts`)."""
        return LlavaProjector("linear", self.proj)

    def out_tokens(self, n_in: int) -> int:
        return n_in

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, D_in]`` -> ``[B, N, D_out]``; ``mask [B, N]`` passes through."""
        return self.proj(features), mask


COMPONENTS = {"connector": {"linear": LinearConverter}}
