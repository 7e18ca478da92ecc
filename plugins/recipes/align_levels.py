"""``align_levels``: AlignGPT's alignment-level assignment (Zhao et al., 2405.14129, §3.2,
alignment level-aware pre-training).

Every pre-training pair is scored by an image-text similarity scorer (CLIP in the paper; any
registered :class:`~mmbridge.contracts.scorer.Scorer` here), the pairs are ranked by score and
split into ``N`` levels, ``meta["align_level"]`` in ``0..N-1`` (``N-1`` = best aligned). Stage 1
then conditions each caption on its level's indicator (the ``aligngpt`` prefix). The samples are
turned into caption conversations as by ``caption_pretrain``.

Binning of the scores ``s`` (sorted ascending, ``S`` of them):

* ``count`` (default, as the paper's even split of the ranked pairs): the pair of rank
  ``r`` (0-based) gets level ``floor(r * N / S)``, so every level holds ``S/N`` pairs;
* ``width``: ``N`` equal-width intervals of ``[min s, max s]``; level ``k`` holds
  ``min s + k w <= s < min s + (k+1) w`` with ``w = (max s - min s) / N`` (the maximum in ``N-1``).

The scorer is fitted and the level boundaries are set on the first split annotated (the
stage's training split); later splits (validation) are scored by the same scorer and binned by
the same boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmbridge.contracts.recipe import RecipeContext
from mmbridge.contracts.types import Sample
from mmbridge.errors import ConfigError
from mmbridge.plugins.recipes.caption_pretrain import CaptionPretrainRecipe, caption_text

BINNINGS = ("count", "width")
DEFAULT_LEVELS = 8  # AlignGPT's default N (2405.14129)
LEVEL_KEY = "align_level"
SCORE_KEY = "align_score"


def assign_levels(
    scores: torch.Tensor, n: int, binning: str = "count"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels of ``scores [S]`` and the ``N-1`` boundaries that reproduce them on new scores.

    Returns:
        ``(levels [S] int64 in 0..n-1, edges [n-1])``; a new score ``x`` falls in level
        ``searchsorted(edges, x, right=True)`` (see :func:`apply_edges`).
    """
    if binning not in BINNINGS:
        raise ConfigError(f"recipe.binning: '{binning}' is not one of {', '.join(BINNINGS)}")
    if n < 1:
        raise ConfigError(f"recipe.levels: {n} must be >= 1")
    scores = scores.detach().double().flatten()
    s = len(scores)
    if s == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(max(0, n - 1), dtype=torch.double)
    if binning == "width":
        lo, hi = float(scores.min()), float(scores.max())
        edges = torch.tensor([lo + (hi - lo) * k / n for k in range(1, n)], dtype=torch.double)
        if hi == lo:  # one value: every pair is as aligned as the best
            edges = torch.full((n - 1,), -math.inf, dtype=torch.double)
        return apply_edges(scores, edges), edges
    order = torch.sort(scores, stable=True).indices
    levels = torch.empty(s, dtype=torch.long)
    levels[order] = torch.arange(s) * n // s
    ranked = scores[order]
    edges = torch.tensor(
        [ranked[min(s - 1, math.ceil(k * s / n))] for k in range(1, n)], dtype=torch.double
    )
    return levels, edges


def apply_edges(scores: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Levels ``[S]`` of new scores under boundaries from :func:`assign_levels`."""
    return torch.searchsorted(
        edges.double(), scores.detach().double().flatten().contiguous(), right=True
    )


class AlignLevelsRecipe(CaptionPretrainRecipe):
    """Caption conversations annotated with AlignGPT alignment levels.

    Args:
        scorer: The scorer node ``{name: <registered scorer>, **args}`` (conf group
            ``scorer``; default ``contrastive``).
        levels: ``N``; ``null`` takes the ``aligngpt`` prefix's number of levels (or 8 when
            the model has none, e.g. the baseline row of an ablation on the same data).
        binning: ``count`` (equal-count levels, default) or ``width`` (equal-width intervals).
        instructions: As for ``caption_pretrain``.
        caption_key: As for ``caption_pretrain``.

    ``meta["align_level"]`` is ``-1`` for samples without media or caption (not scored);
    ``meta["align_score"]`` keeps each score.
    """

    def __init__(
        self,
        scorer: Mapping[str, Any] | None = None,
        levels: int | None = None,
        binning: str = "count",
        instructions: list[str] | Mapping[str, list[str]] | None = None,
        caption_key: str = "caption",
    ) -> None:
        super().__init__(instructions=instructions, caption_key=caption_key)
        if binning not in BINNINGS:
            raise ConfigError(f"recipe.binning: '{binning}' is not one of {', '.join(BINNINGS)}")
        if levels is not None and (isinstance(levels, bool) or int(levels) < 2):
            raise ConfigError(f"recipe.levels: {levels!r} must be an integer >= 2 or null")
        self.scorer_node = dict(scorer or {"name": "contrastive"})
        self.levels = int(levels) if levels is not None else None
        self.binning = binning
        self.scorer = None
        self.edges: torch.Tensor | None = None

    def setup(self, context: RecipeContext) -> None:
        from mmbridge.config.build import build

        prefix_levels = getattr(context.model.prefix, "levels", None)
        if self.levels is None:
            self.levels = int(prefix_levels or DEFAULT_LEVELS)
        elif prefix_levels is not None and int(prefix_levels) != self.levels:
            raise ConfigError(
                f"recipe.levels={self.levels} but alignment.levels={prefix_levels}; "
                f"set one of them (recipe.levels: null follows the alignment)"
            )
        self.scorer = build(context.registry, "scorer", self.scorer_node, "recipe.scorer")
        self.scorer.setup(context)

    def _scorable(self, s: Sample) -> bool:
        return bool(s.media) and caption_text(s, self.caption_key) is not None

    def annotate(self, samples: Sequence[Sample]) -> list[Sample]:
        if self.scorer is None:
            raise ConfigError(
                "align_levels: setup(context) must run before annotate (the training loop calls it)"
            )
        idx = [i for i, s in enumerate(samples) if self._scorable(s)]
        pairs = [samples[i] for i in idx]
        scores = torch.zeros(0)
        if pairs:
            if self.edges is None:
                self.scorer.fit(pairs)
                scores = self.scorer.score(pairs)
                levels, self.edges = assign_levels(scores, self.levels, self.binning)
            else:
                scores = self.scorer.score(pairs)
                levels = apply_edges(scores, self.edges)
        out = [s.replace(meta={**s.meta, LEVEL_KEY: -1}) for s in samples]
        for k, i in enumerate(idx):
            out[i].meta[LEVEL_KEY] = int(levels[k])
            out[i].meta[SCORE_KEY] = float(scores[k])
        return out


COMPONENTS = {"recipe": {"align_levels": AlignLevelsRecipe}}
