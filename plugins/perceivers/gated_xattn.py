"""Flamingo's gated cross-attention (Alayrac et al., arXiv 2204.14198, §2.2, Fig. 4).

A Perceiver Resampler turns the features into media latents; tanh-gated cross-attention and
feed-forward blocks, inserted before every ``every``-th decoder layer of a frozen LLM, let the
text read them. The gates start at 0, so at initialisation the LLM computes exactly what it
computed before (Flamingo's "tanh-gating" keeps the pretrained model intact).

The media latents are not placed in the token sequence (``in_sequence = False``): the assembly
runs :meth:`GatedCrossAttention.forward`, hands the result to :meth:`set_context` and then runs
the LLM on the text alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmbridge.contracts.connector import Perceiver
from mmbridge.errors import AssemblyError, ConfigError
from mmbridge.plugins.perceivers._attention import Attention, FeedForward
from mmbridge.plugins.perceivers.resampler import Resampler

if TYPE_CHECKING:
    from mmbridge.contracts.llm import LanguageModel


class GatedXAttnBlock(nn.Module):
    """``x += tanh(a_attn) * xattn(LN(x), media)``; ``x += tanh(a_ffw) * ffw(x)`` (pre-norm FFW).

    Args:
        dim: LLM hidden size (text and media width).
        num_heads: cross-attention heads.
        head_dim: width of one head.
        ff_dim: hidden width of the feed-forward block.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, num_heads, head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, ff_dim)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor
    ) -> torch.Tensor:
        """``x [B, T, dim]`` reads ``media [B, M, dim]`` (``media_mask [B, M]``) ->
        ``[B, T, dim]``."""
        x = x + self.attn_gate.tanh() * self.attn(self.norm(x), media, media_mask)
        return x + self.ff_gate.tanh() * self.ff(x)


