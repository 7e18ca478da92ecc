"""Schedules and optimiser groups as the field writes them ([F] issue 25 item 4): per-component
learning rates (LLaVA's ``mm_projector_lr``), no weight decay on biases and norm weights, and
``epochs`` resolved into steps from the stage's data, batch, accumulation and world size."""

from __future__ import annotations

import pytest
import torch
from helpers import shared_registry, stage_of

from mmbridge.config import compose
from mmbridge.config.schema import Stage
from mmbridge.errors import ConfigError
from mmbridge.model import assemble
from mmbridge.training.module import BridgeModule
from mmbridge.training.optimizers import param_groups
from mmbridge.training.stages import (
    check_schedule,
    configure_trainable,
    data_parallel_size,
    stage_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["experiment=tiny", "encoder.image_size=32"]


@pytest.fixture(scope="module")
def model_and_cfg():
    cfg = compose(
        [
            *BASE,
            "stages.instruct.train.llm=full",
            "stages.instruct.train.encoder=true",
            "stages.instruct.optimizer.lr=1e-4",
            "stages.instruct.optimizer.weight_decay=0.1",
            "stages.instruct.optimizer.connector_lr=2e-3",
            "stages.instruct.optimizer.encoder_lr=1e-5",
        ],
        shared_registry(),
    )
    torch.manual_seed(0)
    model = assemble(cfg, shared_registry())
    configure_trainable(model, stage_of(cfg, "instruct"))
    return model, cfg


def test_groups_per_component_with_their_learning_rates_and_decay(model_and_cfg):
    model, cfg = model_and_cfg
    opt = BridgeModule(model, stage_of(cfg, "instruct")).configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {
        "connector",
        "connector.no_decay",
        "encoder",
        "encoder.no_decay",
        "llm",
        "llm.no_decay",
    }
    lrs = {k: g["initial_lr"] for k, g in groups.items()}  # before the warm-up multiplier
    assert lrs == {
        "connector": 2e-3,
        "connector.no_decay": 2e-3,
        "encoder": 1e-5,
        "encoder.no_decay": 1e-5,
        "llm": 1e-4,
        "llm.no_decay": 1e-4,
    }  # llm_lr null: lr
    assert {k: g["weight_decay"] for k, g in groups.items()} == {
        "connector": 0.1,
        "connector.no_decay": 0.0,
        "encoder": 0.1,
        "encoder.no_decay": 0.0,
        "llm": 0.1,
        "llm.no_decay": 0.0,
    }
    # every trained parameter exactly once, each in its component's groups
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    branch = model.branches["image"]
    assert {id(p) for p in branch.connector.parameters()} == {
        id(p) for k in ("connector", "connector.no_decay") for p in groups[k]["params"]
    }
    assert {id(p) for p in branch.encoder.parameters()} == {
        id(p) for k in ("encoder", "encoder.no_decay") for p in groups[k]["params"]
    }


def test_no_decay_on_biases_and_norm_weights(model_and_cfg):
    model, cfg = model_and_cfg
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {
        g["name"]: {names[id(p)] for p in g["params"]}
        for g in param_groups(model, stage_of(cfg, "instruct").optimizer)
    }
    no_decay = set().union(*(v for k, v in groups.items() if k.endswith("no_decay")))
    decay = set().union(*(v for k, v in groups.items() if not k.endswith("no_decay")))
    assert "llm.model.model.norm.weight" in no_decay  # the Llama's final RMSNorm
    assert "llm.model.model.layers.0.input_layernorm.weight" in no_decay
    assert any(n.endswith("norm1.weight") for n in no_decay)  # the ViT's LayerNorm
    assert all(
        n.endswith("bias") or "norm" in n
        for n in no_decay
        if "cls_token" not in n and "pos_embed" not in n
    )
    assert "llm.model.model.layers.0.self_attn.q_proj.weight" in decay
    assert not any(n.endswith("bias") for n in decay)


def test_the_learning_rate_schedule_multiplies_every_group(model_and_cfg):
    model, cfg = model_and_cfg
    out = BridgeModule(model, stage_of(cfg, "instruct")).configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    for _ in range(3):
        opt.step()
        sched.step()
    ratio = {g["name"]: g["lr"] / g["initial_lr"] for g in opt.param_groups}
    assert len(set(round(r, 12) for r in ratio.values())) == 1


@pytest.mark.parametrize(
    ("epochs", "n", "batch", "world", "accumulate", "want"),
    [
        (1, 558_128, 32, 8, 1, 2181),  # LLaVA-1.5 stage 1: ceil(558128 / 256)
        (1, 665_298, 16, 8, 1, 5198),  # stage 2: ceil(665298 / 128)
        (2, 100, 16, 1, 1, 14),  # 7 batches per epoch (the last one short)
        (1, 100, 16, 1, 4, 2),  # 7 batches / 4 per optimizer step
        (0.5, 100, 10, 2, 1, 3),  # ceil(0.5 x 5)
    ],
)
def test_epochs_become_steps(epochs, n, batch, world, accumulate, want):
    stage = Stage(epochs=epochs, max_steps=None, batch_size=batch)
    assert stage_steps(stage, n, world, accumulate) == want
    assert stage_steps(Stage(epochs=None, max_steps=7, batch_size=batch), n) == 7


def test_world_size_from_the_trainer_config():
    assert data_parallel_size({"devices": 8, "num_nodes": 2}) == 16
    assert data_parallel_size({"devices": [0, 1]}) == 2
    assert data_parallel_size({"devices": "auto", "accelerator": "cpu"}) == 1


def test_a_stage_without_steps_or_epochs_is_refused():
    cfg = compose([*BASE, "stages.align.max_steps=null"], shared_registry())
    with pytest.raises(ConfigError, match=r"stages.align: max_steps and epochs are both null"):
        check_schedule(cfg)
    cfg = compose(
        [*BASE, "stages.align.max_steps=null", "stages.align.epochs=1"], shared_registry()
    )
    check_schedule(cfg)
    cfg = compose([*BASE, "stages.align.train.encoder=last_n"], shared_registry())
    with pytest.raises(ConfigError, match=r"set stages.align.train.encoder_last_n"):
        check_schedule(cfg)


def test_plan_shows_the_steps_of_an_epoch(capsys):
    from mmbridge.commands import plan as plan_command

    args = ["experiment=llava15_7b", "stages.align.max_steps=null", "stages.align.epochs=1"]
    with pytest.raises(ConfigError, match=r"stages.align.epochs=1: .* pass data_samples=N"):
        plan_command.main(args)
    assert plan_command.main([*args, "data_samples=558128"]) == 0
    # LLaVA-1.5's stage 1: one epoch of 558,128 pairs at global batch 256
    assert "stage align: 2,181 steps x global batch 256 (32 per GPU)" in capsys.readouterr().out
