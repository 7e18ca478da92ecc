"""The Python API's training entry (``mmbridge.train``), ``mmbridge eval`` / ``generate`` on a
bundle, and the runnable example ``examples/python_api.py``.

One real tiny run (``experiment=tiny``, one step per stage) serves every test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import shared_registry

import mmbridge
from mmbridge.export import export
from mmbridge.plugins.encoders._image import example_png

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "What colour is the shape?"
# the smallest real run (as tests/test_registry_once.py): 1 step per stage, 4 test questions
SMALL = ["experiment=tiny", "data.n_train=8", "data.n_val=4", "data.n_test=4", "evaluation.max_samples=4",
         "evaluation.val_samples=2", "evaluation.batch_size=4", "trainer.enable_progress_bar=false",
         "stages.align.batch_size=4", "stages.align.max_steps=1", "stages.align.val_every=1",
         "stages.instruct.batch_size=4", "stages.instruct.max_steps=1", "stages.instruct.val_every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``mmbridge.train`` with the CLI's default run directory under ``paths.output_root``."""
    root = tmp_path_factory.mktemp("api")
    overrides = [*SMALL, f"paths.output_root={root / 'outputs'}", f"paths.cache_dir={root / 'cache'}"]
    return root, overrides, mmbridge.train(overrides, registry=shared_registry())


@pytest.fixture(scope="module")
def bundle(run):
    return export(run[2].checkpoint, run[0] / "bundle", format="bundle", registry=shared_registry())


def test_train_returns_the_run_directory_and_its_metrics(run):
    root, overrides, result = run
    # as the CLI names it: paths.output_root / run_name / <date>_<time>
    assert result.run_dir.parent == root / "outputs" / "tiny"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", result.run_dir.name)
    assert result.metrics == json.loads((result.run_dir / "metrics.json").read_text())
    assert result.metrics["overrides"] == overrides
    assert [result.metrics["stages"][s]["steps"] for s in ("align", "instruct")] == [1, 1]
    test = result.metrics["test"]
    assert test["n"] == 4 and 0.0 <= test["exact_match"] <= 1.0 and "chance/exact_match" in test
    assert result.checkpoint == result.run_dir / "checkpoints" / "final"
    assert (result.checkpoint / "weights.safetensors").is_file()
    # what it returns loads and answers
    answer = mmbridge.load(result.checkpoint, device="cpu", registry=shared_registry()).generate(
        PROMPT, image=example_png(root, 1), max_new_tokens=4)
    assert isinstance(answer, str)


def test_eval_on_a_bundle_equals_eval_on_its_checkpoint(run, bundle, tmp_path):
    from mmbridge.commands.evaluate import main

    results = {}
    for name, path in (("checkpoint", run[2].checkpoint), ("bundle", bundle)):
        out, preds = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        assert main([f"checkpoint={path}", "max_samples=4", "device=cpu", f"out={out}", f"predictions={preds}"]) == 0
        results[name] = (json.loads(out.read_text()), preds.read_text().splitlines())
    (metrics, answers), (b_metrics, b_answers) = results["checkpoint"], results["bundle"]
    assert metrics["n"] == 4 and len(answers) == 8  # every question with and without the image
    assert b_metrics == metrics and b_answers == answers


def test_generate_command_on_a_bundle_equals_the_python_api(bundle, tmp_path, capsys):
    from mmbridge.commands.generate import main

    image = example_png(tmp_path, 2)
    assert main([f"checkpoint={bundle}", f"image={image}", f"prompt={PROMPT}", "device=cpu",
                 "max_new_tokens=6"]) == 0
    cli = capsys.readouterr().out.strip()
    assert mmbridge.load(bundle, device="cpu", registry=shared_registry()).generate(PROMPT, image=image, max_new_tokens=6) == cli


@pytest.mark.slow
def test_the_python_api_example_runs_and_the_bundle_answers_as_the_checkpoint(tmp_path):
    """``examples/python_api.py`` as a user runs it (training included, 1 + 1 steps)."""
    out = tmp_path / "example"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), "--steps", "1", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert Path(lines["run"]) == out / "run" and (out / "run" / "metrics.json").is_file()
    assert lines["bundle"] == str(out / "bundle")
    assert json.loads((out / "bundle" / "mmbridge.json").read_text())["format"] == "bundle"
    answer = lines["checkpoint answer"]
    assert lines["chat answer"] == answer
    assert lines["bundle answer"] == f"{answer} (the same)"
    # and the answer is the trained model's, loaded here
    want = mmbridge.load(out / "run" / "checkpoints" / "final", device="cpu", registry=shared_registry())
    assert repr(want.generate(PROMPT, image=str(out / "example-1.png"), max_new_tokens=8)) == answer
