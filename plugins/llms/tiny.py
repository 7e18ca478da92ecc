"""``tiny-llama`` asset: a seeded random 2-layer Llama with a small word-friendly tokenizer,
for smoke runs and tests (it learns the shapes data set's language from scratch in minutes)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmbridge.errors import AssetError
from mmbridge.registry.assets import Asset

#: The asset's architecture (hidden 128, 2 layers, 4 heads, MLP 256; vocabulary ~1.2k).
CONFIG = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "seed": 0}


class TinyLlama(Asset):
    """A random-init ``LlamaForCausalLM`` (seed 0) and byte-level BPE tokenizer with a chat
    template, built by :mod:`mmbridge.testing.tiny`; no source package needed."""

    format = "hf"
    source = "mmbridge.testing.tiny (built in, seeded random weights)"

    def source_available(self) -> bool:
        return True

    def convert(self, out_dir: Path) -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mmbridge.testing.tiny import build_tiny_llama

        model = build_tiny_llama(out_dir, **CONFIG)
        reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(out_dir))
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "What colour is the circle?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        ids = prompt["input_ids"]
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max().item()
        if diff != 0.0:
            raise AssetError(
                f"model asset '{self.name}': the reloaded model's logits differ from "
                f"the built model's by {diff:.3g} (expected exactly 0)"
            )
        n = sum(p.numel() for p in model.parameters())
        return (
            f"LlamaForCausalLM {CONFIG['layers']}x{CONFIG['hidden']}, {n / 1e6:.2f}M params, "
            f"vocab {len(tok)}; reloaded logits identical on a {ids.shape[1]}-token chat prompt"
        )


COMPONENTS = {"asset": {"tiny-llama": TinyLlama}}
