"""Reliability suite through the real command line (issue 20): bad inputs a careful user makes,
each run through ``mmbridge.cli.main`` (the console script's entry) in this process.

Every probe asserts the exit status (non-zero for a bad input, 0 for a valid edge case), that
no raw traceback reaches the output, that the message names the key / file / value, and,
where something was already written, that it is still there. The classes: config values,
command options, outputs that cannot be written, data files, images, truncation, checkpoints,
resume, caches that heal, and code that a checkpoint must never run. Tools (deep nesting, the
exact calculator) and image decoding are probed at the unit level in
``tests/test_reliability_tools_images.py``; exact resume in ``tests/test_resume_exact.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_FAST
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmbridge.cli import main

FAST = [
    *TINY_FAST,
    "schedule=[align]",
    "stages.align.max_steps=1",
    "stages.align.val_every=1",
]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("MMBRIDGE_DISABLE_PLUGINS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``mmbridge ARGV`` in this process; (exit status, stdout + stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # Hydra's own exit on an error it reports
        rc = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return rc, out.out + out.err


def check(rc: int, text: str, *needles: str, ok: bool = False) -> None:
    """The probe's contract: the exit status, no raw traceback, every needle named."""
    assert "Traceback" not in text, text[-3000:]
    assert (rc == 0) if ok else (rc != 0), text[-3000:]
    missing = [n for n in needles if n not in text]
    assert not missing, f"{missing} not named in:\n{text[-3000:]}"


# -- fixtures: files a user could hand over -------------------------------------------------------
def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def record(i: int, image: str = "img.png", answer: str = "red") -> dict:
    return {
        "id": f"r{i}",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": answer},
        ],
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """LLaVA-format files (good, BOM, object, empty, broken, ...), images and a regular file
    that blocks any directory below it (unwritable even for root)."""
    d = tmp_path_factory.mktemp("files")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "img.png")
    png_claiming(d / "big.png", 40000, 40000)
    (d / "notimg.png").write_text("not an image\n")
    good = [record(i) for i in range(8)]
    (d / "good.json").write_text(json.dumps(good))
    (d / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode())
    (d / "obj.json").write_text(json.dumps({"data": good}))
    (d / "empty.json").write_text("[]")
    (d / "big.json").write_text(json.dumps([record(i, "big.png") for i in range(4)]))
    (d / "missing_img.json").write_text(json.dumps([record(i, "nope.png") for i in range(4)]))
    (d / "broken.json").write_text(json.dumps(good)[:-40])
    (d / "cut.jsonl").write_text("\n".join(json.dumps(r) for r in good) + '\n{"id": "x", "conv')
    (d / "afile").write_text("a regular file")
    return d


def unwritable(files: Path) -> str:
    return str(files / "afile" / "sub")


# -- config values and options: no training, one process ------------------------------------------
# Problems of one composed config are reported together, so one `train` call probes them all:
# (override, what the message must name).
CONFIG_VALUES = [
    ("stages.align.optimizer.lr=abc", "stages.align.optimizer.lr='abc'"),
    ("stages.instruct.optimizer.lr=-1", "stages.instruct.optimizer.lr=-1"),
    ("stages.align.optimizer.weight_decay=inf", "stages.align.optimizer.weight_decay=inf"),
    ("stages.align.max_steps=abc", "stages.align.max_steps='abc'"),
    ("connector.depth=abc", "connector.depth='abc'"),
    ("seed=abc", "seed='abc'"),
    ("stages.align.val_every=0", "stages.align.val_every=0"),
    ("+stages.align.max_step=5", "did you mean 'max_steps'"),
    ("stages.instruct.batch_size=0", "stages.instruct.batch_size=0"),
    ("loader.max_truncated_share=2", "loader.max_truncated_share=2"),
    ("stages.align.optimizer.betas=[0.9]", "stages.align.optimizer.betas=[0.9]"),
    ("stages.instruct.train.llm=partial", "stages.instruct.train.llm='partial'"),
    ("++budget_minutes=-1", "budget_minutes=-1"),
    ("++device=tpu9", "device='tpu9'"),
    ("trainer.precision=banana", "trainer.precision='banana'"),
    ("trainer.accelerator=gpux", "trainer.accelerator='gpux'"),
    ("+trainer.max_steps=5", "trainer.max_steps=5: set by the stage runner"),
    ("+llm.nonexistent_arg=3", "llm.nonexistent_arg"),
    ("stages.align.recipe.name=nope", "stages.align.recipe.name"),
]


