"""Language models: Hugging Face causal LMs."""

from __future__ import annotations

import mmbridge
from mmbridge.registry import Registrar, register_package


@mmbridge.hookimpl
def register_components(registry: Registrar) -> None:
    """Register the built-in llms (and the ``tiny-llama`` asset): the ``COMPONENTS`` table of each
    module of this package."""
    register_package(registry, __name__)
