"""How well alignment scores and levels agree with a known corruption of the captions
(``meta["caption_noise"]`` of ``data=shapes_noisy``): rank correlations and AUROC."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from mmbridge.contracts.types import Sample

#: Severity of each corruption kind (higher = worse aligned); unknown kinds count as 1.
SEVERITY = {"none": 0, "wrong_colour": 1, "wrong_shape": 1, "unrelated": 2}


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``[S]`` (0-based, float) with ties sharing their mean rank."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.double)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.double).index_add_(0, inverse, r)
    counts = torch.zeros(len(values), dtype=torch.double).index_add_(0, inverse, torch.ones_like(r))
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation (Pearson correlation of the tie-averaged ranks); ``nan``
    when either side is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / den) if den > 0 else float("nan")


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    positive = positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = ranks(scores)
    return float((r[positive].sum().item() - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg))


def agreement(
    samples: Sequence[Sample],
    score_key: str = "align_score",
    level_key: str = "align_level",
    noise_key: str = "caption_noise",
) -> dict[str, float]:
    """Agreement of annotated samples' scores and levels with their known corruption.

    Returns ``spearman_score_clean`` (score vs clean = 1 / corrupted = 0),
    ``spearman_level_severity`` (level vs minus :data:`SEVERITY`), ``auroc_clean``,
    ``mean_level/<kind>`` and ``share/<kind>``, ``n``.
    """
    rows = [s for s in samples if noise_key in s.meta and s.meta.get(level_key, -1) >= 0]
    if not rows:
        return {"n": 0}
    kinds = [str(s.meta[noise_key]) for s in rows]
    score = torch.tensor([float(s.meta[score_key]) for s in rows])
    level = torch.tensor([float(s.meta[level_key]) for s in rows])
    clean = torch.tensor([k == "none" for k in kinds])
    severity = torch.tensor([float(SEVERITY.get(k, 1)) for k in kinds])
    out = {
        "n": float(len(rows)),
        "spearman_score_clean": spearman(score, clean.double()),
        "spearman_level_severity": spearman(level, -severity),
        "auroc_clean": auroc(score, clean),
    }
    for kind, n in sorted(Counter(kinds).items()):
        sel = torch.tensor([k == kind for k in kinds])
        out[f"mean_level/{kind}"] = float(level[sel].mean())
        out[f"share/{kind}"] = n / len(rows)
    return out
