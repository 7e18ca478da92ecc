"""Assembly: encoders + connectors + LLM -> one model, validated before anything runs.

Data flow of one batch (see ARCHITECTURE.md)::

    media inputs / cached features --encoder--> features [B', N, D_enc]
        --connector--> tokens [B', M, D_llm]
        --scatter into the placeholder slots--> embeds [B, T, D_llm]
        --LLM decoder--> hidden [B, T, D_llm] --LM head at supervised positions only--> loss
"""

from __future__ import annotations

import logging
from collections.abc import Callable, ItemsView, Mapping, ValuesView
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.config import model_spec
from mmbridge.config.build import build, split_node
from mmbridge.config.model_spec import node_at
from mmbridge.contracts.connector import Connector
from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.contracts.llm import LanguageModel
from mmbridge.contracts.prefix import PREFIX_SLOT, SequencePrefix
from mmbridge.data.chat import IGNORE
from mmbridge.errors import AssemblyError, ConfigError, DataError
from mmbridge.model.prefix_kv import PrefixPlan, PrefixStore, plan_prefix, report
from mmbridge.registry import Registry

log = logging.getLogger(__name__)

#: Builds a node that holds weights (kind, node, config key) -> component; the plan's builds
#: them from their Hugging Face config on the meta device.
WeightBuilder = Callable[[str, Any, str], Any]


