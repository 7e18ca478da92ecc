"""Do AlignGPT's alignment levels find the corrupted captions? Scores and buckets the align
stage's training pairs exactly as a run would (the align stage's recipe, with its scorer, on the
run's encoder and cached features) and prints the agreement with the known corruption of
``data=shapes_noisy`` (rank correlations, AUROC, mean level per corruption kind).

    python scripts/aligngpt_levels.py                           # experiment=aligngpt (tiny)
    python scripts/aligngpt_levels.py data.n_train=2000         # any config override
    python scripts/aligngpt_levels.py experiment=aligngpt_quickstart
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str]) -> int:
    from mmbridge.config import compose
    from mmbridge.plugins.scorers.agreement import agreement
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.runtime.session import open_session
    from mmbridge.runtime.stage import stage_recipe

    overrides = list(argv)
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, "experiment=aligngpt")
    registry = load_registry()
    cfg = compose(overrides, registry)
    t0 = time.perf_counter()
    session = open_session(cfg, registry)
    t_session = time.perf_counter() - t0
    t0 = time.perf_counter()
    recipe = stage_recipe(session, "align")
    samples = recipe.annotate(session.data_of("align")[cfg.stages.align.split])
    t_levels = time.perf_counter() - t0
    result = agreement(samples)
    result.update(
        {
            "levels": getattr(recipe, "levels", None),
            "binning": getattr(recipe, "binning", None),
            "scorer": cfg.stages.align.recipe.scorer.name,
            "seconds_scoring": round(t_levels, 2),
            "seconds_session": round(t_session, 2),
        }
    )
    print(f"overrides: {' '.join(overrides)}")
    print("| metric | value |\n|---|---:|")
    for k, v in result.items():
        print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
