"""A run bounded by wall-clock time ([M] item 3): the stages share the budget by fraction, each
stops when its share is used (with its checkpoint and a closing validation), the learning rate
follows the share of the budget used, and the evaluation follows."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
from helpers import mmbridge_exe

from mmbridge.config.schema import Stage
from mmbridge.errors import ConfigError
from mmbridge.runtime.train import stage_fractions
from mmbridge.training.module import progress_warmup_cosine, warmup_cosine


def test_stage_fractions_normalise_and_default_to_equal_shares():
    cfg = {
        "align": Stage(budget_fraction=0.3),
        "instruct": Stage(budget_fraction=0.9),
        "a": Stage(),
        "b": Stage(),
    }
    assert stage_fractions(cfg, ["align", "instruct"]) == pytest.approx(
        {"align": 0.25, "instruct": 0.75}
    )
    assert stage_fractions(cfg, ["instruct"]) == {
        "instruct": 1.0
    }  # align already done: all of what is left
    assert stage_fractions(cfg, ["a", "b"]) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ConfigError, match="stages.a.budget_fraction is not set"):
        stage_fractions(cfg, ["align", "a"])


@pytest.mark.parametrize(
    ("progress", "want"),
    [
        (0.0, 0.01),
        (0.025, 0.5),
        (0.05, 1.0),
        (1.0, 0.1),
        (2.0, 0.1),
        (0.525, 0.1 + 0.9 * 0.5),  # half-way through the decay: the cosine's midpoint
    ],
)
def test_the_budget_schedule_follows_progress(progress, want):
    assert progress_warmup_cosine(progress, warmup_ratio=0.05, min_ratio=0.1) == pytest.approx(want)


def test_the_budget_schedule_matches_the_step_schedule_at_the_same_progress():
    total, warmup = 200, 10
    for step in (10, 50, 105, 150, 199):
        assert progress_warmup_cosine(step / total, 0.05, 0.1) == pytest.approx(
            warmup_cosine(step, total, warmup, 0.1), abs=1e-9
        )
    assert math.isclose(progress_warmup_cosine(1.0, 0.0, 0.0), 0.0, abs_tol=1e-12)


@pytest.mark.slow
def test_a_time_budget_ends_each_stage_with_its_checkpoint_then_evaluates(tmp_path):
    run = tmp_path / "run"
    args = [
        "experiment=tiny",
        "data.n_train=48",
        "data.n_val=8",
        "data.n_test=8",
        "evaluation.max_samples=8",
        "evaluation.val_samples=4",
        "evaluation.batch_size=8",
        "stages.align.batch_size=8",
        "stages.instruct.batch_size=8",
        "budget_minutes=0.6",
        "stages.align.budget_fraction=0.25",
        "stages.instruct.budget_fraction=0.75",
        "stages.align.max_steps=100000",
        "stages.align.val_every=100000",
        "stages.instruct.max_steps=100000",
        "stages.instruct.val_every=100000",
        "stages.align.checkpoint_every=5",
        "stages.instruct.checkpoint_every=5",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
    ]
    out = subprocess.run(
        [mmbridge_exe(), "train", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"},
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    for name in ("align", "instruct"):
        st = m["stages"][name]
        assert 0 < st["steps"] < 100000 and st["budget_s"] > 0
        # the val curve starts at step 0 and is closed where the budget stopped the stage
        assert [h["step"] for h in st["history"]] == [0.0, float(st["steps"])]
        assert (run / "checkpoints" / f"{name}_final" / "weights.safetensors").is_file()
    # the instruct stage got about three times the align stage's training time
    a, i = m["stages"]["align"]["budget_s"], m["stages"]["instruct"]["budget_s"]
    assert 1.5 < i / a < 6
    assert "time budget reached" in out.stdout + out.stderr
    assert m["test"]["n"] == 8 and "exact_match" in m["test"]
