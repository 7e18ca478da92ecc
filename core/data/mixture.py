"""A data mixture: several data sets read as one, each training split drawn from its sources
with sampling weights (xtuner's / prismatic's dataset mixtures; LLaVA-1.5's mix665k is one
such mixture written out as a file).

A ``data`` node (the run's, a ``stages.<name>.data``, or an ``evaluation.extra_data`` entry)
whose ``name`` is ``mixture``::

    name: mixture
    size: null          # samples per training split (null: the sum of its sources' sizes)
    sources:
      - {name: llava, train: /d/a.json, media_root: /d/a, weight: 0.7}
      - {name: shapes, weight: 0.3}

Each source is a data-set node plus its ``weight`` (> 0, normalised over the sources). The
training splits (every split but ``val`` and ``test``) are drawn: each of ``size`` draws picks
a source by weight, then that source's next sample in a seeded permutation (a new permutation
when a source is used up), so a small source repeats and a large one is subsampled. ``val``
and ``test`` are the sources' splits one after the other (an evaluation set stays whole). The
draw depends only on the seed and the sources, so a resumed run sees the same list.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mmbridge.contracts.types import Sample

#: Splits kept whole (the sources' samples in order) instead of drawn by weight.
WHOLE_SPLITS = ("val", "test")


def draw(
    parts: Sequence[Sequence[Sample]], weights: Sequence[float], size: int, seed: int | str
) -> list[Sample]:
    """``size`` samples from ``parts`` (one list per source), each draw's source chosen with
    probability ``weights[i] / sum(weights)``, its sample the next of a seeded permutation of
    that source (reshuffled when used up). Empty sources are never chosen."""
    live = [i for i, p in enumerate(parts) if p]
    if not live or size <= 0:
        return []
    rng = random.Random(f"mixture:{seed}")
    orders: dict[int, list[int]] = {}
    pos = dict.fromkeys(live, 0)
    out = []
    for i in rng.choices(live, weights=[weights[i] for i in live], k=size):
        if pos[i] == 0:
            orders[i] = list(range(len(parts[i])))
            rng.shuffle(orders[i])
        out.append(parts[i][orders[i][pos[i]]])
        pos[i] = (pos[i] + 1) % len(parts[i])
    return out


def mix_splits(
    sources: Sequence[dict[str, list[Sample]]],
    weights: Sequence[float],
    size: int | None,
    seed: int,
) -> dict[str, list[Sample]]:
    """The splits of a mixture of ``sources`` (each a split -> samples mapping): training
    splits drawn by :func:`draw` (``size`` draws, default the sum of the sources' sizes),
    ``val`` / ``test`` concatenated."""
    names: list[str] = []
    for splits in sources:
        names += [n for n in splits if n not in names]
    out: dict[str, list[Sample]] = {}
    for n in names:
        parts = [s.get(n, []) for s in sources]
        if n in WHOLE_SPLITS:
            out[n] = [x for p in parts for x in p]
        else:
            k = size if size is not None else sum(len(p) for p in parts)
            out[n] = draw(parts, weights, k, f"{seed}:{n}")
    return out
