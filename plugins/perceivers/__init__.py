"""Multimodal Perceiver family (2311.07594 §3.2): learned-query modules and layers inside the
LLM."""

from __future__ import annotations

import mmbridge
from mmbridge.registry import Registrar, register_package


@mmbridge.hookimpl
def register_components(registry: Registrar) -> None:
    """Register the built-in perceivers: the ``COMPONENTS`` table of each module of this package."""
    register_package(registry, __name__)
