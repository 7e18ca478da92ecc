"""Every bad config value or command option is one clear error before anything is built: the
message names the key, the bad value and what is valid; all problems are reported together;
outputs are checked writable at start; `resume=` applies safe overrides and refuses the rest."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest
from helpers import shared_registry
from omegaconf import OmegaConf

from mmbridge.commands.evaluate import check_outputs, parse_kv, write_outputs
from mmbridge.commands.sweep import check_options
from mmbridge.config import builtin_conf_dir, compose, group_options
from mmbridge.config.preflight import resume_config, run_root_error
from mmbridge.config.schema import SECTIONS, Root, Stage
from mmbridge.config.validation import config_errors, override_errors, validate_config
from mmbridge.errors import ConfigError
from mmbridge.registry import Origin, Registry
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.training.stages import check_schedule


@pytest.fixture(scope="module")
def registry():
    return load_registry(autoload=False)


def tiny(*overrides: str, registry=None):
    return compose(["experiment=tiny", *overrides], registry)


# (override, the key the message must name, the value it must show, words of what is valid)
BAD = [
    ("stages.align.optimizer.lr=abc", "stages.align.optimizer.lr", "'abc'", "> 0"),
    ("stages.align.optimizer.lr=-1", "stages.align.optimizer.lr", "-1", "> 0"),
    ("stages.align.optimizer.lr=nan", "stages.align.optimizer.lr", "nan", "finite"),
    ("stages.instruct.optimizer.lr=inf", "stages.instruct.optimizer.lr", "inf", "finite"),
    ("stages.align.max_steps=abc", "stages.align.max_steps", "'abc'", ">= 1"),
    ("stages.align.max_steps=0", "stages.align.max_steps", "0", ">= 1"),
    ("stages.align.val_every=0", "stages.align.val_every", "0", ">= 1"),
    ("stages.instruct.batch_size=-4", "stages.instruct.batch_size", "-4", ">= 1"),
    ("stages.align.batch_size=2.5", "stages.align.batch_size", "2.5", "integer"),
    ("seed=abc", "seed", "'abc'", "integer"),
    ("seed=-1", "seed", "-1", "0..4294967295"),
    ("connector.depth=abc", "connector.depth", "'abc'", "integer"),
    ("encoder.image_size=big", "encoder.image_size", "'big'", "integer"),
    ("+stages.align.max_step=5", "stages.align.max_step", "5", "did you mean 'max_steps'"),
    ("+loader.max_txt_tokens=3", "loader.max_txt_tokens", "3", "did you mean 'max_text_tokens'"),
    ("+evaluation.max_sample=4", "evaluation.max_sample", "4", "did you mean 'max_samples'"),
    ("+seeds=3", "seeds", "3", "did you mean 'seed'"),
    (
        "stages.align.optimizer.warmup_ratio=1.5",
        "stages.align.optimizer.warmup_ratio",
        "1.5",
        "[0, 1]",
    ),
    (
        "stages.align.optimizer.min_lr_ratio=-0.1",
        "stages.align.optimizer.min_lr_ratio",
        "-0.1",
        "[0, 1]",
    ),
    ("stages.instruct.lora.dropout=1.0", "stages.instruct.lora.dropout", "1.0", "[0, 1)"),
    ("stages.align.optimizer.betas=[0.9]", "stages.align.optimizer.betas", "[0.9]", "two numbers"),
    ("stages.align.train.llm=lorra", "stages.align.train.llm", "'lorra'", "frozen, lora, full"),
    ("evaluation.max_new_tokens=0", "evaluation.max_new_tokens", "0", ">= 1"),
    ("evaluation.batch_size=abc", "evaluation.batch_size", "'abc'", ">= 1"),
    ("loader.max_text_tokens=0", "loader.max_text_tokens", "0", ">= 1"),
    ("loader.num_workers=-1", "loader.num_workers", "-1", ">= 0"),
    ("cache_features=maybe", "cache_features", "'maybe'", "true or false"),
    ("schedule=[align,instruc]", "schedule", "instruc", "did you mean 'instruct'"),
    ("schedule=[]", "schedule", "[]", "not empty"),
    ("++budget_minutes=0", "budget_minutes", "0", "> 0"),
    ("++stages.align.budget_fraction=1.5", "stages.align.budget_fraction", "1.5", "(0, 1]"),
    ("++device=gpu0", "device", "'gpu0'", "cuda:N"),
    ("++progress_every=0", "progress_every", "0", ">= 1"),
    ("+trainer.max_step=4", "trainer.max_step", "4", "did you mean 'max_steps'"),
    ("+trainer.max_steps=4", "trainer.max_steps", "4", "set by the stage runner"),
    ("debug.record_sample_ids=3", "debug.record_sample_ids", "3", "true or false"),
]


@pytest.mark.parametrize(("override", "key", "value", "valid"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_reported_with_key_value_and_what_is_valid(
    registry, override, key, value, valid
):
    cfg = tiny(override, registry=registry)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, registry)
    line = next((ln for ln in str(err.value).splitlines() if key in ln), None)
    assert line is not None, str(err.value)
    assert value in line and valid in line, line


def test_all_problems_are_reported_together(registry):
    overrides = [
        "stages.align.optimizer.lr=abc",
        "stages.align.max_steps=abc",
        "connector.depth=abc",
        "seed=abc",
        "stages.align.val_every=0",
        "+stages.align.max_step=5",
    ]
    with pytest.raises(ConfigError) as err:
        validate_config(tiny(*overrides, registry=registry), registry)
    msg = str(err.value)
    assert "6 problems" in msg
    for o in overrides:
        assert o.lstrip("+").split("=")[0] in msg


def pytest_generate_tests(metafunc):
    # at collection, not import: importing this module builds no registry
    if metafunc.definition.name == "test_every_experiment_validates":
        metafunc.parametrize("experiment", group_options(shared_registry())["experiment"])


def test_every_experiment_validates(registry, experiment):
    assert config_errors(compose([f"experiment={experiment}"], registry), registry) == []


@pytest.mark.parametrize(
    "override",
    [
        "++budget_minutes=30",
        "++stages.align.budget_fraction=0.5",
        "++device=cuda:0",
        "++device=cpu",
        "++progress_every=10",
        "llm.dtype=auto",
        "++stages.align.checkpoint_every=10",
    ],
)
def test_new_keys_are_accepted(registry, override):
    assert config_errors(tiny(override, registry=registry), registry) == []


def _leaves(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_schema_defaults_are_written_once(registry):
    """conf/ repeats no default of the schema (mmbridge.config.store registers it as the nodes
    conf/ starts from): train.yaml sets none of its keys and a stage option only what its stage
    changes; composed without an experiment, every section is the schema's defaults."""
    base = OmegaConf.to_container(OmegaConf.load(builtin_conf_dir() / "train.yaml"))
    assert not ({f.name for f in dataclasses.fields(Root)} | set(SECTIONS)) & set(base)
    assert not OmegaConf.to_container(OmegaConf.load(builtin_conf_dir() / "paths/default.yaml"))
    defaults = _leaves(dataclasses.asdict(Stage()))
    for option in group_options(registry)["stage"]:
        node = OmegaConf.to_container(OmegaConf.load(builtin_conf_dir() / f"stage/{option}.yaml"))
        assert node.pop("defaults")[0] == "/_schema/stage@_here_", option
        assert {k: v for k, v in _leaves(node).items() if defaults.get(k) == v} == {}, option

    cfg = OmegaConf.to_container(compose(["~experiment"], registry), resolve=False)
    for key, section in SECTIONS.items():
        assert cfg[key] == dataclasses.asdict(section()), key
    root = dataclasses.asdict(Root())
    assert {k: cfg[k] for k in root} == root
    align = cfg["stages"]["align"]
    assert align == {**dataclasses.asdict(Stage()), "recipe": align["recipe"]}
    instruct = _leaves(cfg["stages"]["instruct"])
    assert {k for k, v in instruct.items() if defaults.get(k) != v} == {
        "train.llm",
        "optimizer.lr",
        "recipe.name",  # a component node (recipe@stages.instruct.recipe), no schema default
    }
    assert "_schema" not in group_options(registry)  # internal: no user option


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        (
            "stages: {align: {max_stepz: 3}}",
            "stages.align.max_stepz: not a key of stages.align (did you mean 'max_steps'?); "
            "valid: train, lora, encoder_lora, optimizer, split, max_steps, epochs, batch_size, "
            "val_every, checkpoint_every, budget_fraction, recipe, prefix, data, conversation "
            "(set in experiment/typo.yaml)",
        ),
        (
            "loader: {max_txt_tokens: 3}",
            "loader.max_txt_tokens: not a key of loader (did you mean 'max_text_tokens'?); "
            "valid: num_workers, max_text_tokens, max_truncated_share, group_by_length "
            "(set in experiment/typo.yaml)",
        ),
        (
            "stages: {instruct: {train: full}}",
            "a Train section set to full: expected a mapping of encoder, encoder_last_n, "
            "connector, llm (set in experiment/typo.yaml)",
        ),
    ],
)
def test_a_preset_with_a_key_a_section_lacks_is_one_line_naming_it(tmp_path, yaml, message):
    """A section is a schema node: a config file that sets a key it lacks does not compose,
    and the error is one line with the key, a close match and the valid keys."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text(
        f"# @package _global_\ndefaults:\n  - tiny\n  - _self_\n{yaml}\n"
    )
    registry = Registry()
    registry.config_dirs.append((str(tmp_path), Origin("test", "test", "0")))
    with pytest.raises(ConfigError) as err:
        compose(["experiment=typo"], registry)
    assert str(err.value) == message


def test_a_preset_may_add_keys_where_sections_are_open(registry):
    """Open places still take new keys: a LoRA section (peft.LoraConfig's other keys), a
    stage's own component nodes, and, with ``+``, any key (validation then judges it)."""
    cfg = tiny(
        "+stages.instruct.lora.init_lora_weights=gaussian",
        "+conversation@stages.align.conversation=plain",
        "+stages.align.prefix.mode=level",
        registry=registry,
    )
    assert cfg.stages.instruct.lora.init_lora_weights == "gaussian"
    assert cfg.stages.align.conversation.name == "plain" and cfg.stages.align.prefix.mode == "level"
    assert config_errors(tiny("+stages.instruct.lora.use_dorra=true", registry=registry))


def test_check_schedule_is_part_of_validation(registry):
    cfg = tiny("schedule=[align,nope]", "stages.align.max_steps=0", registry=registry)
    with pytest.raises(ConfigError) as err:
        check_schedule(cfg)
    assert "stage 'nope' is not defined" in str(err.value)
    assert "stages.align.max_steps=0" in str(err.value)


# -- before anything is built ---------------------------------------------------------------------
@pytest.fixture
def no_training(monkeypatch):
    """Record whether the runner was reached (it builds the model first)."""
    import mmbridge.runtime.train as run

    calls = []
    monkeypatch.setattr(run, "train", lambda *a, **k: calls.append(a) or {})
    return calls


def test_run_task_validates_before_building(registry, tmp_path, no_training):
    from mmbridge.runtime.task import run_task

    cfg = tiny(
        "stages.align.optimizer.lr=abc",
        "connector.depth=abc",
        f"paths.cache_dir={tmp_path}/c",
        registry=registry,
    )
    with pytest.raises(ConfigError) as err:
        run_task(cfg, tmp_path / "run")
    assert "stages.align.optimizer.lr='abc'" in str(err.value) and "connector.depth='abc'" in str(
        err.value
    )
    assert no_training == [] and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("key", ["paths.cache_dir", "paths.feature_cache_dir", "run directory"])
def test_unwritable_outputs_are_refused_at_start(registry, tmp_path, no_training, key):
    from mmbridge.runtime.task import run_task

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "sub"
    overrides = [f"paths.cache_dir={tmp_path}/cache"]
    if key.startswith("paths."):
        overrides.append(f"{key}={bad}")
    cfg = tiny(*overrides, registry=registry)
    with pytest.raises(ConfigError) as err:
        run_task(cfg, bad if key == "run directory" else tmp_path / "run")
    msg = str(err.value)
    assert key in msg and str(bad) in msg and "is a file, not a directory" in msg
    assert no_training == []


@pytest.mark.parametrize(
    "argv",
    [
        ["paths.output_root={bad}"],
        ["hydra.run.dir={bad}"],
        ["-m", "seed=0,1", "hydra.sweep.dir={bad}"],
    ],
)
def test_run_root_checked_before_hydra_makes_it(tmp_path, argv):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    bad = blocker / "out"
    msg = run_root_error([a.format(bad=bad) for a in argv])
    key = next(a for a in argv if "{bad}" in a).split("=")[0]
    assert (
        msg == f"{key}={bad}: cannot write there ({blocker} is a file, not a directory); "
        "give a writable directory"
    )
    assert run_root_error([f"paths.output_root={tmp_path / 'ok'}"]) is None


# -- resume with overrides ------------------------------------------------------------------------
@pytest.fixture
def run_dir(tmp_path, registry):
    d = tmp_path / "run"
    d.mkdir()
    cfg = tiny(f"paths.cache_dir={tmp_path}/cache", registry=registry)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (d / "state.json").write_text(json.dumps({"stages_done": ["align"]}))
    return d


def test_resume_applies_safe_overrides(run_dir, registry):
    overrides = [
        f"resume={run_dir}",
        "stages.instruct.max_steps=80",
        "evaluation.max_samples=7",
        "++budget_minutes=5",
    ]
    composed = compose(overrides, registry)
    cfg = resume_config(OmegaConf.load(run_dir / "config.yaml"), composed, overrides, run_dir)
    assert cfg.stages.instruct.max_steps == 80 and cfg.evaluation.max_samples == 7
    assert cfg.budget_minutes == 5
    assert cfg.stages.align.max_steps == 60  # the saved run's, untouched
    validate_config(cfg, registry)


def test_resume_refuses_unsafe_overrides_with_the_list(run_dir, registry, no_training):
    from mmbridge.runtime.task import run_task

    overrides = [
        f"resume={run_dir}",
        "stages.align.max_steps=5",
        "connector=linear",
        "stages.instruct.optimizer.lr=0.1",
        "evaluation.max_samples=7",
    ]
    with pytest.raises(ConfigError) as err:
        run_task(compose(overrides, registry), run_dir, overrides)
    msg = str(err.value)
    assert "3 override(s)" in msg
    assert "stages.align.max_steps=5 (stage 'align' has finished)" in msg
    assert "connector=linear" in msg and "stages.instruct.optimizer.lr=0.1" in msg
    assert "evaluation.max_samples=7," not in msg  # safe: not listed
    assert no_training == []


# -- command options ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "counts", "want"),
    [
        (
            ["checkpoint=x", "max_sample=4"],
            ("max_samples",),
            ["max_sample=4", "did you mean 'max_samples'"],
        ),
        (
            ["checkpoint=x", "max_samples=abc"],
            ("max_samples",),
            ["max_samples='abc'", "integer >= 1"],
        ),
        (["checkpoint=x", "max_samples=0"], ("max_samples",), ["max_samples='0'", "integer >= 1"]),
        (
            ["checkpoint=x", "prdictions=p.jsonl"],
            ("max_samples",),
            ["prdictions=p.jsonl", "did you mean 'predictions'"],
        ),
        (
            ["checkpoint=x", "evaluation.batch_size=abc"],
            ("max_samples",),
            ["evaluation.batch_size='abc'", ">= 1"],
        ),
        (
            ["checkpoint=x", "evaluation.max_sample=3"],
            ("max_samples",),
            ["evaluation.max_sample=3", "did you mean"],
        ),
        (["checkpoint=x", "device=gpu0"], ("max_samples",), ["device='gpu0'", "cuda:N"]),
    ],
)
def test_eval_options_are_checked(argv, counts, want):
    from mmbridge.commands.evaluate import OWN_KEYS, USAGE

    with pytest.raises(ConfigError) as err:
        parse_kv(argv, USAGE, OWN_KEYS, counts=counts)
    for w in want:
        assert w in str(err.value)


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["checkpoint=x", "prompt=hi", "max_new_tokens=0"], ["max_new_tokens='0'", "integer >= 1"]),
        (
            ["checkpoint=x", "prompt=hi", "max_new_token=5"],
            ["max_new_token=5", "did you mean 'max_new_tokens'"],
        ),
    ],
)
def test_generate_options_are_checked(argv, want):
    own_keys = ("checkpoint", "prompt", "image", "audio", "video", "max_new_tokens", "device")
    with pytest.raises(ConfigError) as err:
        parse_kv(argv, "usage", own_keys, counts=("max_new_tokens",))
    for w in want:
        assert w in str(err.value)


