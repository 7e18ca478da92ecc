"""The model config's component nodes listed once (mmbridge.config.model_spec), and the readers that
take them from there: validation, the assembly and the plan, the dtype resolution, the
checkpoint's component record, the bundle and the model card."""

from __future__ import annotations

import pytest
from helpers import shared_registry
from omegaconf import OmegaConf

from mmbridge.config import compose, model_spec
from mmbridge.config.model_spec import ComponentNode, model_nodes, node_at
from mmbridge.config.validation import validate_config
from mmbridge.errors import AssemblyError, ConfigError
from mmbridge.export.bundle import _model_leaves
from mmbridge.export.card import _component_rows
from mmbridge.model import assemble
from mmbridge.model.precision import PrecisionDecision, component_dtypes, resolve_auto_dtypes
from mmbridge.runtime.config import RunConfig
from mmbridge.runtime.plan import build_meta_model
from mmbridge.training.checkpoint import component_origins


def test_the_nodes_of_a_model_with_a_branch_and_a_prefix():
    cfg = {
        "llm": {},
        "encoder": {},
        "connector": {},
        "alignment": {"name": "aligngpt"},
        "branches": {"audio": {"encoder": {}, "connector": {}}, "video": None},
    }
    assert model_nodes(cfg) == [
        ComponentNode("llm", "llm"),
        ComponentNode("encoder", "encoder"),
        ComponentNode("connector", "connector", ("in_dim", "out_dim")),
        ComponentNode("branches.audio.encoder", "encoder"),
        ComponentNode("branches.audio.connector", "connector", ("in_dim", "out_dim")),
        ComponentNode("alignment", "prefix", ("dim",)),
    ]
    assert [n.key for n in model_nodes({"branches": {}})] == ["llm", "encoder", "connector"]
    assert node_at(cfg, "alignment.name") == "aligngpt" and node_at(cfg, "branches.video.x") is None


def test_validation_checks_every_listed_node_under_its_key():
    registry = shared_registry()
    cfg = compose(
        [
            "experiment=tiny",
            "+branches.audio.encoder.name=whisper",
            "+branches.audio.connector.name=nope",
        ],
        registry,
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, registry)
    assert "branches.audio.connector.name" in str(err.value) and "nope" in str(err.value)
    validate_config(compose(["experiment=tiny"], registry), registry)  # in_dim / out_dim injected


def test_the_checkpoint_records_each_listed_component_and_the_data():
    cfg = compose(["experiment=tiny"], shared_registry())
    origins = component_origins(cfg, shared_registry())
    assert set(origins) == {"llm", "encoder", "connector", "data"}
    assert origins["connector"]["kind"] == "connector" and origins["connector"]["name"] == "mlp"
    assert origins["data"]["kind"] == "dataset"


@pytest.fixture
def extra_node_spec(monkeypatch):
    """mmbridge.config.model_spec with one more node pair (an encoder and its connector at
    ``extra``): the only place changed."""
    monkeypatch.setattr(
        model_spec,
        "OPTIONAL_NODES",
        model_spec.OPTIONAL_NODES
        + (
            ComponentNode("extra.encoder", "encoder"),
            ComponentNode("extra.connector", "connector", model_spec.CONNECTOR_ARGS),
        ),
    )


def _with_extra(registry, connector: str = "mlp"):
    cfg = compose(["experiment=tiny"], registry)
    OmegaConf.set_struct(cfg, False)
    cfg.extra = {"encoder": OmegaConf.to_container(cfg.encoder), "connector": {"name": connector}}
    return cfg


def test_a_node_added_to_the_spec_is_read_by_every_reader(extra_node_spec):
    registry = shared_registry()
    cfg = _with_extra(registry)
    assert [n.key for n in model_spec.model_nodes(cfg)][-2:] == ["extra.encoder", "extra.connector"]
    # validation checks it under its key
    with pytest.raises(ConfigError) as err:
        validate_config(_with_extra(registry, connector="nope"), registry)
    assert "extra.connector.name" in str(err.value) and "nope" in str(err.value)
    # the assembly builds it as a second branch (the tiny timm ViT twice: two image branches)
    with pytest.raises(AssemblyError, match="extra and encoder both encode 'image'"):
        assemble(cfg, registry)
    # the plan's meta model goes through the same branches (and plans one only)
    with pytest.raises(ConfigError, match="main encoder branch only"):
        build_meta_model(cfg, registry)
    # the checkpoint's record, the model card, dtype resolution, the bundle's file scan
    origins = component_origins(cfg, registry)
    assert (
        origins["extra.encoder"]["kind"] == "encoder"
        and origins["extra.connector"]["name"] == "mlp"
    )
    rows = "\n".join(_component_rows(RunConfig.parse(cfg).model, origins))
    assert "| extra.encoder | timm |" in rows and "| extra.connector | mlp |" in rows
    cfg.encoder.dtype = cfg.extra.encoder.dtype = "auto"
    decision = PrecisionDecision("bf16-true", "bfloat16", "test")
    run = RunConfig.parse(cfg)  # the run's model nodes: the spec's, "extra" included
    dtypes = component_dtypes(run.model, run.scheduled, run.trainer, decision)
    assert dtypes == {"encoder": "bfloat16", "extra.encoder": "bfloat16"}
    resolved = resolve_auto_dtypes(run.model, run.scheduled, run.trainer, decision)
    assert resolved["extra"]["encoder"]["dtype"] == "bfloat16"
    leaves = dict(_model_leaves(run.model))
    assert leaves["extra.encoder.dtype"] == "auto" and "extra.connector.name" not in leaves


def test_a_branch_without_its_connector_is_named():
    cfg = {"encoder": {}, "connector": {}, "branches": {"audio": {"encoder": {"name": "x"}}}}
    with pytest.raises(ConfigError, match="branches.audio: needs both 'encoder' and 'connector'"):
        model_spec.branch_nodes(cfg)
    cfg["branches"]["audio"]["connector"] = {"name": "mlp"}
    assert [b.prefix for b in model_spec.branch_nodes(cfg)] == ["", "branches.audio."]
    assert model_spec.branch_problems({"branches": {"a": {"encoder": {}}, "b": 3, "c": None}}) == [
        "branches.a: needs both 'encoder' and 'connector'",
        "branches.b: needs both 'encoder' and 'connector'",
    ]
    with pytest.raises(ConfigError, match="the model config: needs both"):
        model_spec.branch_nodes({"encoder": {}})
