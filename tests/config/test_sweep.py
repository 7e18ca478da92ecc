"""Sweeps: the report's aggregation on hand-made runs (values known by construction), the
sweep plan (stable directory, run naming), every launcher/sweeper/trainer/ablation preset
composing, and a real `mmbridge sweep` of 4 runs checked against its runs' metrics.json."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mmbridge_exe, shared_registry

from mmbridge.config import compose
from mmbridge.errors import ConfigError
from mmbridge.reporting.runs import finished_run, gather_runs, interrupted, unfinished_runs
from mmbridge.reporting.tables import aggregate, direction, fmt, write_report

PNG = b"\x89PNG\r\n\x1a\n"


# --- hand-made runs -------------------------------------------------------------------------


def _metrics(overrides, seed, em, loss, step, params=1000, tokens=16, history=None):
    return {
        "overrides": overrides,
        "seed": seed,
        "test": {
            "exact_match": em,
            "exact_match/colour": em / 2,
            "no_media/exact_match": 0.1,
            "n": 8,
        },
        "parameters": {"total": 5000, "trainable": params, "connector": params},
        "visual_tokens": {"image": tokens},
        "stages": {
            "align": {
                "history": history
                or [{"step": 0, "val_loss": 5.0}, {"step": 10, "val_loss": loss + 1}],
                "steps": 10,
                "wall_s": 3.0,
                "step_time_s": step,
                "samples_per_s": 8 / step,
            },
            "instruct": {
                "history": [{"step": 0, "val_loss": loss + 2}, {"step": 5, "val_loss": loss}],
                "steps": 5,
                "wall_s": 2.0,
                "step_time_s": step,
                "samples_per_s": 8 / step,
            },
        },
        "val_loss_first": 5.0,
        "val_loss_last": loss,
        "step_time_s": step,
        "samples_per_s": 8 / step,
        "peak_memory_mb": 100.0 * (1 + seed),
        "wall_s": 10.0 + seed,
        "cache": {"image": {"hit": seed > 0}},
    }


def _write_run(root: Path, name: str, metrics: dict) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("seed: 0\n")
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


@pytest.fixture
def handmade(tmp_path):
    root = tmp_path / "sweep"
    common = ["experiment=tiny"]
    # linear: exact match 0.5/0.7 (mean 0.6), loss 2/3; mlp: 0.8/0.6 (mean 0.7), loss 1.5/1.5;
    # qformer: one seed only, 0.9, loss 4, params 3000, 32 tokens.
    _write_run(
        root,
        "connector=linear,seed=0",
        _metrics(["connector=linear", "seed=0", *common], 0, 0.5, 2.0, 1.0),
    )
    _write_run(
        root,
        "connector=linear,seed=1",
        _metrics(["connector=linear", "seed=1", *common], 1, 0.7, 3.0, 1.2),
    )
    _write_run(
        root,
        "connector=mlp,seed=0",
        _metrics(["connector=mlp", "seed=0", *common], 0, 0.8, 1.5, 2.0, 2000),
    )
    _write_run(
        root,
        "connector=mlp,seed=1",
        _metrics(["connector=mlp", "seed=1", *common], 1, 0.6, 1.5, 2.0, 2000),
    )
    _write_run(
        root,
        "connector=qformer,seed=0",
        _metrics(["connector=qformer", "seed=0", *common], 0, 0.9, 4.0, 3.0, 3000, 32),
    )
    bad = root / "connector=resampler,seed=0"
    bad.mkdir()
    (bad / "config.yaml").write_text("seed: 0\n")
    (bad / "error.txt").write_text("AssemblyError: connector resampler does not fit\n")
    return root


def test_aggregate_groups_by_overrides_minus_seed(handmade):
    rows = aggregate(gather_runs(handmade))
    assert [r.config for r in rows] == [
        ("connector=linear", "experiment=tiny"),
        ("connector=mlp", "experiment=tiny"),
        ("connector=qformer", "experiment=tiny"),
    ]
    lin, mlp, qf = rows
    assert [r.seed for r in lin.runs] == [0, 1]
    assert lin.mean["test/exact_match"] == pytest.approx(0.6)
    assert lin.std["test/exact_match"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert lin.mean["val_loss_last"] == 2.5 and lin.std["val_loss_last"] == pytest.approx(
        math.sqrt(0.5)
    )
    assert mlp.mean["test/exact_match"] == pytest.approx(0.7) and mlp.std["val_loss_last"] == 0.0
    assert lin.mean["stages/align/wall_s"] == 3.0 and lin.mean["peak_memory_mb"] == 150.0
    assert math.isnan(qf.std["test/exact_match"]) and qf.mean["visual_tokens/image"] == 32


def test_report_files_hold_the_known_values(handmade):
    report = write_report(handmade)
    assert {f.name for f in report.files} >= {
        "results.csv",
        "runs.csv",
        "results.md",
        "learning_curves.png",
        "exact_match_vs_trainable_params.png",
        "exact_match_vs_visual_tokens.png",
    }
    table = {r["connector"]: r for r in csv.DictReader((handmade / "results.csv").open())}
    assert set(table) == {"linear", "mlp", "qformer"}
    assert float(table["linear"]["test/exact_match_mean"]) == pytest.approx(0.6)
    assert float(table["linear"]["test/exact_match_std"]) == pytest.approx(
        statistics.stdev([0.5, 0.7])
    )
    assert float(table["mlp"]["test/exact_match/colour_mean"]) == pytest.approx(0.35)
    assert table["qformer"]["runs"] == "1" and table["qformer"]["test/exact_match_std"] == ""
    assert float(table["qformer"]["parameters/trainable_mean"]) == 3000
    runs = list(csv.DictReader((handmade / "runs.csv").open()))
    assert len(runs) == 5 and {r["run_dir"] for r in runs} >= {"connector=mlp,seed=1"}

    md = (handmade / "results.md").read_text()
    lin, mlp, qf = (_cells(md, c, strip_bold=False) for c in ("linear", "mlp", "qformer"))
    # best = highest exact match (qformer 0.9), lowest loss (mlp 1.5), lowest step time (linear 1.1)
    assert qf["exact match ↑"] == "**0.9**" and lin["exact match ↑"] == "0.6 ± 0.14"
    assert mlp["val loss ↓"] == "**1.5**" and lin["val loss ↓"] == "2.5 ± 0.71"
    assert lin["step s ↓"] == "**1.1 ± 0.14**" and lin["runs"] == "2" and qf["runs"] == "1"
    assert (
        qf["trainable params"] == "3,000" and "**" not in mlp["trainable params"]
    )  # sizes are not ranked
    assert qf["visual tokens (image)"] == "32" and lin["no media"] == "0.1"
    per_type = md[md.index("## Test exact match per question type") :]
    assert _cells(per_type, "mlp", strip_bold=False)["colour ↑"] == "0.35 ± 0.071"
    assert "Overrides common to every run: `experiment=tiny`" in md
    assert "connector=resampler,seed=0`: AssemblyError: connector resampler does not fit" in md
    for png in handmade.glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert not list(handmade.glob(".*tmp"))  # atomic writes leave no temporary files


def test_report_cli_and_bad_metric(handmade, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}
    out = subprocess.run(
        [
            mmbridge_exe(),
            "report",
            str(handmade),
            "--metric",
            "test/exact_match/colour",
            "--out",
            str(tmp_path / "rep"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "5 runs in 3 configurations" in out.stdout and "1 unfinished" in out.stdout
    assert (tmp_path / "rep" / "exact_match_colour_vs_visual_tokens.png").read_bytes()[:8] == PNG
    with pytest.raises(ConfigError, match="no run .* has it; metrics: test/exact_match"):
        write_report(handmade, "test/bleu")


def test_directions_and_formatting():
    assert direction("test/exact_match") == "max" and direction("test/exact_match/count") == "max"
    assert direction("samples_per_s") == "max" and direction("val_loss_last") == "min"
    assert direction("wall_s") == "min" and direction("peak_memory_mb") == "min"
    assert direction("stages/align/step_time_s") == "min"
    for neutral in (
        "test/no_media/exact_match",
        "test/chance/exact_match",
        "parameters/trainable",
        "visual_tokens/image",
        "val_loss_first",
        "test/n",
    ):
        assert direction(neutral) is None
    assert fmt(676736.0) == "676,736" and fmt(0.56251) == "0.5625" and fmt(0.0283, 2) == "0.028"


def test_learning_curve_offsets_stages():
    from mmbridge.reporting.plots import run_curve

    curve = run_curve(_metrics([], 0, 0.5, 2.0, 1.0))
    assert curve == [
        ("align", 0.0, 5.0),
        ("align", 10.0, 3.0),
        ("instruct", 10.0, 4.0),
        ("instruct", 15.0, 2.0),
    ]


def test_plots_do_not_import_the_report_module():
    """No import cycle: the plots read the rows from mmbridge.reporting.results, and the report
    imports the plots (lazily, matplotlib being optional), not the other way round."""
    code = "import sys, mmbridge.reporting.plots; print('mmbridge.reporting.tables' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_finished_and_interrupted_runs(tmp_path):
    d = _write_run(tmp_path, "a", _metrics(["connector=mlp", "seed=0"], 0, 0.5, 2.0, 1.0))
    assert finished_run(d, ["seed=0", "connector=mlp"]).metrics["test"]["exact_match"] == 0.5
    assert finished_run(tmp_path / "none", ["seed=0"]) is None
    with pytest.raises(ConfigError, match="holds the run of overrides"):
        finished_run(d, ["connector=linear", "seed=0"])
    r = tmp_path / "r"
    (r / "checkpoints" / "align").mkdir(parents=True)
    (r / "config.yaml").write_text("seed: 0\n")
    assert not interrupted(r, "seed: 0\n")  # nothing to resume from yet
    (r / "checkpoints" / "align" / "last.ckpt").write_bytes(b"x")
    assert interrupted(r, "seed: 0\n") and not interrupted(r, "seed: 1\n")
    assert unfinished_runs(tmp_path) == [(r, "unfinished")]


# --- the sweep plan -------------------------------------------------------------------------


def _arg(args, key):
    return next(a.split("=", 1)[1] for a in args if a.startswith(key + "="))


def test_plan_is_stable_and_names_runs_by_swept_keys():
    from mmbridge.commands.sweep import plan

    a = plan(["connector=linear,mlp", "seed=0,1", "data.n_train=32", "+x=1"])
    b = plan(
        [
            "data.n_train=32",
            "+x=1",
            "seed=0,1",
            "connector=linear,mlp",
            "hydra/launcher=local_parallel",
        ]
    )
    c = plan(
        [
            "connector=linear,mlp",
            "seed=0,1",
            "data.n_train=32",
            "+x=1",
            "hydra/sweeper=optuna_search",
        ]
    )
    assert a[0] == "-m"
    assert _arg(a, "hydra.sweep.dir") == _arg(b, "hydra.sweep.dir") != _arg(c, "hydra.sweep.dir")
    assert re.fullmatch(
        r"\$\{paths.output_root\}/sweeps/\$\{run_name\}/[0-9a-f]{10}", _arg(a, "hydra.sweep.dir")
    )
    assert _arg(a, "hydra.job.config.override_dirname.exclude_keys") == "['data.n_train','x']"
    assert _arg(a, "hydra.sweep.subdir") == "${hydra.job.override_dirname}"
    assert _arg(plan(["seed=0,1"], "/tmp/my sweep"), "hydra.sweep.dir") == "'/tmp/my sweep'"
    assert (
        plan(["seed=0,1"], metric=None)[-1]
        == "+hydra.callbacks.report._target_=hydra.experimental.callback.Callback"
    )
    with pytest.raises(ConfigError, match="bad override"):
        plan(["connector=["])


# --- presets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "node", "target"),
    [
        (
            "hydra/launcher=local_parallel",
            "launcher",
            "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        ),
        (
            "hydra/launcher=slurm",
            "launcher",
            "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        ),
        (
            "hydra/sweeper=optuna_search",
            "sweeper",
            "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        ),
    ],
)
def test_hydra_plugin_presets_compose(override, node, target):
    module = target.rsplit(".", 1)[0]
    pytest.importorskip(
        module,
        reason=f"{override} needs {module.split('.')[1].replace('_', '-')} "
        f"(pip install 'mmbridge[sweep]')",
    )
    cfg = compose([override], shared_registry(), return_hydra_config=True)
    conf = cfg.hydra[node]
    assert conf._target_ == target
    import importlib

    assert importlib.import_module(module) is not None
    if node == "sweeper":
        assert conf.direction == "maximize" and conf.sampler.seed == 0
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra_plugins.hydra_optuna_sweeper._impl import (
            create_optuna_distribution_from_override,
        )
        from optuna.distributions import LogUniformDistribution

        lr = OverridesParser.create().parse_override(
            f"stages.align.optimizer.lr={conf.params['stages.align.optimizer.lr']}"
        )
        assert isinstance(create_optuna_distribution_from_override(lr), LogUniformDistribution)
    elif override.endswith("slurm"):
        assert conf.gpus_per_node == 1 and conf.max_num_timeout > 0
    else:
        assert conf.n_jobs == 2


@pytest.mark.parametrize(
    ("preset", "strategy"),
    [
        ("gpu", "auto"),
        ("gpu_ddp", "ddp"),
        ("fsdp", "fsdp"),
        ("deepspeed_zero2", "deepspeed_stage_2"),
    ],
)
def test_trainer_presets_compose_with_lightning_strategy_names(preset, strategy):
    from lightning.pytorch.strategies import StrategyRegistry

    # without the default experiment: `tiny` pins precision 32-true for its tiny matrices
    trainer = compose([f"trainer={preset}", "~experiment"], shared_registry()).trainer
    assert trainer.accelerator == "gpu" and trainer.precision == "bf16-mixed"
    assert trainer.strategy == strategy and (strategy == "auto" or strategy in StrategyRegistry)
    # FSDP clips too (BridgeModule.configure_gradient_clipping: the root module's clip_grad_norm_)
    assert trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize(
    ("preset", "n_jobs", "key"),
    [
        ("ablation_connector", 14, "connector"),
        ("ablation_connector_quickstart", 6, "connector"),
        ("ablation_visual_tokens", 8, "connector.stride"),
        ("ablation_llm_tuning", 6, "stages.instruct.train.llm"),
        ("ablation_stages", 4, "schedule"),
    ],
)
def test_ablation_presets_define_grids_whose_jobs_compose(preset, n_jobs, key):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose([f"experiment={preset}"], shared_registry(), return_hydra_config=True)
    assert cfg.run_name == preset
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]
    assert len(jobs) == n_jobs
    for job in jobs:
        if any(o.startswith("seed=") for o in job) and "seed=0" not in job:
            continue
        job_cfg = compose([f"experiment={preset}", *job], shared_registry())
        value = next(o.split("=", 1)[1] for o in job if o.startswith(key + "="))
        got = job_cfg.connector.name if key == "connector" else job_cfg
        if key != "connector":
            from omegaconf import OmegaConf

            got = OmegaConf.select(job_cfg, key)
            got = "[" + ",".join(got) + "]" if key == "schedule" else str(got)
        assert got == value


# --- a real sweep ---------------------------------------------------------------------------

TINY = [
    "experiment=tiny",
    "stages.align.max_steps=2",
    "stages.instruct.max_steps=2",
    "stages.align.val_every=2",
    "stages.instruct.val_every=2",
    "stages.align.batch_size=8",
    "stages.instruct.batch_size=8",
    "data.n_train=32",
    "data.n_val=8",
    "data.n_test=8",
    "evaluation.max_samples=8",
    "evaluation.val_samples=4",
    "evaluation.batch_size=8",
    "evaluation.baselines=false",
    "trainer.enable_progress_bar=false",
]


def _sweep(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1", "COLUMNS": "200"}
    cmd = [
        mmbridge_exe(),
        "sweep",
        "connector=linear,mlp",
        "seed=0,1",
        *TINY,
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200)


def _cells(md: str, first: str | None, strip_bold: bool = True) -> dict[str, str]:
    """The cells of the first markdown table's row whose first cell is ``first`` (``None``: its
    first row), by header."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    row = next(line for line in lines[1:] if first is None or line.split("|")[1].strip() == first)
    return dict(
        zip(
            header,
            (c.strip().strip("*") if strip_bold else c.strip() for c in row.split("|")[1:-1]),
        )
    )


