"""Modality encoders: images (timm, HF vision towers) and audio (Whisper)."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in encoders."""
    from mmbridge.plugins.encoders.hf_vision import HFVisionEncoder
    from mmbridge.plugins.encoders.timm_encoder import TimmEncoder

    registry.add_encoder("timm", TimmEncoder)
    registry.add_encoder("hf_vision", HFVisionEncoder)
    from mmbridge.plugins.encoders.whisper_encoder import WhisperEncoder

    registry.add_encoder("whisper", WhisperEncoder)