@pytest.fixture(scope="module")
def many_bad_values(tmp_path_factory):
    run = tmp_path_factory.mktemp("bad") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", *FAST, f"hydra.run.dir={run}", *(o for o, _ in CONFIG_VALUES)])
    return rc, out.getvalue() + err.getvalue(), run


@pytest.mark.parametrize(("override", "named"), CONFIG_VALUES, ids=[o for o, _ in CONFIG_VALUES])
def test_bad_config_value_is_named_before_anything_is_built(many_bad_values, override, named):
    rc, text, run = many_bad_values
    check(rc, text, named)
    assert f"invalid config ({len(CONFIG_VALUES)} problems)" in text  # all of them, together
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["stages.align.optimizer.lr=nan"], ["stages.align.optimizer.lr=nan", "finite"]),
        (["schedule=[]"], ["schedule"]),
        (["schedule=[align,finetune]"], ["finetune", "not defined under stages"]),
        (["connector=nope"], ["connector/nope", "Available options", "mlp"]),
        (["+max_stepz=5"], ["max_stepz", "not a config key"]),
        (["stages.align.max_steps=[1"], ["stages.align.max_steps=[1", "not a valid override"]),
        (["data.n_train=-5"], ["data.n_train", "-5"]),
    ],
    ids=[
        "lr_nan",
        "schedule_empty",
        "schedule_unknown_stage",
        "unknown_group_option",
        "unknown_top_key",
        "unparsable_override",
        "negative_size",
    ],
)
def test_train_refuses_with_the_key(tmp_path, capsys, argv, named):
    run = tmp_path / "run"
    rc, text = cli(
        capsys, "train", *FAST, f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run}", *argv
    )
    check(rc, text, *named)
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize(
    "key", ["paths.output_root", "hydra.run.dir", "paths.cache_dir", "paths.feature_cache_dir"]
)
def test_unwritable_output_is_refused_at_start(tmp_path, files, capsys, key):
    where = (
        [] if key in ("paths.output_root", "hydra.run.dir") else [f"hydra.run.dir={tmp_path}/run"]
    )
    rc, text = cli(capsys, "train", *FAST, *where, f"{key}={unwritable(files)}")
    check(rc, text, unwritable(files), "cannot write")
    assert (files / "afile").read_text() == "a regular file"  # the blocking file is untouched


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["config", "connector.depth=abc"], ["connector.depth='abc'"]),
        (["plan", "experiment=tiny", "connector.depth=abc"], ["connector.depth='abc'"]),
        (["plan", "experiment=tiny", "gpus=abc"], ["gpus=abc"]),
        (["sweep", "experiment=tiny", "seed=0,abc"], ["seed='abc'"]),
        (["sweep", "experiment=tiny", "--metrc", "x"], ["--metrc"]),
        (["eval", "checkpoint=x", "max_sample=4"], ["max_sample=4", "did you mean 'max_samples'"]),
        (["eval", "checkpoint=x", "max_samples=0"], ["max_samples='0'", ">= 1"]),
        (["eval", "checkpoint=x", "device=tpu"], ["device='tpu'"]),
        (["eval", "checkpoint=x", "evaluation.batch_size=abc"], ["evaluation.batch_size='abc'"]),
        (["eval", "split=test"], ["checkpoint=PATH is required"]),
        (["generate", "checkpoint=x", "prompt=hi", "max_new_tokens=0"], ["max_new_tokens='0'"]),
        (["generate", "checkpoint=x"], ["prompt="]),
        (["export", "checkpoint=x"], ["out= required"]),
        (["report", "/nonexistent/sweep"], ["/nonexistent/sweep"]),
        (["traing"], ["did you mean 'train'"]),
    ],
    ids=[
        "config",
        "plan_value",
        "plan_option",
        "sweep_value",
        "sweep_option",
        "eval_typo",
        "eval_zero",
        "eval_device",
        "eval_override",
        "eval_no_checkpoint",
        "generate_zero",
        "generate_no_prompt",
        "export_no_out",
        "report_missing_dir",
        "unknown_command",
    ],
)
def test_command_options_are_checked(tmp_path, capsys, monkeypatch, argv, named):
    monkeypatch.chdir(tmp_path)  # a sweep's default directory would land here
    rc, text = cli(capsys, *argv)
    check(rc, text, *named)
    assert not (tmp_path / "outputs").exists()


