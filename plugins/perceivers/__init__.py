"""Multimodal Perceiver family (2311.07594 §3.2): learned-query modules and layers inside the LLM."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in perceivers."""
