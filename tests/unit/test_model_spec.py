"""The model config's component nodes listed once (mmbridge.model_spec), and the two readers
that take them from there: validation and the checkpoint's component record."""

from __future__ import annotations

import pytest
from helpers import shared_registry

from mmbridge.config import compose
from mmbridge.errors import ConfigError
from mmbridge.model_spec import ComponentNode, model_nodes, node_at
from mmbridge.training.checkpoint import component_origins
from mmbridge.validation import validate_config


def test_the_nodes_of_a_model_with_a_branch_and_a_prefix():
    cfg = {"llm": {}, "encoder": {}, "connector": {}, "alignment": {"name": "aligngpt"},
           "branches": {"audio": {"encoder": {}, "connector": {}}, "video": None}}
    assert model_nodes(cfg) == [
        ComponentNode("llm", "llm"), ComponentNode("encoder", "encoder"),
        ComponentNode("connector", "connector", ("in_dim", "out_dim")),
        ComponentNode("branches.audio.encoder", "encoder"),
        ComponentNode("branches.audio.connector", "connector", ("in_dim", "out_dim")),
        ComponentNode("alignment", "prefix", ("dim",))]
    assert [n.key for n in model_nodes({"branches": {}})] == ["llm", "encoder", "connector"]
    assert node_at(cfg, "alignment.name") == "aligngpt" and node_at(cfg, "branches.video.x") is None


def test_validation_checks_every_listed_node_under_its_key():
    registry = shared_registry()
    cfg = compose(["experiment=tiny", "+branches.audio.encoder.name=whisper",
                   "+branches.audio.connector.name=nope"], registry)
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
