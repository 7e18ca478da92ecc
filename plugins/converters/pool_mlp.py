"""``pool_mlp``: masked strided average pooling, then LLaVA-1.5's GELU MLP per pooled token.

Pooling before projecting is the simplest token reducer of the Converter family (the "pooled
MLP" / abstractor variants compared in Honeybee, arXiv 2312.06742, and the 4x frame stacking of
audio LLMs such as Qwen-Audio, arXiv 2311.07919): ``M = ceil(N / stride)``. Only real (masked-in)
features are averaged, so a sample's tokens do not depend on how much its batch was padded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mmbridge.contracts.connector import Converter
from mmbridge.errors import ConfigError
from mmbridge.utils.nn_utils import masked_avg_pool


class PoolMLP(Converter):
    """Strided masked average pooling then a GELU MLP:
    ``[B, N, D_in] -> [B, ceil(N/stride), D_out]``.

    Args:
        in_dim: ``D_in`` (injected: the encoder's ``out_dim``).
        out_dim: ``D_out`` (injected: the LLM's hidden size).
        stride: Positions averaged into one token (4 turns Whisper's 50 Hz into 12.5 Hz).
        depth: Linear layers of the MLP (1 = a linear projection, 2 = LLaVA-1.5's projector).
        hidden_dim: Width of the hidden layers (default: ``out_dim``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        stride: int = 4,
        depth: int = 2,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if int(stride) < 1:
            raise ConfigError(f"connector.stride: must be >= 1, got {stride}")
        if int(depth) < 1:
            raise ConfigError(f"connector.depth: must be >= 1, got {depth}")
        self.stride = int(stride)
        hidden = int(hidden_dim or out_dim)
        widths = [self.in_dim] + [hidden] * (int(depth) - 1) + [self.out_dim]
        layers: list[nn.Module] = []
        for k in range(len(widths) - 1):
            if k:
                layers.append(nn.GELU())
            layers.append(nn.Linear(widths[k], widths[k + 1]))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def for_testing(cls, tmp_dir: Path, in_dim: int, out_dim: int) -> PoolMLP:
        """Stride 3, a 16-wide hidden layer."""
        return cls(in_dim, out_dim, stride=3, depth=2, hidden_dim=16)

    def out_tokens(self, n_in: int) -> int:
        return math.ceil(n_in / self.stride)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, N, D_in]``, ``mask [B, N]`` -> ``tokens [B, ceil(N/stride), D_out]``
        (zero at padded tokens) and their ``mask``."""
        pooled, out_mask = masked_avg_pool(features, mask, self.stride)
        tokens = self.mlp(pooled) * out_mask.unsqueeze(-1).to(pooled.dtype)
        return tokens, out_mask


COMPONENTS = {"connector": {"pool_mlp": PoolMLP}}
