"""A default changed in one place (the schema's section dataclass, read through
mmbridge.runtime.config.RunConfig) takes effect in the training path (the session ``train``
opens) and in the evaluation path (a checkpoint's session), for a config that does not set the
key (one stored before the key existed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import shared_registry
from omegaconf import open_dict

import mmbridge.runtime.config as run_config
from mmbridge.config import compose
from mmbridge.config.schema import Evaluation, Loader
from mmbridge.model import assemble
from mmbridge.runtime.session import open_session, session_from_checkpoint
from mmbridge.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def changed_defaults(monkeypatch):
    """``loader.max_text_tokens`` and ``evaluation.max_new_tokens`` with other defaults."""

    @dataclasses.dataclass
    class ChangedLoader(Loader):
        max_text_tokens: int = 40

    @dataclasses.dataclass
    class ChangedEvaluation(Evaluation):
        max_new_tokens: int = 5

    monkeypatch.setattr(run_config, "Loader", ChangedLoader)
    monkeypatch.setattr(run_config, "Evaluation", ChangedEvaluation)


def _without_the_keys():
    cfg = compose(["experiment=tiny", "encoder.image_size=32"], shared_registry())
    assert cfg.loader.max_text_tokens != 40 and cfg.evaluation.max_new_tokens != 5
    with open_dict(cfg):
        del cfg.loader["max_text_tokens"], cfg.evaluation["max_new_tokens"]
    return cfg


def test_a_schema_default_reaches_training_and_evaluation(changed_defaults, tmp_path):
    registry = shared_registry()
    cfg = _without_the_keys()
    trained = open_session(cfg, registry, with_data=False)  # what `train` opens
    assert trained.chat.max_length == 40 and trained.run.evaluation.max_new_tokens == 5
    torch.manual_seed(0)
    out = tmp_path / "run" / "checkpoints" / "final"
    save_checkpoint(assemble(cfg, registry), cfg, out, [], registry=registry)
    evaluated, _ = session_from_checkpoint(str(out), with_data=False, registry=registry)
    assert evaluated.chat.max_length == 40 and evaluated.run.evaluation.max_new_tokens == 5
    assert evaluated.run.loader == trained.run.loader  # one parse, one set of defaults
