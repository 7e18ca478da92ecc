"""Modality encoders: images (timm, HF vision towers) and audio (Whisper)."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in encoders."""
