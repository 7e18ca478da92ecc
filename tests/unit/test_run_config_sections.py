"""The run's typed sections reach their consumers (issue 28): ``RunConfig``'s stages (``Stage``
with its ``Train`` / ``Lora`` / ``Optimizer`` sections), the ``trainer`` arguments, ``paths`` and
the model's component nodes. A config stored by an older version (missing keys) reads as the
schema's defaults, and those defaults are what the consumers (optimizer, LoRA, precision, the
Trainer's arguments, the step count) get: they take the section, not the raw config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import shared_registry
from omegaconf import OmegaConf
from torch import nn

from mmbridge.config import compose, schema
from mmbridge.config import sections as sections_mod
from mmbridge.config.model_spec import ModelConfig
from mmbridge.config.schema import EncoderLora, Lora, Optimizer, Stage, Train
from mmbridge.config.sections import TRAINER_DEFAULTS, section, stages_of
from mmbridge.model import precision
from mmbridge.model.lora import lora_settings
from mmbridge.model.precision import PrecisionDecision, plan_precision, run_precision
from mmbridge.runtime.config import RunConfig
from mmbridge.training.optimizers import make_optimizer, param_groups
from mmbridge.training.stages import data_parallel_size, frozen_encoders, stage_steps
from mmbridge.training.trainer import trainer_kwargs

BASE = ["experiment=tiny", "encoder.image_size=32"]


def _stored(*overrides: str, drop: tuple[str, ...] = ()):
    """A config as a checkpoint stores it (its ``config.yaml``: resolved YAML) without the
    dotted keys ``drop``: written by a version before they existed."""
    cfg = compose([*BASE, *overrides], shared_registry())
    stored = OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))
    for key in drop:
        parent, _, leaf = key.rpartition(".")
        del (OmegaConf.select(stored, parent) if parent else stored)[leaf]
    return stored


def test_stages_are_typed_with_their_sections_and_component_nodes_stay_mappings():
    cfg = compose(
        [*BASE, "stages.instruct.optimizer.lr=2e-4", "stages.instruct.lora.r=4"],
        shared_registry(),
    )
    run = RunConfig.parse(cfg)
    st = run.stages["instruct"]
    assert isinstance(st, Stage) and isinstance(st.train, Train) and isinstance(st.lora, Lora)
    assert isinstance(st.encoder_lora, EncoderLora) and isinstance(st.optimizer, Optimizer)
    assert (st.optimizer.lr, st.lora.r, st.train.llm) == (2e-4, 4, cfg.stages.instruct.train.llm)
    assert isinstance(st.recipe, dict) and st.recipe["name"] == cfg.stages.instruct.recipe.name
    assert run.schedule == list(cfg.schedule)
    assert run.scheduled == [run.stages[n] for n in cfg.schedule]
    assert run.trainer == OmegaConf.to_container(cfg.trainer, resolve=True)
    assert run.paths.data_dir == cfg.paths.data_dir and run.device == cfg.device
    assert run.model["connector"] == OmegaConf.to_container(cfg.connector, resolve=True)
    assert set(run.model) == {"llm", "encoder", "connector", "branches"}  # alignment: not set
    assert run.composed is cfg and run.to_yaml() == OmegaConf.to_yaml(cfg, resolve=True)


def test_a_stored_stage_missing_keys_gives_the_consumers_the_schema_defaults():
    stored = _stored(
        "stages.align.train.encoder=true",
        drop=(
            "stages.instruct.optimizer.betas",
            "stages.instruct.optimizer.min_lr_ratio",
            "stages.instruct.lora.target_modules",
            "stages.instruct.lora.use_rslora",
            "stages.instruct.checkpoint_every",
            "stages.align.train",  # a whole section: its defaults (encoder frozen)
        ),
    )
    run = RunConfig.parse(stored)
    st = run.stages["instruct"]
    assert st.optimizer.min_lr_ratio == Optimizer().min_lr_ratio and st.checkpoint_every is None
    assert st.optimizer.lr == stored.stages.instruct.optimizer.lr  # what it sets, kept
    # the LoRA settings PEFT gets
    settings = lora_settings(st.lora)
    assert settings["target_modules"] == Lora().target_modules
    assert settings["use_rslora"] is False and settings["r"] == stored.stages.instruct.lora.r
    # the optimizer: AdamW with the schema's betas
    opt = make_optimizer(param_groups(nn.Linear(2, 2), st.optimizer), st.optimizer)
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == tuple(Optimizer().betas)
    # the align stage's train section: the schema's (the encoder frozen), so features cache
    assert run.stages["align"].train == Train() and frozen_encoders(run.scheduled)
    assert not frozen_encoders([*run.scheduled, Stage(train=Train(encoder="last_n"))])
    assert stage_steps(st, 1000) == st.max_steps == stored.stages.instruct.max_steps


def test_stored_trainer_arguments_missing_keys_read_as_the_defaults(monkeypatch):
    stored = _stored(
        drop=(
            "trainer.precision",
            "trainer.accumulate_grad_batches",
            "trainer.devices",
            "trainer.num_nodes",
            "trainer.strategy",
        )
    )
    run = RunConfig.parse(stored)
    assert "precision" not in run.trainer  # Lightning's arguments as written
    asked = []
    monkeypatch.setattr(
        precision,
        "decide_precision",
        lambda requested, accelerator, **kw: (
            asked.append((requested, accelerator))
            or PrecisionDecision("32-true", "float32", "test")
        ),
    )
    decision = run_precision(run.trainer, run.paths)
    assert asked == [(TRAINER_DEFAULTS["precision"], stored.trainer.accelerator)]
    assert data_parallel_size(run.trainer) == TRAINER_DEFAULTS["devices"] == 1
    kw = trainer_kwargs(run.trainer, run.device, decision)
    assert kw["precision"] == "32-true" and "accumulate_grad_batches" not in kw
    assert kw == {**run.trainer, "precision": "32-true"}


def test_a_trainer_default_changed_in_one_place_reaches_every_reader(monkeypatch):
    run = RunConfig.parse(_stored(drop=("trainer.precision",)))
    monkeypatch.setitem(TRAINER_DEFAULTS, "precision", "bf16-true")
    assert plan_precision(run.trainer).precision == "bf16-true"
    assert run_precision(run.trainer, run.paths).precision == "bf16-true"  # no probe: it was set
    # the dtype rule of a bare weight dtype (the unsharded copy after FSDP) reads it too
    model = ModelConfig({"llm": {"name": "hf_causal", "dtype": "auto"}})
    full = Stage(train=Train(llm="full"))
    resolved = precision.resolve_auto_dtypes(model, [full], run.trainer, "bfloat16")
    assert resolved["llm"]["dtype"] == "bfloat16"  # bf16-true: no fp32 master weights
    monkeypatch.setitem(TRAINER_DEFAULTS, "precision", "auto")
    resolved = precision.resolve_auto_dtypes(model, [full], run.trainer, "bfloat16")
    assert resolved["llm"]["dtype"] == "float32"  # bf16-mixed: the trained LLM's fp32 masters


def test_a_stage_default_changed_in_the_schema_reaches_the_parsed_stage(monkeypatch):
    @dataclasses.dataclass
    class Changed(Optimizer):
        min_lr_ratio: float = 0.25

    monkeypatch.setattr(schema, "Optimizer", Changed)
    sections_mod._nested.cache_clear()  # Stage's field types, read again from the schema
    try:
        run = RunConfig.parse(_stored(drop=("stages.align.optimizer.min_lr_ratio",)))
        assert run.stages["align"].optimizer.min_lr_ratio == 0.25
        assert run.stages["instruct"].optimizer.min_lr_ratio != 0.25  # it sets its own
    finally:
        monkeypatch.undo()
        sections_mod._nested.cache_clear()


def test_lora_keys_passed_through_to_peft_stay_in_the_typed_section():
    cfg = compose(
        [*BASE, "+stages.instruct.lora.layers_to_transform=[0]", "stages.instruct.lora.r=2"],
        shared_registry(),
    )
    settings = lora_settings(RunConfig.parse(cfg).stages["instruct"].lora)
    assert settings["layers_to_transform"] == [0] and settings["r"] == 2
    # a stored run's stages (init_from reads its source's so) keep them as well
    source = stages_of(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)))
    assert lora_settings(source["instruct"].lora) == settings
    # a section without pass-through keys drops what the schema does not know
    assert section({"r": 3, "nope": 1}, Train) == Train()


def test_the_model_nodes_are_a_read_only_view():
    run = RunConfig.parse(compose(BASE, shared_registry()))
    node = run.model["encoder"]
    node["image_size"] = 1
    assert run.model["encoder"]["image_size"] == 32  # a copy was changed, not the run's
    decided = run.model.with_dtypes({"encoder": "bfloat16"})
    assert decided["encoder"]["dtype"] == "bfloat16" and run.model["encoder"] != decided["encoder"]
    with pytest.raises(KeyError, match="no component node at 'branches.audio.encoder'"):
        run.model.with_dtypes({"branches.audio.encoder": "float32"})


def test_paths_and_conversations_of_a_stored_config():
    stored = OmegaConf.create(
        {
            "paths": {"cache_dir": "/c"},  # an older version wrote the cache dir alone
            "conversation": {"name": "chatml"},
            "stages": {"align": {"conversation": {"name": "plain"}}, "instruct": {}},
        }
    )
    run = RunConfig.parse(stored)
    assert (run.paths.data_dir, run.paths.feature_cache_dir) == ("/c/data", "/c/features")
    assert run.conversation_of("align")[0].name == "plain"
    assert run.conversation_of("align")[1] == "stages.align.conversation"
    assert run.conversation_of("instruct") == run.conversation_of()
    assert run.conversation_of()[0].name == "chatml" and run.conversation_of()[1] == "conversation"
