"""Offline model catalogue: real pretrained weights from locally installed packages."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in assets."""