def test_sweep_directory_that_cannot_be_written(files, capsys):
    rc, text = cli(capsys, "sweep", "experiment=tiny", "seed=0,1", "--dir", unwritable(files))
    check(rc, text, unwritable(files))


# -- data files and truncation (the data is read after the config is checked) --------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("file", "named"),
    [
        ("nofile.json", ["nofile.json", "data.train"]),
        ("obj.json", ["obj.json", "expected a JSON list of records, got an object"]),
        ("empty.json", ["empty.json", "no record", "data.train"]),
        ("broken.json", ["broken.json", "invalid JSON"]),
        ("cut.jsonl", ["cut.jsonl", "line 9"]),
        ("missing_img.json", ["missing_img.json", "record 0", "nope.png"]),
        ("big.json", ["big.png", "too large", "MMBRIDGE_MAX_IMAGE_PIXELS"]),
    ],
    ids=[
        "missing_file",
        "json_object",
        "empty_list",
        "broken_json",
        "truncated_jsonl",
        "missing_image",
        "decompression_bomb",
    ],
)
def test_bad_data_file_is_named(tmp_path, files, capsys, file, named):
    fast = [a for a in FAST if not a.startswith("data.n_")]
    rc, text = cli(
        capsys,
        "train",
        *fast,
        "data=llava",
        f"data.train={files / file}",
        f"data.test={files / 'good.json'}",
        f"paths.cache_dir={tmp_path}/cache",
        f"hydra.run.dir={tmp_path}/run",
    )
    check(rc, text, *named)


@pytest.mark.slow
def test_every_answer_cut_is_an_error_not_val_loss_zero(tmp_path, capsys):
    # 70 tokens keep the 64 image slots and cut every answer away
    rc, text = cli(
        capsys,
        "train",
        *FAST,
        "loader.max_text_tokens=70",
        f"paths.cache_dir={tmp_path}/cache",
        f"hydra.run.dir={tmp_path}/run",
    )
    check(rc, text, "no supervised (answer) token left", "loader.max_text_tokens")
    assert not (tmp_path / "run" / "metrics.json").exists()