class GatedCrossAttention(Perceiver):
    """Flamingo (2204.14198): Perceiver Resampler + tanh-gated cross-attention inside the LLM.

    ``forward`` returns the media latents ``[B, num_latents, D_out]``; they are read by the
    blocks that :meth:`attach` adds, never placed in the sequence, so ``out_tokens(N) == 0``
    (no placeholder slots). ``num_latents`` says how many media tokens the text sees.

    The blocks are created by :meth:`attach` (their number depends on the LLM's depth), or by
    ``load_state_dict`` from the ``blocks.<layer index>.*`` keys it finds, and are submodules of
    this connector: they train and are saved with it. Build the optimiser after ``attach``.
    They run as forward pre-hooks of the chosen decoder layers, so the LLM's own module tree and
    state dict keep their names.

    Args:
        in_dim: ``D_in`` (injected).
        out_dim: ``D_out`` (injected), the LLM hidden size.
        num_latents, depth, hidden_dim, num_heads, max_positions: of the Perceiver Resampler
            (see :class:`~mmbridge.plugins.perceivers.resampler.Resampler`).
        every: a gated block before decoder layers ``0, every, 2*every, ...``
            (Flamingo-3B: every layer; 9B: every 4th; 80B: every 7th).
        xattn_heads: heads of the gated cross-attention.
        xattn_head_dim: width of one such head.
        ff_mult: hidden width of the gated feed-forward as a multiple of ``D_out``.
    """

    in_sequence = False

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_latents: int = 32,
        depth: int = 2,
        hidden_dim: int = 256,
        num_heads: int = 4,
        max_positions: int = 1024,
        every: int = 4,
        xattn_heads: int = 4,
        xattn_head_dim: int = 32,
        ff_mult: float = 0.5,
    ) -> None:
        super().__init__(in_dim, out_dim)
        for key, value in (
            ("every", every),
            ("xattn_heads", xattn_heads),
            ("xattn_head_dim", xattn_head_dim),
        ):
            if int(value) < 1:
                raise ConfigError(f"connector.{key}: must be >= 1, got {value}")
        if ff_mult <= 0:
            raise ConfigError(f"connector.ff_mult: must be > 0, got {ff_mult}")
        self.resampler = Resampler(
            in_dim,
            out_dim,
            num_latents=num_latents,
            depth=depth,
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            max_positions=max_positions,
        )
        self.num_latents = self.resampler.num_latents
        self.every = int(every)
        self._block_args = (
            out_dim,
            int(xattn_heads),
            int(xattn_head_dim),
            max(1, round(ff_mult * out_dim)),
        )
        self.blocks = nn.ModuleDict()
        self._handles: list[Any] = []
        self._media: tuple[torch.Tensor, torch.Tensor] | None = None
        self._recording = False
        self._text_attention: list[torch.Tensor] = []
        self.register_load_state_dict_pre_hook(_blocks_from_state_dict)

    @classmethod
    def for_testing(cls, tmp_dir: Path, in_dim: int, out_dim: int) -> GatedCrossAttention:
        return cls(
            in_dim,
            out_dim,
            num_latents=4,
            depth=1,
            hidden_dim=16,
            num_heads=2,
            max_positions=64,
            every=1,
            xattn_heads=2,
            xattn_head_dim=8,
            ff_mult=1.0,
        )

    @property
    def context_tokens(self) -> int:
        """The resampler's latents: the media tokens the text sees through cross-attention."""
        return self.num_latents

    def out_tokens(self, n_in: int) -> int:
        """0: the media latents take no slots in the token sequence (see :attr:`num_latents`)."""
        self.resampler.out_tokens(n_in)  # checks max_positions early
        return 0

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, N, D_in]`` -> media latents ``[B, num_latents, D_out]`` + mask, to be
        handed to :meth:`set_context`."""
        return self.resampler(features, mask)

    # -- layers inside the LLM -----------------------------------------------------------
    def attach(self, llm: LanguageModel) -> None:
        """Add a gated block before decoder layers ``0, every, 2*every, ...`` of ``llm``."""
        if self._handles:
            raise AssemblyError("gated_xattn is already attached to an LLM; call detach() first")
        layers = llm.decoder_layers
        hidden = getattr(llm, "hidden_size", self.out_dim)
        if hidden != self.out_dim:
            raise AssemblyError(
                f"gated_xattn was built for out_dim={self.out_dim} but the LLM's "
                f"hidden_size is {hidden}"
            )
        ref = self.resampler.latents
        for i in range(0, len(layers), self.every):
            key = str(i)
            if key not in self.blocks:  # re-attaching keeps trained blocks
                self.blocks[key] = GatedXAttnBlock(*self._block_args).to(ref.device, ref.dtype)
            self._handles.append(
                layers[i].register_forward_pre_hook(self._hook(self.blocks[key]), with_kwargs=True)
            )

    def detach(self) -> None:
        """Remove the hooks from the LLM (the blocks stay, with their weights)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_context(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Media latents ``[B, M, D_out]`` (``mask [B, M]``) that the text of sample ``b`` reads.
        A batch expanded for generation (``B * k`` rows, e.g. beams) repeats each sample's media."""
        self._media = (tokens, mask.bool())

    def clear_context(self) -> None:
        self._media = None

    def _hook(self, block: GatedXAttnBlock):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._media is None:  # text-only use: the LLM runs unchanged
                return None
            positional = bool(args)
            x = args[0] if positional else kwargs["hidden_states"]
            media, media_mask = self._media
            if media.shape[0] != x.shape[0]:
                if x.shape[0] % media.shape[0]:
                    raise AssemblyError(
                        f"gated_xattn: text batch {x.shape[0]} does not align "
                        f"with the media batch {media.shape[0]}"
                    )
                k = x.shape[0] // media.shape[0]
                media, media_mask = (
                    media.repeat_interleave(k, 0),
                    media_mask.repeat_interleave(k, 0),
                )
            dtype = block.attn_gate.dtype
            block.attn.record = self._recording
            y = block(x.to(dtype), media.to(dtype), media_mask).to(x.dtype)
            if self._recording and block.attn.weights is not None:
                self._text_attention.append(block.attn.weights)
            if positional:
                return (y, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": y}

        return pre_hook

    # -- attention maps (opt-in; see mmbridge.reporting.attention_maps) ----------------------------
    @property
    def record_attention(self) -> bool:
        """When True, the resampler and every gated block keep their attention weights (what
        was recorded stays readable after; switching it on forgets earlier recordings)."""
        return self._recording

    @record_attention.setter
    def record_attention(self, on: bool) -> None:
        self._recording = bool(on)
        self.resampler.record_attention = bool(on)
        for block in self.blocks.values():
            block.attn.record = bool(on)
        if on:
            self._text_attention = []

    def text_attention(self) -> torch.Tensor:
        """How each text token read the media latents, ``[B, T, num_latents]``: the gated
        blocks' weights averaged over blocks; the calls of a generation (the prompt, then one
        token per step) concatenated along ``T``. Rows sum to 1."""
        if not self._text_attention:
            raise RuntimeError(
                "no attention recorded: set record_attention = True, set_context and run the LLM"
            )
        per_call = len(self.blocks) or 1
        calls = [
            torch.stack(self._text_attention[i : i + per_call]).mean(0)
            for i in range(0, len(self._text_attention), per_call)
        ]
        b = calls[0].shape[0]
        return torch.cat([c for c in calls if c.shape[0] == b], dim=1)

    def attention_maps(self) -> torch.Tensor:
        """Which features each text token reads, ``[B, T, N]``: its weights on the latents
        (:meth:`text_attention`) times each latent's weights on the features (the resampler's
        :meth:`~mmbridge.plugins.perceivers.resampler.Resampler.attention_maps`), a product
        of row-stochastic matrices (an attention-rollout reading, Abnar & Zuidema 2005.00928),
        so rows sum to 1."""
        text = self.text_attention()
        latents = self.resampler.attention_maps()
        if text.shape[0] != latents.shape[0]:  # a batch expanded for generation
            latents = latents.repeat_interleave(text.shape[0] // latents.shape[0], 0)
        return text @ latents.to(text.dtype)


def _blocks_from_state_dict(
    module: GatedCrossAttention, state_dict: dict, prefix: str, *args: Any
) -> None:
    """Load-state-dict pre-hook: make the ``blocks.<i>`` that a checkpoint saved after
    ``attach`` holds and a fresh connector has not made yet."""
    ref = module.resampler.latents
    for key in state_dict:
        if key.startswith(prefix + "blocks."):
            index = key[len(prefix) + len("blocks.") :].split(".", 1)[0]
            if index not in module.blocks:
                module.blocks[index] = GatedXAttnBlock(*module._block_args).to(
                    ref.device, ref.dtype
                )


COMPONENTS = {"connector": {"gated_xattn": GatedCrossAttention}}
