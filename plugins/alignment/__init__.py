"""AlignGPT's adaptive alignment (arXiv 2405.14129): alignment-level indicators and the gate.

The built-in sequence prefixes (:class:`~mmbridge.contracts.prefix.SequencePrefix`, registry
kind ``prefix``), chosen in the config node ``alignment`` (``alignment=aligngpt``)."""

from __future__ import annotations

import mmbridge
from mmbridge.registry import Registrar, register_package


@mmbridge.hookimpl
def register_components(registry: Registrar) -> None:
    """Register the built-in sequence prefixes: the ``COMPONENTS`` table of each module of this
    package."""
    register_package(registry, __name__)
