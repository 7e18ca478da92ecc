"""Contract of the language model that receives the bridged tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class LanguageModel(nn.Module, ABC):
    """A causal LLM with its tokenizer, split so that mmbridge can

    * embed text and splice connector tokens into the embedding sequence,
    * run the decoder without the LM head (``hidden``), and
    * apply the LM head only at the positions that are supervised (``logits``).

    Optionally (:meth:`prefix_reuse_blocker` returns ``None``), the keys/values of a prefix that
    every sequence of a batch shares (the chat template's opening) are computed once and reused
    (:meth:`prefix_states`, :meth:`hidden_after`); see :mod:`mmbridge.model.prefix_kv`.
    """

    #: ``llm.reuse_prefix_kv``: ``"auto"`` reuses the shared prefix's keys/values where that is
    #: exact, ``True`` the same and warns (once per reason) where it cannot, ``False`` never.
    reuse_prefix_kv: bool | str = "auto"

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """``D_llm``: width of the input embeddings and hidden states."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer (``apply_chat_template``, ``eos_token_id``, ...)."""

    @property
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder blocks, for Perceivers that add layers inside the LLM."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> input embeddings ``[B, T, D_llm]``."""

    @abstractmethod
    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, T, D_llm]`` (after the last norm, before the LM head)."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: ``[..., D_llm]`` -> ``[..., V]``."""

    @abstractmethod
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy (or sampled) continuation of a left-padded embedding batch; returns only
        the new token ids ``[B, T_new]``."""

    # -- optional: LoRA ------------------------------------------------------------------------
    @property
    def lora_config(self) -> dict[str, Any] | None:
        """The settings of the LoRA adapters this LLM carries (a stage's ``lora`` section as
        :func:`mmbridge.model.lora.lora_settings` gives it: ``r``, ``alpha``, ``dropout``,
        ``target_modules`` and any other ``peft.LoraConfig`` key), or ``None`` without
        adapters. Read by the stages (add adapters once) and the PEFT export."""
        return None

    def apply_lora(self, settings: Mapping[str, Any] | None = None, **keys: Any) -> None:
        """Add LoRA adapters with ``settings`` and ``keys`` (see :attr:`lora_config`:
        ``apply_lora({"r": 8, ...})`` or ``apply_lora(r=8, ...)``); afterwards only they
        train in the LLM. Called again with the same settings (a later stage), the existing
        adapters train again; other settings are a :class:`~mmbridge.errors.ConfigError`."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA")

    # -- optional: reuse the keys/values of a shared prefix -------------------------------------
    def prefix_reuse_blocker(self) -> str | None:
        """Why this LLM, in its current state, cannot reuse prefix keys/values (``None``: it can).

        The default says that the class does not implement :meth:`prefix_states` /
        :meth:`hidden_after`; an implementation also names states that would make reuse inexact
        (for example dropout active in training).
        """
        return f"{type(self).__name__} does not implement prefix_states / hidden_after"

    def prefix_states(self, prefix_embeds: torch.Tensor) -> Any:
        """Run the decoder over one prefix ``[1, P, D_llm]`` (positions ``0..P-1``, no padding)
        and return its per-layer keys/values in a form :meth:`hidden_after` takes (gradients
        flow through them)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement prefix_states")

    def hidden_after(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, prefix: Any
    ) -> torch.Tensor:
        """Final hidden states ``[B, S, D_llm]`` of the positions after a shared prefix.

        Args:
            inputs_embeds: ``[B, S, D_llm]``, the embeddings after the prefix.
            attention_mask: ``[B, P + S]``, the whole rows' mask (the prefix's part all ones).
            prefix: What :meth:`prefix_states` returned for the prefix, batch size 1; it is
                expanded over the batch.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement hidden_after")
