"""Multimodal Perceiver family (2311.07594 §3.2): learned-query modules and layers inside the LLM."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in perceivers."""
    from mmbridge.plugins.perceivers.gated_xattn import GatedCrossAttention
    from mmbridge.plugins.perceivers.qformer import QFormer
    from mmbridge.plugins.perceivers.resampler import Resampler

    registry.add_connector("qformer", QFormer)
    registry.add_connector("resampler", Resampler)
    registry.add_connector("gated_xattn", GatedCrossAttention)
    from mmbridge.plugins.perceivers.window_qformer import WindowQFormer

    registry.add_connector("window_qformer", WindowQFormer)
