"""Small tensor operations that several components share (connectors, encoders)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_avg_pool(
    x: torch.Tensor, mask: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average non-overlapping windows of ``stride`` positions, counting real positions only.

    Args:
        x: ``[B, N, D]``.
        mask: ``[B, N]`` bool, True = real.
        stride: Window length (1 returns the inputs, with padded rows zeroed).

    Returns:
        ``pooled [B, ceil(N / stride), D]`` (zero where a window holds no real position) and
        ``mask [B, ceil(N / stride)]`` (True where it holds at least one).
    """
    b, n, d = x.shape
    m = mask.to(x.dtype).unsqueeze(-1)
    if stride == 1:
        return x * m, mask.bool()
    n_out = math.ceil(n / stride)
    pad = n_out * stride - n
    xs = F.pad(x * m, (0, 0, 0, pad)).view(b, n_out, stride, d).sum(2)
    counts = F.pad(m, (0, 0, 0, pad)).view(b, n_out, stride, 1).sum(2)
    return xs / counts.clamp_min(1.0), counts.squeeze(-1) > 0