# -- one trained run (LLaVA data with a UTF-8 BOM: a valid edge case) and what is done with it -----
@pytest.fixture(scope="module")
def trained(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    fast = [a for a in FAST if not a.startswith(("data.n_", "schedule", "stages.align."))]
    mp = pytest.MonkeyPatch()
    mp.setenv("MMBRIDGE_DISABLE_PLUGINS", "1")
    try:
        rc = main(
            [
                "train",
                *fast,
                "data=llava",
                f"data.train={files / 'bom.json'}",
                f"data.test={files / 'good.json'}",
                "schedule=[align,instruct]",
                "stages.align.max_steps=2",
                "stages.align.val_every=2",
                "stages.instruct.max_steps=2",
                "stages.instruct.val_every=2",
                f"paths.cache_dir={root / 'cache'}",
                f"hydra.run.dir={run}",
            ]
        )
    finally:
        mp.undo()
    assert rc == 0
    return root, run


@pytest.mark.slow
def test_bom_file_trains_and_writes_the_run(trained):
    _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stages"]["align"]["steps"] == 2 and metrics["stages"]["instruct"]["steps"] == 2
    assert metrics["test"]["n"] == 8


def copy_checkpoint(src: Path, dst: Path, keep=lambda k: True, config=None) -> Path:
    """A copy of checkpoint directory ``src`` keeping the tensors ``keep`` accepts and, with
    ``config``, that config embedded instead (the weights' metadata is what loading reads)."""
    shutil.copytree(src, dst)
    with safe_open(str(dst / "weights.safetensors"), "pt") as f:
        meta = f.metadata()
    if config is not None:
        meta["config"] = yaml.safe_dump(config)
    tensors = load_file(str(dst / "weights.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if keep(k)},
        str(dst / "weights.safetensors"),
        metadata=meta,
    )
    return dst


@pytest.mark.slow
def test_eval_writes_table_metrics_and_answers(trained, capsys, tmp_path):
    _, run = trained
    rc, text = cli(
        capsys,
        "eval",
        f"checkpoint={run}/checkpoints/final",
        "max_samples=4",
        f"out={tmp_path}/o/m.json",
        f"predictions={tmp_path}/o/p.jsonl",
    )
    check(rc, text, "exact_match", ok=True)
    metrics = json.loads((tmp_path / "o" / "m.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "o" / "p.jsonl").read_text().splitlines()]
    assert (
        metrics["n"] == 4 and len([r for r in rows if r["mode"] == "media"]) == 4
    )  # max_samples applied


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "architecture_override",
        "missing_connector",
        "truncated_weights",
        "lightning_ckpt",
        "missing_checkpoint",
        "unknown_split",
        "unwritable_out",
        "unwritable_predictions",
        "out_is_a_directory",
    ],
)
def test_eval_refuses_what_would_be_wrong_or_lost(trained, files, capsys, tmp_path, case):
    _, run = trained
    final = run / "checkpoints" / "final"
    if case == "missing_connector":
        copy_checkpoint(final, tmp_path / "c", keep=lambda k: "connector" not in k)
    if case == "truncated_weights":
        shutil.copytree(final, tmp_path / "t")
        w = tmp_path / "t" / "weights.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    args, named = {
        "architecture_override": (
            [f"checkpoint={final}", "connector.depth=3"],
            ["does not fit the model", "missing", "connector"],
        ),
        "missing_connector": (
            [f"checkpoint={tmp_path / 'c'}"],
            ["does not fit the model", "branches.image.connector"],
        ),
        "truncated_weights": ([f"checkpoint={tmp_path / 't'}"], ["weights.safetensors"]),
        "lightning_ckpt": (
            [f"checkpoint={run}/checkpoints/instruct/last.ckpt"],
            ["last.ckpt", "checkpoints/final"],
        ),
        "missing_checkpoint": ([f"checkpoint={tmp_path}/nope"], [f"{tmp_path}/nope"]),
        "unknown_split": ([f"checkpoint={final}", "split=nope"], ["split=nope", "test"]),
        "unwritable_out": (
            [f"checkpoint={final}", f"out={unwritable(files)}/m.json"],
            ["out=", unwritable(files)],
        ),
        "unwritable_predictions": (
            [f"checkpoint={final}", f"predictions={unwritable(files)}/p.jsonl"],
            ["predictions=", unwritable(files)],
        ),
        "out_is_a_directory": (
            [f"checkpoint={final}", f"out={tmp_path}"],
            ["out=", "is a directory"],
        ),
    }[case]
    rc, text = cli(capsys, "eval", *args)
    check(rc, text, *named)


@pytest.mark.slow
def test_checkpoint_config_cannot_name_a_program_to_run(trained, files, capsys, tmp_path):
    _, run = trained
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\necho text\n")
    evil.chmod(0o755)
    cfg = yaml.safe_load((run / "checkpoints" / "final" / "config.yaml").read_text())
    cfg["evaluation"]["tool_callers"] = {
        "ocr_pipe": {
            "name": "pipeline",
            "tools": {"ocr": {"backend": "tesseract", "tesseract_cmd": str(evil)}},
        }
    }
    ckpt = copy_checkpoint(run / "checkpoints" / "final", tmp_path / "c", config=cfg)
    rc, text = cli(capsys, "eval", f"checkpoint={ckpt}", "max_samples=2")
    check(rc, text, "tools.ocr.tesseract_cmd", str(evil), "MMBRIDGE_ALLOW_EXECUTABLES")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("media", "prompt", "named"),
    [
        (
            "img.png",
            "what colour is the shape in the picture " * 40 + "?",
            ["prompt is", "loader.max_text_tokens"],
        ),
        ("big.png", "hi", ["big.png", "too large"]),
        ("notimg.png", "hi", ["notimg.png"]),
        ("nope.png", "hi", ["nope.png", "no such file"]),
    ],
    ids=["prompt_over_budget", "decompression_bomb", "not_an_image", "missing_image"],
)
def test_generate_refuses(trained, files, capsys, media, prompt, named):
    _, run = trained
    rc, text = cli(
        capsys,
        "generate",
        f"checkpoint={run}/checkpoints/final",
        f"image={files / media}",
        f"prompt={prompt}",
    )
    check(rc, text, *named)