def _close(cell: str, mean: float, std: float) -> None:
    parts = [float(p.replace(",", "")) for p in cell.split(" ± ")]
    assert parts[0] == pytest.approx(mean, rel=1e-3, abs=0.5 if abs(mean) >= 1000 else 1e-4)
    if std > 0 and not math.isclose(std, 0):
        assert parts[1] == pytest.approx(std, rel=0.06, abs=0.5 if abs(std) >= 1000 else 1e-3)


@pytest.mark.slow
def test_real_sweep_table_plots_cache_and_restart(tmp_path):
    out = _sweep(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "sweeps" / "tiny").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    runs = {
        d.name: json.loads((d / "metrics.json").read_text())
        for d in sweep.iterdir()
        if (d / "metrics.json").is_file()
    }
    assert sorted(runs) == [
        "connector=linear,seed=0",
        "connector=linear,seed=1",
        "connector=mlp,seed=0",
        "connector=mlp,seed=1",
    ]
    for name, m in runs.items():
        connector, seed = (kv.split("=")[1] for kv in name.split(","))
        assert f"connector={connector}" in m["overrides"] and f"seed={seed}" in m["overrides"]
        assert m["seed"] == int(seed) and m["visual_tokens"] == {"image": 64}
        for key in ("wall_s", "step_time_s", "samples_per_s", "peak_memory_mb", "val_loss_last"):
            assert m[key] > 0
        assert m["parameters"]["trainable"] < m["parameters"]["total"]
    # One feature cache for the sweep: the first job computes it, every later job reads it.
    assert runs["connector=linear,seed=0"]["cache"]["image"]["hit"] is False
    assert all(
        runs[n]["cache"]["image"]["hit"] is True for n in runs if n != "connector=linear,seed=0"
    )

    table = {r["connector"]: r for r in csv.DictReader((sweep / "results.csv").open())}
    md = (sweep / "results.md").read_text()
    for connector in ("linear", "mlp"):
        ms = [runs[f"connector={connector},seed={s}"] for s in (0, 1)]
        cells = _cells(md, connector)
        assert table[connector]["runs"] == cells["runs"] == "2"
        for key, column, get in [
            ("test/exact_match", "exact match ↑", lambda m: m["test"]["exact_match"]),
            ("val_loss_last", "val loss ↓", lambda m: m["val_loss_last"]),
            ("parameters/trainable", "trainable params", lambda m: m["parameters"]["trainable"]),
            ("step_time_s", "step s ↓", lambda m: m["step_time_s"]),
            ("peak_memory_mb", "peak MB ↓", lambda m: m["peak_memory_mb"]),
            ("wall_s", "wall s ↓", lambda m: m["wall_s"]),
        ]:
            values = [get(m) for m in ms]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert float(table[connector][f"{key}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(table[connector][f"{key}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-12)
            _close(cells[column], mean, std)
    for png in (
        "exact_match_vs_trainable_params.png",
        "exact_match_vs_visual_tokens.png",
        "learning_curves.png",
    ):
        from PIL import Image

        with Image.open(sweep / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    # the sweep's page, and each run's own (written by the run at its end)
    html = (sweep / "report.html").read_text()
    assert "4 runs in 2 configurations" in html and 'id="curves"' in html and 'id="results"' in html
    assert all('id="gallery"' in (sweep / n / "report.html").read_text() for n in runs)
    stamps = {n: (sweep / n / "metrics.json").stat().st_mtime_ns for n in runs}

    again = _sweep(tmp_path)  # the same command line: the same directory, every run skipped
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("finished already") == 4
    assert {n: (sweep / n / "metrics.json").stat().st_mtime_ns for n in runs} == stamps
    assert "4 runs in 2 configurations" in again.stdout


@pytest.mark.slow
def test_train_multirun_writes_report_and_skips_when_started_again(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}
    cmd = [
        mmbridge_exe(),
        "train",
        "-m",
        "connector=linear",
        *TINY,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sw'}",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = [d for d in (tmp_path / "sw").iterdir() if (d / "metrics.json").is_file()]
    assert run.name == "0_connector=linear"  # conf/train.yaml's subdir: job number + overrides
    metrics = json.loads((run / "metrics.json").read_text())
    cells = _cells((tmp_path / "sw" / "results.md").read_text(), None)
    assert cells["runs"] == "1" and "connector=linear" in cells["configuration"]  # nothing varies
    _close(cells["val loss ↓"], metrics["val_loss_last"], 0)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert again.returncode == 0 and "finished already" in again.stdout + again.stderr
