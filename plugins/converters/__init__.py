"""Multimodal Converter family (2311.07594 §3.1): token-wise projections."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in converters."""
