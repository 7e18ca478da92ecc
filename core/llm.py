"""Contract of the language model that receives the bridged tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class LanguageModel(nn.Module, ABC):
    """A causal LLM with its tokenizer, split so that mmbridge can

    * embed text and splice connector tokens into the embedding sequence,
    * run the decoder without the LM head (``hidden``), and
    * apply the LM head only at the positions that are supervised (``logits``).
    """

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
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """Greedy (or sampled) continuation of a left-padded embedding batch; returns only
        the new token ids ``[B, T_new]``."""

    def apply_lora(self, r: int, alpha: int, dropout: float, target_modules: list[str]) -> None:
        """Wrap the decoder with LoRA adapters (only they train afterwards)."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA")
