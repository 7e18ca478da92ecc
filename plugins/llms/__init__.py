"""Language models: Hugging Face causal LMs."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in llms."""
