"""Image-text similarity scorers (AlignGPT's alignment levels)."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in scorers."""
    from mmbridge.plugins.scorers.clip import ClipScorer
    from mmbridge.plugins.scorers.contrastive import ContrastiveScorer

    registry.add_scorer("contrastive", ContrastiveScorer)
    registry.add_scorer("clip", ClipScorer)
