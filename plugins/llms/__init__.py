"""Language models: Hugging Face causal LMs."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in llms."""
    from mmbridge.plugins.llms.hf_causal import HFCausalLM
    from mmbridge.plugins.llms.tiny import TinyLlama

    registry.add_llm("hf_causal", HFCausalLM)
    registry.add_asset("tiny-llama", TinyLlama)
