"""Fixtures of the unit tests: a seeded tiny model (a random tiny Llama saved to a temporary
directory and loaded back through the ``hf_causal`` plugin, a random timm ViT, an MLP
connector), its chat encoder, and a few image samples. The registry is built in a fixture,
never at import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.config import compose
from mmbridge.contracts.types import Sample
from mmbridge.data.chat import ChatEncoder
from mmbridge.model import MultimodalModel, assemble
from mmbridge.registry import Registry
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.testing.tiny import build_tiny_llama


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(autoload=False)


@pytest.fixture(scope="session")
def tiny_model(registry, tmp_path_factory) -> MultimodalModel:
    """timm ViT (64 px, patch 8 -> 64 features) -> MLP -> 2-layer Llama (hidden 128), seed 0."""
    llm_dir = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(llm_dir, seed=0)
    cfg = compose(["experiment=tiny", f"llm.path={llm_dir}"], registry)
    torch.manual_seed(0)
    model = assemble(cfg, registry)
    return model.eval()


@pytest.fixture(scope="session")
def chat(tiny_model) -> ChatEncoder:
    return ChatEncoder(tiny_model.llm.tokenizer, list(tiny_model.branches), max_length=256)


@pytest.fixture(scope="session")
def image_samples(tmp_path_factory) -> list[Sample]:
    """Four samples, each one seeded random 64x64 image and one question / answer."""
    root: Path = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    answers = ["red", "a blue square", "two", "the green circle is on the left"]
    out = []
    for i, answer in enumerate(answers):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        out.append(
            Sample(
                f"s{i}",
                {"image": str(path)},
                [
                    {"from": "human", "value": "<image>\nWhat is in the image?" + " Answer." * i},
                    {"from": "gpt", "value": answer},
                ],
            )
        )
    return out
