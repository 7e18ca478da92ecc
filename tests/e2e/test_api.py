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
import torch
from helpers import make_checkpoint, shared_registry

import mmbridge
from mmbridge.errors import ConfigError
from mmbridge.export import export
from mmbridge.plugins.encoders._image import example_png

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "What colour is the shape?"
# the smallest real run (as tests/test_registry_once.py): 1 step per stage, 4 test questions
SMALL = [
    "experiment=tiny",
    "data.n_train=8",
    "data.n_val=4",
    "data.n_test=4",
    "evaluation.max_samples=4",
    "evaluation.val_samples=2",
    "evaluation.batch_size=4",
    "trainer.enable_progress_bar=false",
    "stages.align.batch_size=4",
    "stages.align.max_steps=1",
    "stages.align.val_every=1",
    "stages.instruct.batch_size=4",
    "stages.instruct.max_steps=1",
    "stages.instruct.val_every=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``mmbridge.train`` with the CLI's default run directory under ``paths.output_root``."""
    root = tmp_path_factory.mktemp("api")
    overrides = [
        *SMALL,
        f"paths.output_root={root / 'outputs'}",
        f"paths.cache_dir={root / 'cache'}",
    ]
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
        PROMPT, image=example_png(root, 1), max_new_tokens=4
    )
    assert isinstance(answer, str)


def test_eval_on_a_bundle_equals_eval_on_its_checkpoint(run, bundle, tmp_path):
    from mmbridge.commands.evaluate import main

    results = {}
    for name, path in (("checkpoint", run[2].checkpoint), ("bundle", bundle)):
        out, preds = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        assert (
            main(
                [
                    f"checkpoint={path}",
                    "max_samples=4",
                    "device=cpu",
                    f"out={out}",
                    f"predictions={preds}",
                ]
            )
            == 0
        )
        results[name] = (json.loads(out.read_text()), preds.read_text().splitlines())
    (metrics, answers), (b_metrics, b_answers) = results["checkpoint"], results["bundle"]
    assert metrics["n"] == 4 and len(answers) == 8  # every question with and without the image
    assert b_metrics == metrics and b_answers == answers


def test_generate_command_on_a_bundle_equals_the_python_api(bundle, tmp_path, capsys):
    from mmbridge.commands.generate import main

    image = example_png(tmp_path, 2)
    assert (
        main(
            [
                f"checkpoint={bundle}",
                f"image={image}",
                f"prompt={PROMPT}",
                "device=cpu",
                "max_new_tokens=6",
            ]
        )
        == 0
    )
    cli = capsys.readouterr().out.strip()
    assert (
        mmbridge.load(bundle, device="cpu", registry=shared_registry()).generate(
            PROMPT, image=image, max_new_tokens=6
        )
        == cli
    )


@pytest.mark.slow
def test_the_python_api_example_runs_and_the_bundle_answers_as_the_checkpoint(tmp_path):
    """``examples/python_api.py`` as a user runs it (training included, 1 + 1 steps)."""
    out = tmp_path / "example"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "python_api.py"),
            "--steps",
            "1",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert Path(lines["run"]) == out / "run" and (out / "run" / "metrics.json").is_file()
    assert lines["bundle"] == str(out / "bundle")
    assert json.loads((out / "bundle" / "mmbridge.json").read_text())["format"] == "bundle"
    answer = lines["checkpoint answer"]
    assert lines["chat answer"] == answer
    assert lines["bundle answer"] == f"{answer} (the same)"
    # and the answer is the trained model's, loaded here
    want = mmbridge.load(
        out / "run" / "checkpoints" / "final", device="cpu", registry=shared_registry()
    )
    assert repr(want.generate(PROMPT, image=str(out / "example-1.png"), max_new_tokens=8)) == answer


