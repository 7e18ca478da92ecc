"""Data-Driven family (2311.07594 §3.4): recipes that turn data into training conversations."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in recipes."""
