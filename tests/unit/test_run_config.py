"""The run's config parsed once into typed sections (mmbridge.runtime.config.RunConfig): values
from the config, defaults from the schema where a (stored, older) config lacks a key."""

from __future__ import annotations

import dataclasses

from helpers import shared_registry
from omegaconf import OmegaConf, open_dict

import mmbridge.runtime.config as run_config
from mmbridge.config import compose
from mmbridge.config.schema import Evaluation, Loader
from mmbridge.runtime.config import RunConfig, section


def _cfg(*overrides: str):
    return compose(["experiment=tiny", *overrides], shared_registry())


def _stored(cfg):
    """``cfg`` as a checkpoint stores it: plain YAML (a composed config's sections are schema
    nodes, which have every key and delete none)."""
    return OmegaConf.create(OmegaConf.to_container(cfg))


def test_sections_carry_the_configs_values_typed():
    run = RunConfig.parse(
        _cfg(
            "evaluation.max_new_tokens=7",
            "loader.num_workers=2",
            "seed=5",
            "evaluation.wer_qtypes=[transcribe]",
        )
    )
    assert isinstance(run.evaluation, Evaluation) and isinstance(run.loader, Loader)
    assert run.evaluation.max_new_tokens == 7 and run.loader.num_workers == 2
    assert run.root.seed == 5 and run.root.schedule == ["align", "instruct"]
    assert run.evaluation.wer_qtypes == ["transcribe"] and type(run.evaluation.wer_qtypes) is list


def test_a_key_a_stored_config_lacks_takes_the_schema_default():
    cfg = _stored(_cfg("evaluation.tool_max_new_tokens=9"))
    with open_dict(cfg):  # a checkpoint's config written before these keys existed
        del cfg.evaluation["tool_max_new_tokens"], cfg.evaluation["reference_asr_tool"]
        del cfg.loader["group_by_length"], cfg["progress_every"]
    run = RunConfig.parse(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(Evaluation)}
    assert run.evaluation.tool_max_new_tokens == defaults["tool_max_new_tokens"] == 64
    assert run.evaluation.reference_asr_tool == defaults["reference_asr_tool"] == "asr"
    assert run.loader.group_by_length is False and run.root.progress_every == 50


def test_a_default_changed_in_the_schema_reaches_the_parsed_run(monkeypatch):
    @dataclasses.dataclass
    class Changed(Evaluation):
        tool_max_new_tokens: int = 7

    monkeypatch.setattr(run_config, "Evaluation", Changed)
    cfg = _stored(_cfg())
    with open_dict(cfg):
        del cfg.evaluation["tool_max_new_tokens"]
    assert RunConfig.parse(cfg).evaluation.tool_max_new_tokens == 7
    assert (
        RunConfig.parse(_cfg("evaluation.tool_max_new_tokens=3")).evaluation.tool_max_new_tokens
        == 3
    )


def test_section_leaves_unknown_keys_to_validation_and_accepts_plain_mappings():
    loader = section(OmegaConf.create({"num_workers": 1, "nope": 3}), Loader)
    assert loader == Loader(num_workers=1)
    assert (
        section(None, Loader) == Loader()
        and section({"max_text_tokens": 9}, Loader).max_text_tokens == 9
    )
