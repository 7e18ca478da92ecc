"""Multimodal Converter family (2311.07594 §3.1): token-wise projections."""

from __future__ import annotations

import mmbridge
from mmbridge.registry import Registrar, register_package


@mmbridge.hookimpl
def register_components(registry: Registrar) -> None:
    """Register the built-in converters: the ``COMPONENTS`` table of each module of this package."""
    register_package(registry, __name__)
