"""Attention building blocks shared by the Perceiver plugins (resampler, gated cross-attention).

Every attention here takes a key padding mask ``[B, S]`` (True = real key) so that padded
positions get exactly zero weight: the softmax of a masked logit is ``exp(-inf) = 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of ``module``; shared parameters count once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def key_padding(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key padding mask ``[B, S]`` -> (SDPA mask ``[B, 1, 1, S]``, ``has_keys [B]``).

    A sample without any real key would give a softmax over nothing (NaN); its row is opened
    to all keys here and the caller zeroes its output with ``has_keys``.
    """
    mask = mask.bool()
    has_keys = mask.any(dim=1)
    safe = mask | ~has_keys[:, None]
    return safe[:, None, None, :], has_keys


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over a context with a key padding mask.

    Args:
        dim: width of the queries (and of the output).
        context_dim: width of the keys/values source.
        num_heads: attention heads.
        head_dim: width of one head (inner width = ``num_heads * head_dim``).
        dropout: attention-probability dropout (training only).
    """

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.dropout = dropout
        # no biases in q/k/v/out, as in Flamingo's attention (2204.14198, appendix A)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        #: Opt-in (``record = True``): each forward also stores its attention weights, averaged
        #: over the heads, in :attr:`weights` ``[B, T, S]`` (rows sum to 1 over the real keys).
        #: Off, the forward is the SDPA call alone.
        self.record = False
        self.weights: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Queries ``x [B, T, dim]`` attend to ``context [B, S, context_dim]`` where
        ``mask [B, S]`` is True; returns ``[B, T, dim]`` (zeros for a sample without keys)."""
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.num_heads, -1).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.reshape(b, context.shape[1], self.num_heads, -1).transpose(1, 2)
        v = v.reshape(b, context.shape[1], self.num_heads, -1).transpose(1, 2)
        attn_mask, has_keys = (None, None) if mask is None else key_padding(mask)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        if self.record:
            self.weights = attention_weights(q, k, attn_mask)
        out = self.to_out(out.transpose(1, 2).reshape(b, t, -1))
        if has_keys is not None:
            out = out * has_keys[:, None, None].to(out.dtype)
        return out


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The softmax weights that SDPA applies, averaged over heads: ``q [B, H, T, d]``,
    ``k [B, H, S, d]``, boolean ``mask`` broadcastable to ``[B, H, T, S]`` -> ``[B, T, S]``.

    Recomputed explicitly (SDPA does not return them) and detached: for pictures only."""
    with torch.no_grad():
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1).mean(dim=1)


class FeedForward(nn.Sequential):
    """Pre-norm MLP ``LayerNorm -> Linear -> GELU -> Linear``: ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, dim, bias=False),
        )
