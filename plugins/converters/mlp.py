"""``mlp``: LLaVA-1.5's projector (2310.03744), a GELU MLP applied to every token."""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.contracts.connector import Converter
from mmbridge.contracts.llava_parts import LlavaProjector, LlavaUnrepresentable
from mmbridge.errors import ConfigError


class MLPConverter(Converter):
    """A per-token MLP ``Linear -> (GELU -> Linear) x (depth - 1)``; ``depth=2`` is LLaVA-1.5's
    ``mlp2x_gelu`` projector (2310.03744 §3.2), ``depth=1`` equals ``linear``.

    ``M = N``; the output mask is the input mask.

    Args:
        in_dim: ``D_in`` (injected from the encoder).
        out_dim: ``D_out`` (injected from the LLM).
        depth: Number of linear layers (>= 1).
        hidden_dim: Width of the hidden layers; ``None`` = ``out_dim`` (as in LLaVA-1.5).
    """

    def __init__(
        self, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int | None = None
    ) -> None:
        super().__init__(in_dim, out_dim)
        if depth < 1:
            raise ConfigError(f"connector.depth: must be >= 1, got {depth}")
        if hidden_dim is not None and hidden_dim <= 0:
            raise ConfigError(f"connector.hidden_dim: must be positive or null, got {hidden_dim}")
        self.depth = int(depth)
        self.hidden_dim = int(hidden_dim or out_dim)
        widths = [self.in_dim] + [self.hidden_dim] * (depth - 1) + [self.out_dim]
        layers: list[nn.Module] = []
        for k in range(depth):
            if k:
                layers.append(nn.GELU())
            layers.append(nn.Linear(widths[k], widths[k + 1]))
        self.net = nn.Sequential(*layers)

    def llava_parts(self) -> LlavaProjector:
        """Llava's ``multi_modal_projector`` (:mod:`mmbridge.contracts.llava_parts`): one linear
        layer, or LLaVA-1.5's two-layer GELU MLP as wide as the LLM."""
        if self.depth == 1:
            return LlavaProjector("linear", self.net[0])
        if self.depth == 2 and self.hidden_dim == self.out_dim:
            return LlavaProjector("gelu", self.net[0], self.net[2])
        raise LlavaUnrepresentable(
            "is not Llava's projector (linear, or a 2-layer GELU MLP as wide as the LLM)",
            detail=f"depth={self.depth}, hidden_dim={self.hidden_dim}",
        )

    def out_tokens(self, n_in: int) -> int:
        return n_in

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, D_in]`` -> ``[B, N, D_out]``; ``mask [B, N]`` passes through."""
        return self.net(features), mask


COMPONENTS = {"connector": {"mlp": MLPConverter}}
