"""``tome_mlp``: Token Merging (ToMe, Bolya et al., arXiv 2210.09461) in front of a GELU MLP.

A Converter that shortens the visual sequence before it reaches the LLM by *merging similar
tokens* instead of pooling fixed windows: a flat background of 40 patches becomes one or two
tokens while a small object keeps its own. LLaVA-PruMerge (arXiv 2403.15388) applies the same
idea to LLaVA's visual tokens.

One round of ToMe's bipartite soft matching (2210.09461 §3):

1. split the tokens alternately into sets A (even positions) and B (odd positions);
2. each A token finds its most similar B token (cosine similarity of the features);
3. the ``r`` A tokens with the most similar partners are merged into them, as a size-weighted
   average (ToMe tracks how many patches each token holds, so merging stays an average of
   patches, not of tokens).

Rounds repeat (at most half the tokens per round) until ``out_tokens(N)`` are left. Surviving
tokens keep the order of their first position, so the LLM still reads them left to right, top
to bottom. ToMe matches on attention keys inside a ViT; a connector only sees the encoder's
output, so the features themselves are matched (as PruMerge's merging step does with keys of
the last layer).

Each sample is merged on its real (masked-in) features only, so its output does not depend on
how much its batch was padded — the contract kit checks exactly this.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from mmbridge import Converter
from mmbridge.errors import ConfigError
from torch import nn


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, j]]`` for ``t [B, n]`` or ``[B, n, D]`` and ``idx [B, k]``."""
    if t.dim() == 3:
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    return t.gather(1, idx)