# -- media objects and content parts (the answer a file gives, whatever holds the media) --------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """An image + audio model (timm ViT and a 1-layer random Whisper on the tiny Llama), its
    media files, and the answers their paths give."""
    from mmbridge.plugins.encoders.whisper_encoder import WhisperEncoder

    root = tmp_path_factory.mktemp("media")
    whisper = WhisperEncoder.for_testing(root)
    ckpt = make_checkpoint(
        root / "final",
        [
            "experiment=tiny",
            "encoder.image_size=32",
            "+branches.audio.encoder.name=whisper",
            f"+branches.audio.encoder.checkpoint={whisper.path}",
            "+branches.audio.connector.name=pool_mlp",
            "+branches.audio.connector.stride=8",
        ],
    )
    m = mmbridge.load(ckpt, device="cpu", registry=shared_registry())
    files = {
        "image": example_png(root, 1),
        "other": example_png(root, 2),
        "audio": whisper.example_media(root, 1),
    }
    return m, files


def ask(m, **media) -> str:
    return m.generate(PROMPT, max_new_tokens=6, **media)


def user_turn(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": PROMPT}]}]


def test_images_as_objects_answer_as_their_file(mixed):
    import base64

    import numpy as np
    from PIL import Image

    m, files = mixed
    want = ask(m, image=files["image"])
    assert want != ask(m, image=files["other"])  # the image matters: the comparisons can fail
    pil = Image.open(files["image"])
    pixels = np.asarray(pil.convert("RGB"))
    raw = Path(files["image"]).read_bytes()
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    for value in (pil, pixels, pixels.astype(np.float32) / 255.0, raw, url, Path(files["image"])):
        assert ask(m, image=value) == want, type(value).__name__
    parts = [
        {"type": "image_url", "image_url": {"url": url}},  # OpenAI
        {"type": "image_url", "image_url": {"url": files["image"]}},  # a local path
        {"type": "image", "image": pil},
        {"type": "image", "path": files["image"]},
    ]  # HF
    for part in parts:
        assert m.chat(user_turn(part), max_new_tokens=6) == want, part
    # a batch: one object per prompt
    assert m.generate([PROMPT, PROMPT], image=[pil, raw], max_new_tokens=6) == [want, want]


def test_audio_as_objects_answers_as_its_file(mixed):
    import base64

    soundfile = pytest.importorskip("soundfile")

    m, files = mixed
    want, logits = ask(m, audio=files["audio"]), m.logits(PROMPT, audio=files["audio"])[0]
    samples, sr = soundfile.read(files["audio"], dtype="float32")
    # the sound matters (a tiny random Whisper moves the logits, not always the greedy words)
    assert not torch.equal(m.logits(PROMPT, audio=(samples[::-1].copy(), sr))[0], logits)
    raw = Path(files["audio"]).read_bytes()
    for value in (
        (samples, sr),
        {"array": samples, "sampling_rate": sr},
        raw,
        "data:audio/wav;base64," + base64.b64encode(raw).decode(),
    ):
        assert torch.equal(m.logits(PROMPT, audio=value)[0], logits), type(value).__name__
        assert ask(m, audio=value) == want
    part = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(raw).decode(), "format": "wav"},
    }
    assert m.chat(user_turn(part), max_new_tokens=6) == want
    both = ask(m, image=files["image"], audio=files["audio"])
    assert (
        m.chat(user_turn({"type": "image", "image": files["image"]}, part), max_new_tokens=6)
        == both
    )


def test_several_images_in_one_message_fill_their_placeholders_in_order(mixed):
    m, files = mixed
    a, b = files["image"], files["other"]

    def by_hand(first: str, second: str) -> str:
        batch = m.encode(
            [[{"from": "human", "value": f"<image>\n<image>\n{PROMPT}"}]],
            [{"image": [first, second]}],
        )
        new = m.session.model.generate(batch, max_new_tokens=6)
        return m.tokenizer.decode(new[0], skip_special_tokens=True).strip()

    got = m.chat(
        user_turn({"type": "image", "path": a}, {"type": "image", "path": b}), max_new_tokens=6
    )
    assert got == by_hand(a, b) and by_hand(a, b) != by_hand(b, a)


def test_bad_media_are_refused_with_what_was_wrong(mixed):
    import numpy as np

    from mmbridge.data.inputs import MediaError

    m, files = mixed
    cases = [
        ({"image": "https://example.com/x.png"}, "URLs are never fetched"),
        ({"image": b"not an image"}, "not a readable image"),
        ({"image": np.zeros((5, 5, 2), np.uint8)}, r"must be \[H, W\], \[H, W, 3\]"),
        ({"audio": (np.zeros(10), -1)}, "sampling rate must be a positive integer"),
    ]
    for media, match in cases:
        with pytest.raises(MediaError, match=match):
            ask(m, **media)
    with pytest.raises(MediaError, match="unknown content part type 'video_url'"):
        m.chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}])
    with pytest.raises(ConfigError, match="both as content parts and as image="):
        m.chat(user_turn({"type": "image", "path": files["image"]}), image=files["image"])
