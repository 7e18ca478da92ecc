"""One registry per run, passed down: a command builds the plugin manager once and every
component that resolves a name (an offline model name in ``llm.path``, a recipe's tool names)
uses that registry, so an in-process plugin is visible everywhere."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest

import mmbridge
from mmbridge.config import compose
from mmbridge.config.build import build
from mmbridge.contracts.recipe import RecipeContext
from mmbridge.contracts.tools import Tool
from mmbridge.contracts.types import Sample
from mmbridge.errors import AssetError, ConfigError
from mmbridge.model import assemble
from mmbridge.registry import hookspecs
from mmbridge.registry.assets import CACHE_ENV, Asset, resolve_model_path
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.testing.tiny import build_tiny_llama
from mmbridge.tool_runtime import parse_calls


@pytest.fixture
def builds(monkeypatch) -> list[pluggy.PluginManager]:
    """Every mmbridge plugin manager made while the test runs (whoever makes it)."""
    made: list[pluggy.PluginManager] = []

    class Counting(pluggy.PluginManager):
        def __init__(self, project_name: str) -> None:
            super().__init__(project_name)
            if project_name == hookspecs.PROJECT:
                made.append(self)

    monkeypatch.setattr(pluggy, "PluginManager", Counting)
    return made


def test_one_train_run_builds_the_plugin_manager_once(builds, tmp_path, monkeypatch):
    from mmbridge.cli import main

    monkeypatch.setenv("MMBRIDGE_DISABLE_PLUGINS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    # experiment=tiny: its llm.path is the `tiny-llama` asset, resolved through the registry
    code = main(
        [
            "train",
            "experiment=tiny",
            "data.n_train=8",
            "data.n_val=4",
            "data.n_test=4",
            "evaluation.max_samples=4",
            "evaluation.val_samples=2",
            "evaluation.batch_size=4",
            "evaluation.baselines=false",
            "trainer.enable_progress_bar=false",
            "stages.align.batch_size=4",
            "stages.align.max_steps=1",
            "stages.align.val_every=1",
            "stages.instruct.batch_size=4",
            "stages.instruct.max_steps=1",
            "stages.instruct.val_every=1",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run}",
        ]
    )
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stages"]["align"]["steps"] == 1 and metrics["test"]["n"] == 4
    assert len(builds) == 1


# -- an in-process plugin is seen by assembly and by the recipes --------------------------------
class _TinyLlamaAsset(Asset):
    """An offline model that only an in-process plugin knows: a tiny Llama."""

    format = "hf"
    source = "mmbridge.testing.tiny"
    conversions: ClassVar[int] = 0

    def source_available(self) -> bool:
        return True

    def convert(self, out_dir: Path) -> str:
        type(self).conversions += 1
        build_tiny_llama(out_dir, hidden=32, layers=1, heads=2, intermediate=64)
        return "seeded random weights"


class _EchoTool(Tool):
    """Repeats its text (a third-party tool that sets no ``name`` of its own)."""

    description = "Repeat the text."
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    }

    def __call__(self, text: str, **_: Any) -> str:
        return text


class _InProcess:
    @staticmethod
    @mmbridge.hookimpl
    def register_components(registry) -> None:
        registry.add_asset("inproc-llama", _TinyLlamaAsset)
        registry.add_tool("echo", _EchoTool)


def test_an_in_process_asset_is_resolved_during_assembly(tmp_path, monkeypatch, builds):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    registry = load_registry(autoload=False, extra_plugins={"inproc": _InProcess()})
    cfg = compose(["experiment=tiny", "llm.path=inproc-llama"], registry)
    _TinyLlamaAsset.conversions = 0
    model = assemble(cfg, registry)
    where = tmp_path / "cache" / "assets" / "inproc-llama"
    assert model.llm.local_path == str(where) and _TinyLlamaAsset.conversions == 1
    assert model.llm.hidden_size == 32 and len(model.llm.decoder_layers) == 1
    assert model.llm.init_args == {
        "name": "hf_causal",
        "path": "inproc-llama",
        "gguf_file": None,
        "dtype": cfg.llm.dtype,
        "chat_template": None,
        "reuse_prefix_kv": "auto",
    }
    assert len(builds) == 1  # assembly built no registry of its own


def test_the_registry_is_injected_by_build_and_never_a_config_key(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    registry = load_registry(autoload=False, extra_plugins={"inproc": _InProcess()})
    node = {"name": "hf_causal", "path": "inproc-llama"}
    assert build(registry, "llm", node, "llm").local_path == str(
        tmp_path / "cache" / "assets" / "inproc-llama"
    )
    with pytest.raises(
        ConfigError, match=r"llm\.registry: set by the run \(its registry\), not by the config"
    ):
        build(registry, "llm", {**node, "registry": "x"}, "llm")
    # outside a run (no registry), a bare name cannot be told from a model name: a clear error
    with pytest.raises(
        AssetError,
        match="llm.path: 'inproc-llama' is not a local path, and an offline "
        "model name needs the run's registry",
    ):
        resolve_model_path("inproc-llama", None, key="llm.path")
    assert resolve_model_path(str(tmp_path), None) == str(tmp_path)
    assert resolve_model_path("org/model", None) == "org/model"  # a hub id passes through


def test_tool_use_finds_in_process_tools_in_the_run_registry(tmp_path, builds):
    from mmbridge.plugins.recipes.tool_use import ToolUseRecipe

    registry = load_registry(autoload=False, extra_plugins={"inproc": _InProcess()})
    recipe = build(
        registry, "recipe", {"name": "tool_use", "tools": ["echo"], "no_tool_ratio": 0.0}, "recipe"
    )
    assert isinstance(recipe, ToolUseRecipe)
    recipe.setup(RecipeContext(registry=registry, model=None, tables={}, cache_dir=tmp_path))
    assert len(builds) == 1  # the recipe built no registry of its own
    # the prompt lists the registered name, though the class sets none
    assert '{"name": "echo", "description": "Repeat the text."' in recipe.prompt
    sample = Sample(
        id="s",
        conversations=[{"from": "human", "value": "say hi"}, {"from": "gpt", "value": "hi"}],
        meta={"tool_calls": [{"name": "echo", "arguments": {"text": "hi"}}]},
    )
    (out,) = recipe.annotate([sample])
    assert out.meta["tool_results"] == [
        {"name": "echo", "arguments": {"text": "hi"}, "result": "hi", "source": "tool"}
    ]
    turns = recipe(out, random.Random(0)).conversations
    assert [t["from"] for t in turns] == ["system", "human", "gpt", "tool", "gpt"]
    _, calls = parse_calls(turns[2]["value"])
    assert [(c.name, c.arguments) for c in calls] == [("echo", {"text": "hi"})]
