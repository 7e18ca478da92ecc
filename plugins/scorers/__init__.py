"""Image-text similarity scorers (AlignGPT's alignment levels)."""

from __future__ import annotations

import mmbridge
from mmbridge.registry import Registrar, register_package


@mmbridge.hookimpl
def register_components(registry: Registrar) -> None:
    """Register the built-in scorers: the ``COMPONENTS`` table of each module of this package."""
    register_package(registry, __name__)
