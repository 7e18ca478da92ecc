"""``window_qformer``: SALMONN's window-level Q-Former (Tang et al., arXiv 2310.13289, §3.1).

The feature sequence is cut into windows of ``L`` positions (0.33 s in SALMONN: L = 17 at
Whisper's 50 Hz) and one small Q-Former with ``Q`` learned queries, shared by all windows,
reads each window. The token budget thus grows with duration, ``M = ceil(N / L) * Q``, unlike
BLIP-2's fixed-length Q-Former, which suits speech whose content grows with its length.
Windows holding only padding produce masked-out (zero) tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.contracts.connector import Perceiver
from mmbridge.errors import ConfigError


class _QFormerLayer(nn.Module):
    """Pre-LN Q-Former layer: self-attention among queries, cross-attention to the window's
    features (padding masked out), feed-forward."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.self_ln = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_ln = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn_ln = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor) -> torch.Tensor:
        """``q [W, Q, H]``, ``kv [W, L, H]``, ``kv_pad [W, L]`` (True = padding) ->
        ``[W, Q, H]``."""
        h = self.self_ln(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.cross_ln(q)
        q = q + self.cross_attn(h, kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        return q + self.ffn(self.ffn_ln(q))


class WindowQFormer(Perceiver):
    """Window-level Q-Former: ``[B, N, D_in] -> [B, ceil(N / L) * Q, D_out]``, ``L`` =
    ``ceil(window_s * frames_per_second)``.

    Args:
        in_dim: ``D_in`` (injected: the encoder's ``out_dim``).
        out_dim: ``D_out`` (injected: the LLM's hidden size).
        num_queries: ``Q``, learned queries per window (SALMONN: 1).
        window_s: Window length in seconds (SALMONN: 0.33).
        frames_per_second: Feature rate of the encoder (Whisper: ``50 / pool``).
        hidden_dim: Q-Former width.
        depth: Q-Former layers.
        num_heads: Attention heads (must divide ``hidden_dim``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 1,
        window_s: float = 0.33,
        frames_per_second: float = 50.0,
        hidden_dim: int = 256,
        depth: int = 2,
        num_heads: int = 4,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if int(num_queries) < 1:
            raise ConfigError(f"connector.num_queries: must be >= 1, got {num_queries}")
        if window_s <= 0 or frames_per_second <= 0:
            raise ConfigError(
                f"connector.window_s and connector.frames_per_second must be "
                f"positive, got {window_s} and {frames_per_second}"
            )
        if int(hidden_dim) % int(num_heads):
            raise ConfigError(
                f"connector.num_heads ({num_heads}) must divide connector.hidden_dim ({hidden_dim})"
            )
        self.num_queries = int(num_queries)
        # 1e-6: 0.33 s * 50 Hz = 16.5 -> 17 positions (SALMONN's L), but 0.2 * 50 stays 10
        self.window_len = max(1, math.ceil(window_s * frames_per_second - 1e-6))
        hidden = int(hidden_dim)
        self.in_norm = nn.LayerNorm(self.in_dim)
        self.in_proj = nn.Linear(self.in_dim, hidden)
        # where a position sits inside its window: the windows are encoded independently
        self.window_pos = nn.Parameter(torch.randn(self.window_len, hidden) * 0.02)
        self.queries = nn.Parameter(torch.randn(self.num_queries, hidden) * 0.02)
        self.layers = nn.ModuleList(
            _QFormerLayer(hidden, int(num_heads)) for _ in range(int(depth))
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, self.out_dim)

    @classmethod
    def for_testing(cls, tmp_dir: Path, in_dim: int, out_dim: int) -> WindowQFormer:
        """Two queries per 5-position window, one 16-wide layer."""
        return cls(
            in_dim, out_dim, num_queries=2, window_s=0.1, hidden_dim=16, depth=1, num_heads=2
        )

    def out_tokens(self, n_in: int) -> int:
        return math.ceil(n_in / self.window_len) * self.num_queries

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, N, D_in]``, ``mask [B, N]`` -> ``tokens [B, ceil(N/L)*Q, D_out]``
        and ``mask [B, ceil(N/L)*Q]`` (False, and zero tokens, for windows of only padding)."""
        b, n, _ = features.shape
        L, q = self.window_len, self.num_queries
        w = math.ceil(n / L)
        pad = w * L - n
        x = self.in_proj(self.in_norm(features))
        x = F.pad(x, (0, 0, 0, pad)).view(b * w, L, -1) + self.window_pos
        real = F.pad(mask.bool(), (0, pad)).view(b * w, L)
        win_real = real.any(-1)  # [B*W]
        # An all-padding window would give a softmax over no key (NaN); let it attend to its
        # (padding) keys and drop its tokens below.
        kv_pad = ~(real | ~win_real.unsqueeze(-1))
        h = self.queries.unsqueeze(0).expand(b * w, q, -1)
        for layer in self.layers:
            h = layer(h, x, kv_pad)
        tokens = self.out_proj(self.out_norm(h))  # [B*W, Q, D_out]
        out_mask = win_real.unsqueeze(-1).expand(b * w, q)
        tokens = tokens * out_mask.unsqueeze(-1).to(tokens.dtype)
        return tokens.reshape(b, w * q, -1), out_mask.reshape(b, w * q)


COMPONENTS = {"connector": {"window_qformer": WindowQFormer}}
