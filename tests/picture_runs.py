"""One tiny finished run with a Q-Former connector, shared by the tests of the pictures (run and
sweep reports, attention maps, the demo, the browser checks): trained once per test session,
under pytest-xdist too (the first worker trains it under a file lock in the session's shared
temporary directory; the others wait and read it).

``experiment=tiny`` with a small Q-Former, the align stage only (2 steps): the LLM stays the
random tiny Llama, so answers are non-empty words, which the demo test compares with
``mmbridge generate``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

from filelock import FileLock
from helpers import shared_registry

import mmbridge

#: With MMBRIDGE_SCREENSHOTS set (the pictures are kept, for the docs), both stages of
#: experiment=tiny train for real, so the pictures show a model that learned something (minutes
#: on 2 CPU cores instead of seconds); the tests' checks hold for either run.
SHOWCASE_RUN = [
    "experiment=tiny",
    "connector=qformer",
    "connector.num_queries=8",
    "connector.hidden_dim=64",
    "connector.num_heads=2",
    "connector.num_layers=2",
    "stages.align.max_steps=20",
    "stages.align.val_every=10",
    "stages.instruct.max_steps=60",
    "stages.instruct.val_every=20",
    "evaluation.max_samples=24",
    "trainer.enable_progress_bar=false",
]
QFORMER_RUN = [
    "experiment=tiny",
    "connector=qformer",
    "connector.num_queries=8",
    "connector.hidden_dim=32",
    "connector.num_heads=2",
    "connector.num_layers=2",
    "schedule=[align]",
    "data.n_train=8",
    "data.n_val=4",
    "data.n_test=8",
    "evaluation.max_samples=8",
    "evaluation.val_samples=2",
    "evaluation.batch_size=8",
    "trainer.enable_progress_bar=false",
    "stages.align.batch_size=4",
    "stages.align.max_steps=2",
    "stages.align.val_every=1",
]


def shared_dir(tmp_path_factory) -> Path:
    """The session's temporary directory that every xdist worker shares (pytest's basetemp
    without xdist; its parent, the run's root, on a worker)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@cache
def qformer_run(root: Path) -> Path:
    """The run directory (it holds metrics.json, predictions.jsonl, checkpoints/final), trained
    under ``root/pictures`` once."""
    root = root / "pictures"
    done = root / "run_dir.txt"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "lock")):
        if not done.is_file():
            overrides = SHOWCASE_RUN if os.environ.get("MMBRIDGE_SCREENSHOTS") else QFORMER_RUN
            result = mmbridge.train(
                [
                    *overrides,
                    f"paths.output_root={root / 'outputs'}",
                    f"paths.cache_dir={root / 'cache'}",
                ],
                registry=shared_registry(),
            )
            done.write_text(str(result.run_dir))
    return Path(done.read_text())


@cache
def two_by_two_sweep(root: Path) -> Path:
    """A sweep directory of 2 configurations x 2 seeds made from :func:`qformer_run`'s files:
    each copy gets its own overrides, and configuration ``b`` answers the first two media
    questions the other way round (so the configurations disagree on them). Made per worker
    (each writes its own copy; report files are written into it)."""
    run = qformer_run(root)
    root = Path(tempfile.mkdtemp(prefix="sweep-", dir=run.parent))
    for name in ("a", "b"):
        for seed in (0, 1):
            d = root / f"variant={name},seed={seed}"
            shutil.copytree(
                run, d, ignore=shutil.ignore_patterns("checkpoints", "logs"), dirs_exist_ok=True
            )
            metrics = json.loads((d / "metrics.json").read_text())
            metrics["overrides"] = [f"+variant={name}", f"seed={seed}"]
            metrics["seed"] = seed
            lines = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
            if name == "b":
                flipped = 0
                for p in lines:
                    if p["mode"] == "media" and flipped < 2:
                        p["correct"], p["prediction"] = (
                            not p["correct"],
                            (p["answer"] if not p["correct"] else "something else"),
                        )
                        flipped += 1
                media = [p for p in lines if p["mode"] == "media"]
                metrics["test"]["exact_match"] = sum(p["correct"] for p in media) / len(media)
            (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
            (d / "metrics.json").write_text(json.dumps(metrics))
    return root
