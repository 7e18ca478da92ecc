"""Tool Learning family (2311.07594 §3.3): tools and the callers that run them."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in tools."""