def test_good_eval_options_pass():
    own, rest = parse_kv(
        ["checkpoint=x", "max_samples=4", "evaluation.batch_size=8", "seed=1"], "usage"
    )
    assert own == {"checkpoint": "x", "max_samples": "4"} and rest == [
        "evaluation.batch_size=8",
        "seed=1",
    ]


def test_eval_outputs_checked_before_work(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as err:
        check_outputs({"out": str(blocker / "m.json"), "predictions": str(tmp_path)})
    msg = str(err.value)
    assert f"out={blocker / 'm.json'}" in msg and "is a file, not a directory" in msg
    assert f"predictions={tmp_path}: is a directory" in msg
    check_outputs({"out": str(tmp_path / "new" / "m.json")})  # a missing directory is made
    assert (tmp_path / "new").is_dir()


def test_failing_out_write_keeps_what_it_can(tmp_path):
    """out= fails after the evaluation: predictions are still written, the error names out=."""
    preds_tmp = tmp_path / "tmp_preds.jsonl"
    preds_tmp.write_text('{"id": 1}\n')
    blocker = tmp_path / "f"
    blocker.write_text("x")
    own = {"out": str(blocker / "m.json"), "predictions": str(tmp_path / "p.jsonl")}
    with pytest.raises(ConfigError) as err:
        write_outputs({"exact_match": 0.5}, own, preds_tmp)
    assert f"out={blocker / 'm.json'}: could not write the metrics" in str(err.value)
    assert (tmp_path / "p.jsonl").read_text() == '{"id": 1}\n'


def test_failing_predictions_write_says_where_they_are_kept(tmp_path):
    preds_tmp = tmp_path / "tmp_preds.jsonl"
    preds_tmp.write_text('{"id": 1}\n')
    blocker = tmp_path / "f"
    blocker.write_text("x")
    own = {"out": str(tmp_path / "m.json"), "predictions": str(blocker / "p.jsonl")}
    with pytest.raises(ConfigError) as err:
        write_outputs({"exact_match": 0.5}, own, preds_tmp)
    assert f"kept in {preds_tmp}" in str(err.value) and preds_tmp.read_text() == '{"id": 1}\n'
    assert json.loads((tmp_path / "m.json").read_text()) == {"exact_match": 0.5}


def test_sweep_options_are_checked(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as err:
        check_options(
            ["--metirc", "seed=0,abc", "stages.align.max_steps=10,0"], str(blocker / "d"), "m"
        )
    msg = str(err.value)
    assert "--metirc: not an option of mmbridge sweep (did you mean '--metric'?)" in msg
    assert "seed='abc'" in msg and "stages.align.max_steps=0" in msg and "--dir=" in msg
    check_options(["connector=linear,mlp", "seed=0,1", "--cfg"], None, "test/exact_match")


def test_override_errors_pass_components_and_groups():
    assert (
        override_errors(
            [
                "connector=linear",
                "encoder.image_size=32",
                "stages.align.recipe.x=1",
                "data@evaluation.extra_data.x=shapes",
                "~evaluation.extra_data",
            ]
        )
        == []
    )


@pytest.mark.slow
def test_cli_reports_bad_values_without_traceback(tmp_path):
    from helpers import mmbridge_exe

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}
    out = subprocess.run(
        [
            mmbridge_exe(),
            "train",
            "experiment=tiny",
            "stages.align.optimizer.lr=abc",
            "seed=abc",
            f"paths.cache_dir={tmp_path}/c",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "stages.align.optimizer.lr='abc'" in out.stderr and "seed='abc'" in out.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()
