"""Flamingo's Perceiver Resampler (Alayrac et al., arXiv 2204.14198, §2.1 and appendix A.1.1).

A fixed set of learned latents cross-attends to the encoder features: in each layer the keys
and values are the concatenation ``[x; latents]`` (Flamingo's choice, so the latents also
attend to each other), followed by a feed-forward block. Any number ``N`` of features is
resampled to ``num_latents`` tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmbridge.contracts.connector import Perceiver
from mmbridge.errors import ConfigError
from mmbridge.plugins.perceivers._attention import Attention, FeedForward


class ResamplerLayer(nn.Module):
    """One resampler layer: ``latents += attn(LN(latents), [LN(x); LN(latents)])``, then FFN."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, num_heads, dim // num_heads, dropout)
        self.ff = FeedForward(dim, ff_mult * dim)

    def forward(
        self, x: torch.Tensor, latents: torch.Tensor, kv_mask: torch.Tensor
    ) -> torch.Tensor:
        """``x [B, N, D]``, ``latents [B, L, D]``, ``kv_mask [B, N + L]`` -> latents
        ``[B, L, D]``."""
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(x), q], dim=1)
        latents = latents + self.attn(q, kv, kv_mask)
        return latents + self.ff(latents)


class Resampler(Perceiver):
    """Perceiver Resampler (Flamingo, 2204.14198): ``num_latents`` learned latents resample any
    number of features; a Linear maps them to the LLM width.

    ``features [B, N, D_in]`` -> Linear to ``hidden_dim`` -> + learned position embedding of
    each of the ``N`` positions (Flamingo's learned temporal embedding, here one per feature) ->
    ``depth`` resampler layers -> LayerNorm -> Linear -> ``tokens [B, num_latents, D_out]``.

    Args:
        in_dim: ``D_in`` (injected).
        out_dim: ``D_out`` (injected).
        num_latents: output tokens ``M`` (Flamingo: 64).
        depth: resampler layers (Flamingo: 6).
        hidden_dim: width of the latents.
        num_heads: attention heads (must divide ``hidden_dim``).
        ff_mult: feed-forward width as a multiple of ``hidden_dim``.
        max_positions: longest feature sequence ``N`` (size of the position table).
        dropout: attention dropout.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_latents: int = 32,
        depth: int = 2,
        hidden_dim: int = 256,
        num_heads: int = 4,
        ff_mult: int = 4,
        max_positions: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, out_dim)
        for key, value in (
            ("num_latents", num_latents),
            ("depth", depth),
            ("hidden_dim", hidden_dim),
            ("num_heads", num_heads),
            ("ff_mult", ff_mult),
            ("max_positions", max_positions),
        ):
            if int(value) < 1:
                raise ConfigError(f"connector.{key}: must be >= 1, got {value}")
        if hidden_dim % num_heads:
            raise ConfigError(
                f"connector.num_heads: {num_heads} does not divide "
                f"connector.hidden_dim={hidden_dim}"
            )
        self.num_latents = int(num_latents)
        self.max_positions = int(max_positions)
        self.proj_in = nn.Linear(in_dim, hidden_dim) if in_dim != hidden_dim else nn.Identity()
        self.pos_emb = nn.Parameter(torch.randn(max_positions, hidden_dim) * 0.02)
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_dim) * 0.02)
        self.layers = nn.ModuleList(
            ResamplerLayer(hidden_dim, num_heads, ff_mult, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, out_dim)

    @classmethod
    def for_testing(cls, tmp_dir: Path, in_dim: int, out_dim: int) -> Resampler:
        return cls(
            in_dim,
            out_dim,
            num_latents=4,
            depth=1,
            hidden_dim=16,
            num_heads=2,
            ff_mult=2,
            max_positions=64,
        )

    def _check_length(self, n_in: int) -> None:
        if n_in > self.max_positions:
            raise ConfigError(
                f"connector.max_positions: {n_in} input features exceed "
                f"max_positions={self.max_positions}; raise connector.max_positions"
            )

    def out_tokens(self, n_in: int) -> int:
        """Always ``num_latents``, whatever ``N`` (up to ``max_positions``)."""
        self._check_length(n_in)
        return self.num_latents

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, N, D_in]``, ``mask [B, N]`` -> ``tokens [B, num_latents, D_out]`` and
        ``mask [B, num_latents]`` (all True for a sample with at least one real feature)."""
        b, n, _ = features.shape
        self._check_length(n)
        mask = mask.bool()
        # zeroed so that even non-finite padding cannot leak through 0-weight attention
        x = self.proj_in(features.masked_fill(~mask[..., None], 0.0)) + self.pos_emb[:n]
        latents = self.latents.expand(b, -1, -1)
        kv_mask = torch.cat([mask, mask.new_ones(b, self.num_latents, dtype=torch.bool)], dim=1)
        for layer in self.layers:
            latents = layer(x, latents, kv_mask)
        tokens = self.proj_out(self.norm(latents))
        return tokens, mask.any(dim=1, keepdim=True).expand(b, self.num_latents).contiguous()

    # -- attention maps (opt-in; see mmbridge.reporting.attention_maps) ----------------------------
    @property
    def record_attention(self) -> bool:
        """When True, every layer keeps its last attention weights (off: no extra work; what
        was recorded stays readable). Switching it on forgets earlier recordings."""
        return all(layer.attn.record for layer in self.layers)

    @record_attention.setter
    def record_attention(self, on: bool) -> None:
        for layer in self.layers:
            layer.attn.record = bool(on)
            if on:
                layer.attn.weights = None

    def layer_attention(self) -> list[torch.Tensor]:
        """Each layer's last recorded weights ``[B, num_latents, N + num_latents]`` (keys: the
        ``N`` features, then the latents); every row sums to 1."""
        return [layer.attn.weights for layer in self.layers if layer.attn.weights is not None]

    def attention_maps(self) -> torch.Tensor:
        """Where each latent looks among the ``N`` features: ``[B, num_latents, N]``, the
        weights on the features averaged over the layers and renormalised over the features
        (the share a latent gives the latents themselves is left out), rows summing to 1."""
        weights = self.layer_attention()
        if not weights:
            raise RuntimeError("no attention recorded: set record_attention = True and run forward")
        n = weights[0].shape[-1] - self.num_latents
        patches = torch.stack([w[..., :n] for w in weights]).mean(0)
        return patches / patches.sum(-1, keepdim=True).clamp(min=1e-12)


COMPONENTS = {"connector": {"resampler": Resampler}}
