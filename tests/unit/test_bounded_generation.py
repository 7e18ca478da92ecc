"""Bounded generation: ``max_new_tokens`` is capped at what the LLM's context leaves after the
prompt, with one warning, so a model that never emits end-of-text stops; a prompt that fills
the context is refused. On the seeded tiny model (conftest)."""

from __future__ import annotations

import logging

import pytest
import torch

from mmbridge.data.batcher import Batcher
from mmbridge.errors import ConfigError, DataError
from mmbridge.model import context_length

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def prompt_batch(tiny_model, chat, image_samples):
    batcher = Batcher.from_model(tiny_model, chat)
    return batcher.batch(
        [s.replace(conversations=s.conversations[:1]) for s in image_samples[:2]], generation=True
    )


def test_max_new_tokens_is_capped_at_the_context(tiny_model, prompt_batch, monkeypatch, caplog):
    assert context_length(tiny_model.llm) == 2048  # the tiny Llama's max_position_embeddings
    prompt = prompt_batch["attention_mask"].shape[1]
    monkeypatch.setattr(tiny_model.llm, "context_length", prompt + 5, raising=False)
    monkeypatch.setattr(tiny_model, "_capped", set(), raising=False)
    eos = tiny_model.llm.tokenizer.eos_token_id
    with caplog.at_level(logging.WARNING, logger="mmbridge.model"), torch.no_grad():
        for _ in range(2):  # end-of-text held off: only the cap stops it
            new = tiny_model.generate(prompt_batch, max_new_tokens=10**6, min_new_tokens=10**6)
            assert new.shape == (2, 5) and eos not in new.tolist()
    assert [r.getMessage() for r in caplog.records] == [
        f"max_new_tokens=1000000 capped at 5: the LLM's context holds {prompt + 5} tokens and the "
        f"prompt takes {prompt}"
    ]  # one warning
    with torch.no_grad():  # within the room nothing changes
        assert tiny_model.generate(prompt_batch, max_new_tokens=3, min_new_tokens=3).shape == (2, 3)


def test_a_prompt_that_fills_the_context_is_refused(tiny_model, prompt_batch, monkeypatch):
    prompt = prompt_batch["attention_mask"].shape[1]
    monkeypatch.setattr(tiny_model.llm, "context_length", prompt, raising=False)
    with pytest.raises(
        DataError, match=f"the prompt is {prompt} tokens .* holds {prompt}: no room"
    ):
        tiny_model.generate(prompt_batch, max_new_tokens=4)
    with pytest.raises(ConfigError, match="max_new_tokens=0: must be at least 1"):
        tiny_model.generate(prompt_batch, max_new_tokens=0)
