"""``stages.<name>.epochs`` in a real run ([F] issue 25 item 4): the stage trains exactly the
steps its epochs make of its data (``ceil(epochs x ceil(n / batch))``), every sample seen as
often as the epochs say, and the learning-rate schedule spans those steps."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import shared_registry

from mmbridge.config import compose
from mmbridge.config.validation import validate_config


@pytest.mark.slow
def test_two_epochs_of_ten_samples_in_batches_of_four_are_six_steps(tmp_path):
    from mmbridge.runtime.config import RunConfig
    from mmbridge.runtime.train import train

    overrides = [
        "experiment=tiny",
        "schedule=[align]",
        "data.n_train=10",
        "data.n_val=4",
        "data.n_test=4",
        "stages.align.max_steps=null",
        "stages.align.epochs=2",
        "stages.align.batch_size=4",
        "stages.align.val_every=100",
        "evaluation.max_samples=4",
        "evaluation.val_samples=2",
        "debug.record_sample_ids=true",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = compose(overrides, shared_registry())
    validate_config(cfg, shared_registry())
    metrics = train(RunConfig.parse(cfg), shared_registry(), tmp_path / "run")
    align = metrics["stages"]["align"]
    assert align["steps"] == align["max_steps"] == 6  # 3 batches (4 + 4 + 2) per epoch
    ids = json.loads((tmp_path / "run" / "debug" / "align_rank0_ids.json").read_text())["ids"]
    assert len(ids) == 20 and set(Counter(ids).values()) == {2}  # each sample twice
