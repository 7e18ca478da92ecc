"""AlignGPT's adaptive alignment (arXiv 2405.14129): alignment-level indicators and the gate."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in sequence prefixes."""
    from mmbridge.plugins.alignment.aligngpt import AlignGPTPrefix

    registry.add_prefix("aligngpt", AlignGPTPrefix)
