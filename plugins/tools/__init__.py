"""Tool Learning family (2311.07594 §3.3): tools and the callers that run them."""

from __future__ import annotations

import mmbridge
from mmbridge.registry import Registrar, register_package


@mmbridge.hookimpl
def register_components(registry: Registrar) -> None:
    """Register the built-in tools and tool callers: the ``COMPONENTS`` table of each module of
    this package."""
    register_package(registry, __name__)
