"""Locality-preserving token reduction: Honeybee's C-Abstractor (Cha et al., arXiv 2312.06742,
§3.2).

Residual convolution blocks mix each feature with its neighbours, an adaptive average pool
reduces the ``N`` features to at most ``num_tokens`` (keeping the spatial / temporal layout),
and a 2-layer MLP maps them to the LLM width.

Layouts: image features on a square grid (``N = s * s``) are pooled in 2-D to a
``sqrt(num_tokens) x sqrt(num_tokens)`` grid; other sequences (audio frames) are pooled in 1-D.
The pool is a *masked* average: padded features never enter a bin.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.contracts.connector import Converter
from mmbridge.errors import ConfigError

LAYOUTS = ("auto", "grid", "sequence")


def _isqrt_exact(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


def _bins(
    pos: torch.Tensor, length: torch.Tensor, bins: torch.Tensor, max_bins: int
) -> torch.Tensor:
    """Adaptive-pool membership ``[B, max_bins, P]`` of positions ``pos [B, P]`` (ranks among the
    ``length [B]`` real ones): bin ``i < bins`` holds ``floor(i*L/bins) <= r < ceil((i+1)*L/bins)``,
    PyTorch's adaptive-pool bins; bins ``>= bins [B]`` are empty."""
    i = torch.arange(max_bins, device=pos.device)
    length, bins = length[:, None], bins.clamp(min=1)[:, None]
    start = torch.div(i * length, bins, rounding_mode="floor")
    end = -torch.div(-(i + 1) * length, bins, rounding_mode="floor")
    member = (pos[:, None, :] >= start[..., None]) & (pos[:, None, :] < end[..., None])
    return member & (i < bins)[..., None]


