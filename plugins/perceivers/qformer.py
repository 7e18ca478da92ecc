"""BLIP-2's Querying Transformer (Li et al., arXiv 2301.12597, §3.1) as a Perceiver connector.

Learned query tokens pass through a BERT-style stack (self-attention over the queries,
cross-attention to the encoder features every ``cross_attention_freq``-th layer, feed-forward);
a Linear maps the queries to the LLM width (BLIP-2's "fully-connected layer", §3.3).

The stack *is* transformers' ``Blip2QFormerModel``, so a Q-Former saved with
``save_pretrained`` (for instance the ``qformer`` of a trained BLIP-2) loads with ``init_from``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mmbridge.contracts.connector import Perceiver
from mmbridge.errors import ConfigError

#: Optional file next to the Q-Former's ``config.json``: a safetensors file holding the tensor
#: ``query_tokens`` (``[1, num_queries, hidden]`` as in BLIP-2, or ``[num_queries, hidden]``).
QUERY_TOKENS_FILE = "query_tokens.safetensors"


class QFormer(Perceiver):
    """Q-Former (BLIP-2, 2301.12597): ``num_queries`` learned queries read the features.

    ``features [B, N, D_in]`` -> ``tokens [B, num_queries, D_out]``; the output mask is all True
    for every sample with at least one real feature. Padded features are excluded from every
    cross-attention by the encoder attention mask.

    Args:
        in_dim: ``D_in`` (injected); the Q-Former's ``encoder_hidden_size``.
        out_dim: ``D_out`` (injected).
        num_queries: learned query tokens = output tokens ``M`` (BLIP-2: 32).
        num_layers: Q-Former layers (BLIP-2: 12).
        hidden_dim: Q-Former width (BLIP-2: 768); the FFN is 4x wider.
        num_heads: attention heads (must divide ``hidden_dim``).
        cross_attention_freq: cross-attention in layers ``0, f, 2f, ...`` (BLIP-2: 2).
        dropout: hidden and attention dropout.
        init_from: directory of a ``Blip2QFormerModel`` saved with ``save_pretrained``
            (plus, optionally, :data:`QUERY_TOKENS_FILE`); the other arguments must match its
            config. Without the query-token file the queries start random.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        num_layers: int = 2,
        hidden_dim: int = 256,
        num_heads: int = 4,
        cross_attention_freq: int = 1,
        dropout: float = 0.0,
        init_from: str | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim)
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        for key, value in (
            ("num_queries", num_queries),
            ("num_layers", num_layers),
            ("hidden_dim", hidden_dim),
            ("num_heads", num_heads),
            ("cross_attention_freq", cross_attention_freq),
        ):
            if int(value) < 1:
                raise ConfigError(f"connector.{key}: must be >= 1, got {value}")
        if hidden_dim % num_heads:
            raise ConfigError(
                f"connector.num_heads: {num_heads} does not divide "
                f"connector.hidden_dim={hidden_dim}"
            )
        self.num_queries = int(num_queries)
        wanted = {
            "hidden_size": ("hidden_dim", hidden_dim),
            "num_hidden_layers": ("num_layers", num_layers),
            "num_attention_heads": ("num_heads", num_heads),
            "cross_attention_frequency": ("cross_attention_freq", cross_attention_freq),
            "encoder_hidden_size": ("the encoder's out_dim (in_dim)", in_dim),
        }
        dropouts = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        query_tokens = torch.randn(1, num_queries, hidden_dim) * 0.02  # BLIP-2's init (std 0.02)
        if init_from is None:
            config = Blip2QFormerConfig(
                intermediate_size=4 * hidden_dim,
                use_qformer_text_input=False,
                **dropouts,
                **{k: v for k, (_, v) in wanted.items()},
            )
            self.qformer = Blip2QFormerModel(config)
        else:
            self.qformer = _load_qformer(Path(init_from).expanduser(), wanted, dropouts)
            loaded = _load_query_tokens(Path(init_from).expanduser(), num_queries, hidden_dim)
            if loaded is not None:
                query_tokens = loaded
        self.query_tokens = nn.Parameter(query_tokens)
        self.proj = nn.Linear(hidden_dim, out_dim)
        #: Opt-in: when True, :meth:`forward` also records every cross-attention layer's
        #: weights (see :meth:`attention_maps`); off, the forward is unchanged.
        self.record_attention = False
        self._attention: list[torch.Tensor] = []

    @classmethod
    def for_testing(cls, tmp_dir: Path, in_dim: int, out_dim: int) -> QFormer:
        return cls(
            in_dim,
            out_dim,
            num_queries=4,
            num_layers=2,
            hidden_dim=16,
            num_heads=2,
            cross_attention_freq=2,
        )

    def out_tokens(self, n_in: int) -> int:
        """Always ``num_queries``, whatever ``N``."""
        return self.num_queries

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, N, D_in]``, ``mask [B, N]`` -> ``tokens [B, num_queries, D_out]``,
        ``mask [B, num_queries]``."""
        b = features.shape[0]
        mask = mask.bool()
        has_any = mask.any(dim=1)
        # a sample without real features would softmax over nothing (NaN): open its row and
        # zero its output instead
        enc_mask = mask | ~has_any[:, None]
        hooks = self._record_hooks(enc_mask) if self.record_attention else []
        try:
            out = self.qformer(
                query_embeds=self.query_tokens.expand(b, -1, -1),
                encoder_hidden_states=features.masked_fill(~mask[..., None], 0.0),
                encoder_attention_mask=enc_mask.long(),
            ).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        tokens = self.proj(out.to(self.proj.weight.dtype)) * has_any[:, None, None]
        return tokens, has_any[:, None].expand(b, self.num_queries).contiguous()

    # -- attention maps (opt-in; see mmbridge.reporting.attention_maps) ----------------------------
    def _record_hooks(self, enc_mask: torch.Tensor) -> list:
        """Forward hooks on the cross-attention layers that recompute their softmax weights
        from the layer's own query/key projections (SDPA does not return them)."""
        self._attention = []

        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h, enc = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            with torch.no_grad():
                q = module.query(h).unflatten(-1, (-1, module.attention_head_size)).transpose(1, 2)
                k = module.key(enc).unflatten(-1, (-1, module.attention_head_size)).transpose(1, 2)
                scores = (q @ k.transpose(-1, -2)).float() * module.scaling
                scores = scores.masked_fill(~enc_mask[:, None, None, :], float("-inf"))
                self._attention.append(scores.softmax(-1).mean(1))  # [B, Q, N], heads averaged

        return [
            layer.crossattention.attention.register_forward_hook(hook, with_kwargs=True)
            for layer in self.qformer.encoder.layer
            if layer.has_cross_attention
        ]

    def layer_attention(self) -> list[torch.Tensor]:
        """The last recorded forward's cross-attention weights per cross-attention layer,
        ``[B, num_queries, N]`` each (heads averaged); every row sums to 1."""
        return list(self._attention)

    def attention_maps(self) -> torch.Tensor:
        """Where each query looks among the ``N`` features, ``[B, num_queries, N]``: the
        cross-attention weights averaged over layers and heads (rows sum to 1)."""
        if not self._attention:
            raise RuntimeError("no attention recorded: set record_attention = True and run forward")
        return torch.stack(self._attention).mean(0)


