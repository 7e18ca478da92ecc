"""Image-text similarity scorers (AlignGPT's alignment levels)."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in scorers."""
