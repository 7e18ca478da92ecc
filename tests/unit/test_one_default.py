"""A default changed in one place (the schema's section dataclass) takes effect everywhere:
composed configs (mmbridge.config.store registers the schema as the nodes conf/ starts from, so
no YAML repeats it), the typed mmbridge.runtime.config.RunConfig, and what the run reads -- the
stage's data set, the evaluation settings -- in training and in evaluation, also for a config
that does not set the key (one stored before the key existed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import shared_registry
from omegaconf import OmegaConf, open_dict

import mmbridge.runtime.config as run_config
from mmbridge.config import compose
from mmbridge.config.schema import Evaluation, Loader, Stage
from mmbridge.model import assemble
from mmbridge.runtime.config import RunConfig
from mmbridge.runtime.session import open_session, session_from_checkpoint
from mmbridge.runtime.stage import prepare_stage
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
    composed = compose(["experiment=tiny", "encoder.image_size=32"], shared_registry())
    cfg = OmegaConf.create(OmegaConf.to_container(composed))  # stored: plain YAML
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


def change_default(monkeypatch, cls: type, name: str, value) -> None:
    """What editing the default of ``cls.name`` in mmbridge/config/schema.py does, for this test
    only: the field's default, the class attribute and the constructor's default."""
    field = cls.__dataclass_fields__[name]
    assert field.default_factory is dataclasses.MISSING  # a plain default
    monkeypatch.setattr(field, "default", value)
    monkeypatch.setattr(cls, name, value)
    init, names = cls.__init__, [f.name for f in dataclasses.fields(cls)]
    assert len(init.__defaults__) == len(names)  # every field has a default
    monkeypatch.setattr(
        init,
        "__defaults__",
        tuple(value if n == name else d for n, d in zip(names, init.__defaults__, strict=True)),
    )


def test_a_default_changed_in_the_schema_alone_takes_effect_everywhere(monkeypatch, tmp_path):
    change_default(monkeypatch, Evaluation, "max_new_tokens", 5)
    change_default(monkeypatch, Stage, "split", "val")
    registry = shared_registry()
    overrides = ["data.n_train=8", "data.n_val=6", "data.n_test=4", f"paths.data_dir={tmp_path}"]
    cfg = compose(["experiment=tiny", "encoder.image_size=32", *overrides], registry)
    # the composed config: neither key is set by conf/ (train.yaml, stage/, experiment/tiny.yaml)
    assert cfg.evaluation.max_new_tokens == 5
    assert cfg.stages.align.split == cfg.stages.instruct.split == "val"
    assert RunConfig.parse(cfg).evaluation.max_new_tokens == 5  # the typed sections
    session = open_session(cfg, registry, cache=False)
    assert session.run.evaluation.max_new_tokens == 5  # what the evaluation runner is given
    stage = prepare_stage(session, "align", check=False)  # the stage trains on its split
    assert stage.train_ds.split == "val" and len(stage.train_ds) == len(session.splits["val"]) == 6