def _load_qformer(path: Path, wanted: dict[str, tuple[str, int]], dropouts: dict[str, float]):
    """Load a saved ``Blip2QFormerModel`` and check it fits the connector arguments."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"connector.init_from: '{path}' has no config.json (expected a "
            f"directory written by Blip2QFormerModel.save_pretrained)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != Blip2QFormerConfig.model_type:
        raise ConfigError(
            f"connector.init_from: '{path}' holds a '{model_type}' model; expected "
            f"a Blip2QFormerModel ('{Blip2QFormerConfig.model_type}'); save the "
            f"Q-Former alone, e.g. blip2.qformer.save_pretrained(dir)"
        )
    config = Blip2QFormerConfig.from_pretrained(path)
    problems = [
        f"connector.{arg}={value} but the saved Q-Former has {key}={getattr(config, key)}"
        for key, (arg, value) in wanted.items()
        if getattr(config, key) != value
    ]
    if problems:
        raise ConfigError(
            f"connector.init_from: '{path}' does not match the connector "
            f"arguments: " + "; ".join(problems)
        )
    for key, value in dropouts.items():
        setattr(config, key, value)
    model, info = Blip2QFormerModel.from_pretrained(
        path, config=config, dtype=torch.float32, output_loading_info=True
    )
    if info.get("missing_keys"):
        raise ConfigError(
            f"connector.init_from: '{path}' lacks weights: "
            f"{', '.join(sorted(info['missing_keys'])[:5])}"
        )
    return model


def _load_query_tokens(path: Path, num_queries: int, hidden_dim: int) -> torch.Tensor | None:
    """The saved query tokens ``[1, num_queries, hidden_dim]``, or None when there are none."""
    file = path / QUERY_TOKENS_FILE
    if not file.is_file():
        return None
    from safetensors.torch import load_file

    tensors = load_file(file)
    if "query_tokens" not in tensors:
        raise ConfigError(
            f"connector.init_from: {file} has no tensor 'query_tokens' "
            f"(found: {', '.join(sorted(tensors))})"
        )
    tokens = tensors["query_tokens"].float()
    tokens = tokens[None] if tokens.dim() == 2 else tokens
    if tokens.shape != (1, num_queries, hidden_dim):
        raise ConfigError(
            f"connector.num_queries: {file} holds query tokens of shape "
            f"{tuple(tokens.shape)}, expected (1, {num_queries}, {hidden_dim}) "
            f"from connector.num_queries and connector.hidden_dim"
        )
    return tokens


COMPONENTS = {"connector": {"qformer": QFormer}}