@pytest.mark.slow
def test_generate_answers_a_valid_prompt(trained, files, capsys):
    _, run = trained
    rc, text = cli(
        capsys,
        "generate",
        f"checkpoint={run}/checkpoints/final",
        f"image={files / 'img.png'}",
        "prompt=What colour is the square?",
        "max_new_tokens=3",
    )
    check(rc, text, ok=True)
    assert text.strip()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unwritable_out", "unknown_format"])
def test_export_refuses_before_loading(trained, files, capsys, tmp_path, case):
    _, run = trained
    args, named = {
        "unwritable_out": ([f"out={unwritable(files)}"], [unwritable(files), "cannot write"]),
        "unknown_format": ([f"out={tmp_path}/x", "format=onnx"], ["format=onnx", "bundle"]),
    }[case]
    rc, text = cli(capsys, "export", f"checkpoint={run}/checkpoints/final", *args)
    check(rc, text, *named)
    assert not (tmp_path / "x").exists()


# -- resume: overrides, damaged and crafted checkpoints, a damaged feature cache ------------------
def killed_in_instruct(run: Path, dst: Path) -> Path:
    """A copy of finished run ``run`` as if it had been killed in its instruct stage."""
    shutil.copytree(run, dst)
    state = json.loads((dst / "state.json").read_text())
    state["stages_done"] = ["align"]
    state["stage_metrics"].pop("instruct", None)
    (dst / "state.json").write_text(json.dumps(state))
    for p in ("checkpoints/instruct_final", "checkpoints/final"):
        shutil.rmtree(dst / p)
    (dst / "metrics.json").unlink()
    return dst


@pytest.mark.slow
@pytest.mark.parametrize(
    ("which", "override", "named"),
    [
        (
            "finished",
            "stages.instruct.max_steps=80",
            ["stages.instruct.max_steps=80", "has finished"],
        ),
        (
            "killed",
            "connector.depth=3",
            ["connector.depth=3", "cannot change a run that has started"],
        ),
        ("killed", "seed=1", ["seed=1", "only these may change"]),
    ],
    ids=["steps_of_a_finished_stage", "architecture", "seed"],
)
def test_resume_refuses_overrides_it_would_ignore(
    trained, capsys, tmp_path, which, override, named
):
    _, run = trained
    target = run if which == "finished" else killed_in_instruct(run, tmp_path / "k")
    before = {
        p: p.read_bytes()
        for p in target.rglob("*")
        if p.is_file() and p.suffix in (".json", ".ckpt")
    }
    rc, text = cli(capsys, "train", f"resume={target}", override)
    check(rc, text, *named)
    assert {p: p.read_bytes() for p in before} == before  # nothing written is touched


@pytest.mark.slow
def test_resume_refuses_a_crafted_pickle_even_when_forced(trained, capsys, tmp_path, monkeypatch):
    _, run = trained
    target = killed_in_instruct(run, tmp_path / "k")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    for ckpt in (target / "checkpoints" / "instruct").glob("*.ckpt"):
        torch.save({"state_dict": Evil()}, ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    rc, text = cli(capsys, "train", f"resume={target}")
    check(rc, text, "last.ckpt", "refused", "weights-only")
    assert not marker.exists()


@pytest.mark.slow
def test_truncated_last_ckpt_and_feature_cache_heal_on_resume(trained, capsys, tmp_path):
    root, run = trained
    target = killed_in_instruct(run, tmp_path / "k")
    last = target / "checkpoints" / "instruct" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    shards = sorted((root / "cache" / "features").glob("*/shard-*.bin"))
    assert shards
    for shard in shards:
        shard.write_bytes(shard.read_bytes()[:1000])
    rc, text = cli(capsys, "train", f"resume={target}")
    check(rc, text, "last.ckpt is unreadable", "resuming from step=2.ckpt", ok=True)
    assert (target / "metrics.json").is_file() and (
        target / "checkpoints" / "final" / "weights.safetensors"
    ).is_file()
    # the damaged shard was moved aside (kept for inspection) and rebuilt
    assert all(list(s.parent.glob(f"{s.name}.corrupt-*")) for s in shards)