class Branch(nn.Module):
    """One modality's path into the LLM: an encoder and its connector."""

    def __init__(self, encoder: ModalityEncoder, connector: Connector, key: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.key = key  # config key prefix, for error messages ("" = top level)

    @property
    def modality(self) -> str:
        return self.encoder.modality


if TYPE_CHECKING:

    class BranchDict(nn.ModuleDict):
        """What :attr:`MultimodalModel.branches` holds, for the type checker: modality -> Branch."""

        def __getitem__(self, key: str) -> Branch: ...
        def values(self) -> ValuesView[Branch]: ...
        def items(self) -> ItemsView[str, Branch]: ...
else:  # at run time a plain ModuleDict (same module tree, same state-dict keys)
    BranchDict = nn.ModuleDict


class MultimodalModel(nn.Module):
    """Encoders and connectors (one :class:`Branch` per modality) feeding a :class:`LanguageModel`.

    Args:
        llm: The language model.
        branches: Modality -> branch.
        prefix: Optional learned tokens at the start of each sequence (AlignGPT indicators).
    """

    def __init__(
        self,
        llm: LanguageModel,
        branches: Mapping[str, Branch],
        prefix: SequencePrefix | None = None,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.branches = BranchDict(dict(branches))
        self.prefix = prefix
        #: Names of the parameters that trained in any stage so far (what checkpoints keep).
        self.ever_trained: set[str] = set()
        #: The last training forward's use of the shared prefix (see
        #: :mod:`mmbridge.model.prefix_kv`).
        self.prefix_plan = PrefixPlan(0, False, "off: no forward yet")
        self._prefix_store = PrefixStore()
        for branch in self.branches.values():
            branch.connector.attach(llm)

    # -- media -> tokens ------------------------------------------------------------------------
    def media_tokens(
        self, media: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Encode each modality's batch (or take its cached features) and run its connector.

        ``media[modality]`` holds ``features [B', N, D]`` + ``feature_mask [B', N]`` (cached) or
        ``inputs`` (the encoder's collated batch); ``B'`` counts the batch's media items of the
        modality (row by row, each row's files in placeholder order: a text-only row has none,
        a two-image row two). Returns modality -> (tokens ``[B', M, D_llm]``, mask ``[B', M]``).
        """
        out = {}
        for modality, item in media.items():
            branch = self.branches[modality]
            if "features" in item:
                feats, fmask = item["features"], item["feature_mask"]
            else:
                feats, fmask = branch.encoder(item["inputs"])
            feats = feats.to(self._connector_dtype(branch.connector, feats))
            out[modality] = branch.connector(feats, fmask)
        return out

    @staticmethod
    def _connector_dtype(connector: Connector, feats: torch.Tensor) -> torch.dtype:
        p = next(connector.parameters(), None)
        return p.dtype if p is not None else feats.dtype

    def embed(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Text embeddings with each modality's connector tokens scattered into its slots.

        Connectors that are not ``in_sequence`` (Flamingo) get their tokens as context instead.
        """
        embeds = self.llm.embed(batch["input_ids"])
        tokens = self.media_tokens(batch.get("media", {}))
        for modality, (tok, tmask) in tokens.items():
            branch = self.branches[modality]
            if not branch.connector.in_sequence:
                branch.connector.set_context(tok, tmask)
                continue
            slots = batch["slots"][modality]
            # Item k's tokens fill the k-th run of slots in row-major order: the collator lists
            # the items row by row, each row's in placeholder order, so a two-image row gets its
            # images in the right placeholders and a text-only row none.
            # all valid (converters): no boolean gather; masked_scatter reads row-major either way
            values = tok.reshape(-1, tok.shape[-1]) if bool(tmask.all()) else tok[tmask]
            if values.shape[0] != int(slots.sum()):
                raise AssemblyError(
                    f"{branch.key or 'connector'}: {type(branch.connector).__name__} produced "
                    f"{values.shape[0]} valid tokens for {int(slots.sum())} placeholder slots; "
                    f"its out_tokens(N) and output mask disagree"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), values.to(embeds.dtype))
        if self.prefix is not None:
            embeds = self._fill_prefix(embeds, batch)
        return embeds

    def _fill_prefix(self, embeds: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        assert self.prefix is not None  # embed() calls this only when there is a prefix
        slots = batch["slots"][PREFIX_SLOT]
        prompt = batch["attention_mask"].bool() & ~slots
        labels = batch.get("labels")
        if labels is not None:  # answers are never shown to the prefix, as at inference
            prompt &= torch.cumsum((labels != IGNORE).long(), dim=1) == 0
        tokens = self.prefix(embeds, prompt, batch)
        return embeds.masked_scatter(
            slots.unsqueeze(-1), tokens.reshape(-1, tokens.shape[-1]).to(embeds.dtype)
        )

    def clear_context(self) -> None:
        for branch in self.branches.values():
            branch.connector.clear_context()

    # -- training -------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean next-token cross-entropy over supervised positions (a scalar).

        The LM head runs only where the shifted labels are supervised: over a 49k-token
        vocabulary, prompt and media positions would otherwise dominate the step's cost. The
        keys/values of the leading tokens every row shares (the chat template's opening) are
        computed once, not once per row, where that is exact (``llm.reuse_prefix_kv``,
        :mod:`mmbridge.model.prefix_kv`); the decision is in :attr:`prefix_plan`.
        """
        self.prefix_plan = plan = plan_prefix(self, batch)
        report(plan, getattr(self.llm, "reuse_prefix_kv", "auto"))
        n = plan.length
        try:
            embeds = self.embed(batch)
            if n:
                hidden = self._hidden_after_prefix(embeds, batch, plan)
            else:
                hidden = self.llm.hidden(embeds, batch["attention_mask"])
        finally:
            self.clear_context()
        labels = batch["labels"][:, n + 1 :]  # positions 1..n carry no label (plan_prefix)
        keep = labels != IGNORE
        if not bool(keep.any()):
            return hidden.sum() * 0.0  # a batch without answers: no signal, keep the graph
        logits = self.llm.logits(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), labels[keep])

    def _hidden_after_prefix(
        self, embeds: torch.Tensor, batch: Mapping[str, Any], plan: PrefixPlan
    ) -> torch.Tensor:
        """Hidden states ``[B, T - P, D]`` after the shared prefix ``embeds[:, :P]``."""
        n = plan.length
        head = embeds[:1, :n]
        if plan.constant:
            state = self._prefix_store.get(self.llm, batch["input_ids"][0, :n], head)
        else:
            self._prefix_store.clear()  # the LLM trains: a kept state would go stale
            state = self.llm.prefix_states(head)
        return self.llm.hidden_after(embeds[:, n:], batch["attention_mask"], state)

    @torch.no_grad()
    def generate(
        self, batch: Mapping[str, Any], max_new_tokens: int = 32, **kwargs: Any
    ) -> torch.Tensor:
        """New token ids ``[B, T_new]`` for a left-padded prompt batch.

        ``max_new_tokens`` is capped at what the LLM's context leaves after the prompt (one
        warning per model and requested length): past it a model without an end-of-text
        would run on for as long as it was asked.

        Raises:
            DataError: when the prompt alone fills the LLM's context.
        """
        try:
            embeds = self.embed(batch)
            max_new_tokens = self._bounded(int(max_new_tokens), embeds.shape[1])
            return self.llm.generate(
                embeds, batch["attention_mask"], max_new_tokens=max_new_tokens, **kwargs
            )
        finally:
            self.clear_context()

    def _bounded(self, requested: int, prompt: int) -> int:
        """``requested`` new tokens capped at the room the context leaves after ``prompt``."""
        if requested < 1:
            raise ConfigError(f"max_new_tokens={requested}: must be at least 1")
        limit = context_length(self.llm)
        if limit is None:
            return requested
        room = limit - prompt
        if room < 1:
            raise DataError(
                f"the prompt is {prompt} tokens (media tokens included); the LLM's context "
                f"holds {limit}: no room to generate (shorten the prompt or use fewer media)"
            )
        if requested > room:
            warned = self.__dict__.setdefault("_capped", set())
            if requested not in warned:
                warned.add(requested)
                log.warning(
                    "max_new_tokens=%d capped at %d: the LLM's context holds %d tokens and the "
                    "prompt takes %d",
                    requested,
                    room,
                    limit,
                    prompt,
                )
            return room
        return requested

    # -- bookkeeping ----------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train (what checkpoints hold)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        connector = sum(p.numel() for b in self.branches.values() for p in b.connector.parameters())
        return {"total": total, "trainable": trainable, "connector": connector}


def assemble(
    cfg: Mapping[str, Any],
    registry: Registry,
    llm: LanguageModel | None = None,
    build_weights: WeightBuilder | None = None,
) -> MultimodalModel:
    """Build the model of a config's component nodes (a run's
    :class:`~mmbridge.config.model_spec.ModelConfig`, or a composed config), checking that the
    parts fit together.

    Checks (each error names the config keys): every encoder's width vs the connector's
    ``in_dim`` when one is set, the connector's ``out_dim`` (when set) vs the LLM's hidden size,
    and one branch per modality. The nodes are :mod:`mmbridge.config.model_spec`'s; ``llm`` is a
    built LLM to use instead of the config's, ``build_weights`` builds the LLM and encoders in
    place of the registry's constructor (the plan's meta model).
    """
    (llm_node,) = [n for n in model_spec.model_nodes(cfg) if n.kind == "llm"]
    llm_cfg = node_at(cfg, llm_node.key)
    make = build_weights or (lambda kind, node, key: build(registry, kind, node, key))
    llm = llm if llm is not None else make("llm", llm_cfg, llm_node.key)
    branches: dict[str, Branch] = {}
    for spec in model_spec.branch_nodes(
        cfg
    ):  # the model config's shape: mmbridge.config.model_spec
        enc_key, con_key = spec.encoder.key, spec.connector.key
        enc_node, con_node = node_at(cfg, enc_key), node_at(cfg, con_key)
        encoder = make("encoder", enc_node, enc_key)
        connector = _build_connector(
            registry,
            con_node,
            con_key,
            spec.connector.injected,
            encoder,
            llm,
            f"{enc_key} ('{enc_node['name']}')",
            f"llm ('{llm_cfg.get('path', llm_cfg['name'])}')",
        )
        if encoder.modality in branches:
            other = branches[encoder.modality].key
            raise AssemblyError(
                f"{spec.parent or 'encoder'} and {other or 'encoder'} both encode "
                f"'{encoder.modality}'; one branch per modality"
            )
        branches[encoder.modality] = Branch(encoder, connector, spec.parent)
    seq_prefix = None
    for node in model_spec.model_nodes(cfg):
        if node.kind == "prefix":
            seq_prefix = build(
                registry,
                "prefix",
                node_at(cfg, node.key),
                node.key,
                **dict.fromkeys(node.injected, llm.hidden_size),
            )
    return MultimodalModel(llm, branches, seq_prefix)


def _build_connector(
    registry: Registry,
    node: Any,
    key: str,
    injected: tuple[str, ...],
    encoder: ModalityEncoder,
    llm: LanguageModel,
    enc_name: str,
    llm_name: str,
) -> Connector:
    """The connector at ``key`` with its injected ``in_dim`` / ``out_dim`` (the encoder's width,
    the LLM's hidden size); a value the config sets itself must agree with them."""
    _, con_args = split_node(node, key)
    widths = {
        "in_dim": (encoder.out_dim, enc_name, "width", "the encoder"),
        "out_dim": (llm.hidden_size, llm_name, "hidden size", "the LLM"),
    }
    for arg in injected:
        given = con_args.pop(arg, None)
        value, owner, what, source = widths[arg]
        if given is not None and int(given) != value:
            raise AssemblyError(
                f"{key}.{arg}={given} does not match {owner} {what} {value}; drop {key}.{arg} "
                f"(it is set from {source})"
                + (" or choose a matching encoder" if arg == "in_dim" else "")
            )
    return build(
        registry,
        "connector",
        {"name": node["name"], **con_args},
        key,
        **{arg: widths[arg][0] for arg in injected},
    )


def context_length(llm: Any) -> int | None:
    """The longest sequence ``llm`` attends over: its ``context_length`` attribute when it
    has one (a plugin may say so), else its Hugging Face config's ``max_position_embeddings``
    (of ``text_config`` for a composite model); None when it does not say."""
    own = getattr(llm, "context_length", None)
    if isinstance(own, int) and own > 0:
        return own
    config = getattr(getattr(llm, "model", None), "config", None)
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None