def bipartite_merge(
    x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the tokens of each sample down to ``target`` by repeated bipartite soft matching.

    All samples have ``n`` real tokens (the connector groups a padded batch by length).

    Args:
        x: ``[B, n, D]`` token features.
        size: ``[B, n]`` patches held by each token (ones at the start).
        pos: ``[B, n]`` first position of each token (for the output order).
        target: Tokens to keep, ``>= 1``.

    Returns:
        ``x [B, m, D]``, ``size [B, m]``, ``pos [B, m]`` with ``m = min(n, target)``, ordered by
        ``pos``. ``size`` keeps its total, and each output token is the size-weighted mean of
        the input tokens merged into it.
    """
    while x.shape[1] > target:
        n = x.shape[1]
        r = min(n - target, n // 2)  # A holds ceil(n / 2) tokens, so r of them can always merge
        a, b = x[:, 0::2], x[:, 1::2]
        size_a, size_b = size[:, 0::2], size[:, 1::2]
        pos_a, pos_b = pos[:, 0::2], pos[:, 1::2]
        # Matching is a discrete choice: no gradient flows through the similarities, only
        # through the averages below. fp32 even under autocast: bf16 cosines (3 digits) tie often.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)
            best_sim, best_b = sim.max(dim=-1)  # [B, |A|]: each A token's closest B token
            order = torch.argsort(best_sim, dim=-1, descending=True, stable=True)
        merged, kept = order[:, :r], order[:, r:]
        into = best_b.gather(1, merged)  # [B, r]
        size_m = _take(size_a, merged)
        weighted_b = (b * size_b.unsqueeze(-1)).scatter_add(
            1,
            into.unsqueeze(-1).expand(-1, -1, b.shape[-1]),
            _take(a, merged) * size_m.unsqueeze(-1),
        )
        size_b = size_b.scatter_add(1, into, size_m)
        b = weighted_b / size_b.unsqueeze(-1)
        x = torch.cat([_take(a, kept), b], dim=1)
        size = torch.cat([_take(size_a, kept), size_b], dim=1)
        pos = torch.cat([_take(pos_a, kept), pos_b], dim=1)
        order = torch.argsort(pos, dim=1)
        x, size, pos = _take(x, order), _take(size, order), _take(pos, order)
    return x, size, pos


class TokenMergeMLP(Converter):
    """ToMe token merging to ceil(keep * N) tokens, then a per-token GELU MLP (a Converter).

    ``[B, N, D_in] -> [B, M, D_out]`` with ``M = out_tokens(N) = max(min(min_tokens, N),
    ceil(keep * N))``. A padded sample with ``n`` real features gets ``out_tokens(n)`` real
    tokens first and masked-out slots after them.

    Args:
        in_dim: ``D_in`` (injected: the encoder's ``out_dim``).
        out_dim: ``D_out`` (injected: the LLM's hidden size).
        keep: Fraction of tokens kept, in ``(0, 1]`` (0.25: 64 patches -> 16 tokens).
        min_tokens: Never fewer tokens than this (unless the input is shorter).
        depth: Linear layers of the MLP (2 = LLaVA-1.5's projector, arXiv 2310.03744).
        hidden_dim: Width of the hidden layers (default: ``out_dim``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        keep: float = 0.25,
        min_tokens: int = 1,
        depth: int = 2,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if not 0.0 < float(keep) <= 1.0:
            raise ConfigError(f"connector.keep: must be in (0, 1], got {keep}")
        if int(min_tokens) < 1:
            raise ConfigError(f"connector.min_tokens: must be >= 1, got {min_tokens}")
        if int(depth) < 1:
            raise ConfigError(f"connector.depth: must be >= 1, got {depth}")
        if hidden_dim is not None and int(hidden_dim) <= 0:
            raise ConfigError(f"connector.hidden_dim: must be positive or null, got {hidden_dim}")
        self.keep = float(keep)
        self.min_tokens = int(min_tokens)
        hidden = int(hidden_dim or out_dim)
        widths = [self.in_dim] + [hidden] * (int(depth) - 1) + [self.out_dim]
        layers: list[nn.Module] = []
        for k in range(len(widths) - 1):
            if k:
                layers.append(nn.GELU())
            layers.append(nn.Linear(widths[k], widths[k + 1]))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def for_testing(cls, tmp_dir: Path, in_dim: int, out_dim: int) -> TokenMergeMLP:
        """Keep half the tokens; a 16-wide hidden layer."""
        return cls(in_dim, out_dim, keep=0.5, depth=2, hidden_dim=16)

    def out_tokens(self, n_in: int) -> int:
        if n_in < 1:
            raise ValueError(f"tome_mlp needs at least one input feature, got N={n_in}")
        # round() first: 0.7 * 90 is 62.99999999999999 in floats, and 0.7 of 90 tokens is 63
        return max(min(self.min_tokens, n_in), math.ceil(round(self.keep * n_in, 6)))

    def merge(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge each sample's real features (no projection).

        Args:
            features: ``[B, N, D_in]``.
            mask: ``[B, N]`` bool, True = real.

        Returns:
            ``merged [B, M, D_in]`` (zeros in padding slots), ``mask [B, M]`` and ``size [B, M]``
            (patches per token, 0 in padding slots), ``M = out_tokens(N)``.
        """
        b, n, d = features.shape
        m = self.out_tokens(n)
        merged = features.new_zeros(b, m, d)
        sizes = features.new_zeros(b, m)
        out_mask = torch.zeros(b, m, dtype=torch.bool, device=mask.device)
        counts = mask.sum(dim=1)
        # Samples with the same number of real features are merged together, in one batch.
        for count in counts.unique().tolist():
            if count == 0:
                continue
            rows = (counts == count).nonzero(as_tuple=True)[0]
            # positions of the real features, in order (a stable sort puts True = 0 first)
            idx = torch.argsort((~mask[rows]).to(torch.int8), dim=1, stable=True)[:, :count]
            x, size, _ = bipartite_merge(
                _take(features[rows], idx),
                torch.ones(idx.shape, dtype=features.dtype, device=features.device),
                idx,
                self.out_tokens(count),
            )
            k = x.shape[1]
            merged[rows, :k] = x
            sizes[rows, :k] = size
            out_mask[rows, :k] = True
        return merged, out_mask, sizes

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, D_in]`` + mask ``[B, N]`` -> ``[B, M, D_out]`` + mask ``[B, M]``."""
        merged, out_mask, _ = self.merge(features, mask.bool())
        return self.mlp(merged), out_mask