def masked_adaptive_pool(
    x: torch.Tensor, mask: torch.Tensor, num_tokens: int, grid: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ``x [B, N, D]`` over adaptive-pool bins, ignoring positions where ``mask [B, N]``
    is False. Returns ``pooled [B, M, D]`` and ``mask [B, M]`` (False for an empty bin).

    ``grid=True``: ``N`` and ``num_tokens`` are squares; the ``s x s`` grid is pooled to
    ``m x m`` with ``m = min(sqrt(num_tokens), s)`` (equal to ``F.adaptive_avg_pool2d`` under a
    full mask). ``grid=False``: ``M = min(num_tokens, N)``; the real positions of each sample,
    in order, are pooled to ``min(num_tokens, L)`` bins of its own length ``L``, so the result
    does not depend on the padding that follows; the remaining bins are masked out.
    """
    b, n, _ = x.shape
    mask = mask.bool()
    if grid:
        s, k = _isqrt_exact(n), _isqrt_exact(num_tokens)
        if s is None or k is None:
            raise ValueError(
                f"grid pooling needs square N and num_tokens, got {n} and {num_tokens}"
            )
        m = min(k, s)
        one = torch.full((1,), s, device=x.device)
        side = _bins(torch.arange(s, device=x.device)[None], one, one * 0 + m, m)[0]  # [m, s]
        member = (side[:, None, :, None] & side[None, :, None, :]).reshape(1, m * m, n)
    else:
        m = min(num_tokens, n)
        length = mask.sum(dim=1)
        rank = mask.cumsum(dim=1) - 1  # index of each real position among the real ones
        member = _bins(rank, length, torch.clamp(length, max=m), m)
    weights = (member & mask[:, None, :]).to(x.dtype)  # [B, M, N]
    count = weights.sum(dim=-1)
    pooled = weights @ x / count.clamp(min=1)[..., None]
    return pooled, count > 0


class ResBlock(nn.Module):
    """Bottleneck residual block with a 3x3 convolution, the only layer that mixes neighbours.

    Padded positions are zeroed right before the convolution, so a real feature sees the same
    neighbourhood whether it is alone or padded in a batch (the conv's own padding is zero too).
    A sequence is run as a ``1 x N`` image: only the kernel's middle row meets real values.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        inner = max(1, dim // 4)
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, inner)
        self.conv = nn.Conv2d(inner, inner, kernel_size=3, padding=1)
        self.up = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """``x [B, N, C]``, ``mask [B, N]``, ``shape = (H, W)`` with ``H * W = N`` ->
        ``[B, N, C]``."""
        b, n, _ = x.shape
        h = F.gelu(self.down(self.norm(x))).masked_fill(~mask[..., None], 0.0)
        h = self.conv(h.transpose(1, 2).reshape(b, -1, *shape)).reshape(b, -1, n).transpose(1, 2)
        return x + self.up(F.gelu(h))


class Abstractor(Converter):
    """C-Abstractor-style converter (Honeybee, 2312.06742): conv blocks, locality-preserving
    masked adaptive pooling to ``M = min(num_tokens, N)`` tokens, 2-layer MLP to ``D_out``.

    ``features [B, N, D_in]`` -> ``tokens [B, M, D_out]``. Output mask: False for bins that hold
    no real feature (a short padded sequence fills fewer bins), True otherwise.

    Args:
        in_dim: ``D_in`` (injected).
        out_dim: ``D_out`` (injected).
        num_tokens: token budget; a square (16 = 4x4) for grid pooling.
        hidden_dim: width of the conv blocks (default: ``in_dim``).
        depth: residual conv blocks before pooling (0: pooling only).
        layout: ``auto`` (grid when ``N`` and ``num_tokens`` are squares, otherwise sequence),
            ``grid`` (image patches), or ``sequence`` (audio frames; set it for audio whose
            frame count may be a square).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_tokens: int = 16,
        hidden_dim: int | None = None,
        depth: int = 1,
        layout: str = "auto",
    ) -> None:
        super().__init__(in_dim, out_dim)
        if num_tokens < 1:
            raise ConfigError(f"connector.num_tokens: must be >= 1, got {num_tokens}")
        if depth < 0:
            raise ConfigError(f"connector.depth: must be >= 0, got {depth}")
        if layout not in LAYOUTS:
            raise ConfigError(f"connector.layout: '{layout}' is not one of {', '.join(LAYOUTS)}")
        if layout == "grid" and _isqrt_exact(num_tokens) is None:
            raise ConfigError(
                f"connector.num_tokens: {num_tokens} is not a square, which "
                f"connector.layout=grid needs (e.g. 16 = 4x4)"
            )
        hidden = hidden_dim or in_dim
        self.num_tokens = int(num_tokens)
        self.layout = layout
        self.proj_in = nn.Linear(in_dim, hidden) if hidden != in_dim else nn.Identity()
        self.blocks = nn.ModuleList(ResBlock(hidden) for _ in range(depth))
        self.mlp = nn.Sequential(nn.Linear(hidden, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    @classmethod
    def for_testing(cls, tmp_dir: Path, in_dim: int, out_dim: int) -> Abstractor:
        return cls(in_dim, out_dim, num_tokens=4, hidden_dim=8, depth=1)

    def _grid(self, n_in: int) -> bool:
        square = _isqrt_exact(n_in) is not None
        if self.layout == "grid" and not square:
            raise ConfigError(
                f"connector.layout=grid: {n_in} input features do not form a "
                f"square grid; use layout: sequence (or auto)"
            )
        return self.layout == "grid" or (
            self.layout == "auto" and square and _isqrt_exact(self.num_tokens) is not None
        )

    def out_tokens(self, n_in: int) -> int:
        """``min(num_tokens, N)``: a budget, never more tokens than features (on a grid
        ``min(sqrt(num_tokens), sqrt(N))**2``, the same number for square ``num_tokens``)."""
        self._grid(n_in)
        return min(self.num_tokens, n_in)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, N, D_in]``, ``mask [B, N]`` -> ``tokens [B, M, D_out]``,
        ``mask [B, M]``."""
        n = features.shape[1]
        grid = self._grid(n)
        mask = mask.bool()
        shape = (_isqrt_exact(n),) * 2 if grid else (1, n)
        x = self.proj_in(features.masked_fill(~mask[..., None], 0.0))
        for block in self.blocks:
            x = block(x, mask, shape)
        pooled, out_mask = masked_adaptive_pool(
            x.masked_fill(~mask[..., None], 0.0), mask, self.num_tokens, grid
        )
        return self.mlp(pooled), out_mask


COMPONENTS = {"connector": {"abstractor": Abstractor}}
