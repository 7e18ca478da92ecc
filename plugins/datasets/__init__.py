"""Data sources: LLaVA files and generated data sets with ground truth."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in datasets."""
