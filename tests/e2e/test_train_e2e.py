"""End to end through the real CLI: train (tiny), eval and generate on the checkpoint it wrote,
resume after a kill, DDP on two CPU processes, and the assembly errors before any step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TINY_FAST, mmbridge_exe
from safetensors.torch import load_file

FAST = [
    *TINY_FAST,
]


def cli(*args, cwd, timeout=600, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [mmbridge_exe(), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        **popen,
    )


@pytest.fixture
def refused(capsys, monkeypatch, tmp_path):
    """``refused(*args)``: ``mmbridge ARGS`` run in this process from ``tmp_path`` (the CLI's own
    ``main``, no interpreter start: for runs that stop on an error before any work; the runs
    above are real processes); returns (exit status, stderr)."""
    from mmbridge.cli import main

    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "MMBRIDGE_DISABLE_PLUGINS": "1",
        "COLUMNS": "200",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str]:
        try:
            rc = main(list(args))
        except SystemExit as exc:  # an error Hydra reports itself
            rc = exc.code if isinstance(exc.code, int) else 1
        return rc, capsys.readouterr().err

    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny two-stage run shared by the tests below."""
    root = tmp_path_factory.mktemp("e2e")
    run = root / "run"
    out = cli(
        "train",
        *FAST,
        "stages.align.max_steps=4",
        "stages.align.val_every=4",
        "stages.instruct.max_steps=12",
        "stages.instruct.val_every=12",
        f"paths.cache_dir={root / 'cache'}",
        f"hydra.run.dir={run}",
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run


def test_train_writes_metrics_checkpoints_and_logs(trained):
    _, run = trained
    m = json.loads((run / "metrics.json").read_text())
    assert m["stages"]["align"]["steps"] == 4 and m["stages"]["instruct"]["steps"] == 12
    # the tiny LLM trains fully in the instruct stage: its validation loss must fall
    assert m["val_loss_last"] < m["val_loss_first"]
    assert m["visual_tokens"] == {"image": 64}  # 64 px / patch 8 = 8 x 8 tokens, MLP keeps N
    assert 0 < m["parameters"]["trainable"] < m["parameters"]["total"]
    assert m["test"]["n"] > 0
    assert {"exact_match", "no_media/exact_match", "chance/exact_match"} <= set(m["test"])
    # every answer is kept: the share marked correct per mode is the reported exact match
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    for mode, key in (("media", "exact_match"), ("no_media", "no_media/exact_match")):
        rows = [p for p in preds if p["mode"] == mode]
        assert len(rows) == m["test"]["n"]
        assert sum(p["correct"] for p in rows) / len(rows) == pytest.approx(m["test"][key])
        assert all(p["question"].startswith("<image>") == (mode == "media") for p in rows)
    weights = load_file(str(run / "checkpoints" / "final" / "weights.safetensors"))
    # trainable weights only: connector + the fully trained tiny LLM, never the frozen encoder
    assert any(k.startswith("branches.image.connector.") for k in weights)
    assert not any(".encoder." in k for k in weights)
    assert (run / "checkpoints" / "final" / "config.yaml").is_file()
    assert (run / "logs" / "align" / "metrics.csv").is_file()
    assert any((run / "logs" / "tb_instruct").iterdir())


def test_eval_reproduces_the_runs_test_metrics(trained):
    root, run = trained
    out_json = root / "eval.json"
    preds = root / "eval_predictions.jsonl"
    out = cli(
        "eval",
        f"checkpoint={run / 'checkpoints' / 'final'}",
        f"out={out_json}",
        f"predictions={preds}",
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exact_match" in out.stdout
    got = json.loads(out_json.read_text())
    assert preds.read_text() == (run / "predictions.jsonl").read_text()
    want = json.loads((run / "metrics.json").read_text())["test"]
    assert got["exact_match"] == pytest.approx(want["exact_match"])
    assert got["n"] == want["n"]


def test_eval_through_tool_callers(trained):
    """``evaluation.tool_callers``: a pipeline caller whose tools do not apply leaves the prompt
    as it is, so it must give the plain evaluation's greedy answers; with ``image_info`` the
    tool's real result is in every prompt and one call per question is recorded."""
    from mmbridge.runtime.evaluate import evaluate_session
    from mmbridge.runtime.session import session_from_checkpoint

    _, run = trained
    session, _ = session_from_checkpoint(
        str(run / "checkpoints" / "final"),
        [
            "evaluation.tool_callers.plain.name=pipeline",
            "evaluation.tool_callers.plain.tools=[calculator]",
            "evaluation.tool_callers.facts.name=pipeline",
            "evaluation.tool_callers.facts.tools=[image_info]",
            "evaluation.tool_max_new_tokens=12",
            "evaluation.baselines=false",
        ],
    )
    out_file = run.parent / "tool_predictions.jsonl"
    m = evaluate_session(session, predictions=out_file)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    by_mode = {mode: [r for r in rows if r["mode"] == mode] for mode in ("media", "plain", "facts")}
    assert all(len(v) == m["n"] for v in by_mode.values())
    assert [r["prediction"] for r in by_mode["plain"]] == [
        r["prediction"] for r in by_mode["media"]
    ]
    assert m["plain/exact_match"] == m["exact_match"] and m["plain/tool_calls_per_question"] == 0
    assert m["facts/tool_calls_per_question"] == 1 and m["facts/tool_call_failures"] == 0
    for r in by_mode["facts"]:
        assert (
            r["question"].startswith("<image>\nOutput of image_info: size: ")
            and "dominant colours: " in r["question"]
        )
        assert r["calls"][0]["name"] == "image_info" and r["calls"][0]["ok"]
    assert 0 <= m["facts/exact_match"] <= 1


def test_generate_answers_about_a_real_photo(trained, tmp_path):
    root, run = trained
    from PIL import Image

    photo = tmp_path / "photo.png"
    try:
        from skimage import data

        Image.fromarray(data.astronaut()).save(photo)
    except ImportError:
        Image.new("RGB", (64, 64), "red").save(photo)
    out = cli(
        "generate",
        f"checkpoint={run / 'checkpoints' / 'final'}",
        f"image={photo}",
        "prompt=What colour is the circle?",
        "max_new_tokens=5",
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # The CLI answer is the greedy answer of the same checkpoint through the Python API.
    from mmbridge.contracts.types import Sample
    from mmbridge.runtime.session import session_from_checkpoint

    session, _ = session_from_checkpoint(str(run / "checkpoints" / "final"), with_data=False)
    sample = Sample(
        "p",
        {"image": str(photo)},
        [{"from": "human", "value": "<image>\nWhat colour is the circle?"}],
    )
    batch = session.batcher(use_cache=False).batch([sample], generation=True)
    new = session.model.generate(batch, max_new_tokens=5)
    assert new.shape == (1, 5) or int(new[0, -1]) in (
        session.chat.tokenizer.eos_token_id,
        session.chat.pad_id,
    )
    assert (
        out.stdout.strip()
        == session.chat.tokenizer.decode(new[0], skip_special_tokens=True).strip()
    )


def test_generate_and_eval_errors_name_the_argument(trained, tmp_path, refused):
    root, run = trained
    rc, err = refused(
        "generate", f"checkpoint={run / 'checkpoints' / 'final'}", "image=/nope.png", "prompt=hi"
    )
    assert rc == 1 and "image=/nope.png: no such file" in err
    rc, err = refused("eval", f"checkpoint={tmp_path}")
    assert rc == 1 and "weights.safetensors" in err


@pytest.mark.slow
def test_resume_after_kill_continues_from_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        *FAST,
        "stages.align.max_steps=2",
        "stages.instruct.max_steps=40",
        "stages.instruct.val_every=40",
        "+stages.instruct.checkpoint_every=5",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}
    proc = subprocess.Popen(
        [mmbridge_exe(), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = run / "checkpoints" / "instruct" / "last.ckpt"
    deadline = time.time() + 400
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert last.exists(), "no checkpoint was written before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()
    import torch

    # everything an exact resume needs loads weights-only: RNG state, the loader's position
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    step_at_kill = ckpt["global_step"]
    assert 0 < step_at_kill < 40
    (loader_state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["_sampler_iter_state"]["sampler_state"]["seed"] == 0
    assert {"torch", "numpy", "python"} <= set(ckpt["mmbridge"]["rng"])
    out = cli("train", f"resume={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["stages"]["instruct"]["steps"] == 40
    log = (run / "train.log").read_text() + out.stderr
    assert "already done" in log
    assert f"stage instruct: training from step {step_at_kill} " in log  # continued, not restarted
    # the validation points of the killed process are kept, the resumed one adds the last
    assert [h["step"] for h in m["stages"]["instruct"]["history"]] == [0.0, 40.0]


@pytest.mark.slow
def test_ddp_two_cpu_processes_see_disjoint_samples_and_agree(tmp_path):
    run = tmp_path / "run"
    out = cli(
        "train",
        *FAST,
        "trainer=ddp_cpu",
        "schedule=[align]",
        "data.n_train=32",
        "stages.align.batch_size=4",
        "stages.align.max_steps=4",
        "stages.align.val_every=4",
        "debug.record_sample_ids=true",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ids = [
        json.loads((run / "debug" / f"align_rank{r}_ids.json").read_text())["ids"] for r in (0, 1)
    ]
    assert len(ids[0]) == len(ids[1]) == 16  # 4 steps x batch 4 on each rank
    assert not set(ids[0]) & set(ids[1])
    w = [load_file(str(run / "debug" / f"align_rank{r}_weights.safetensors")) for r in (0, 1)]
    assert w[0].keys() == w[1].keys() and w[0]
    import torch

    for k in w[0]:
        assert torch.equal(w[0][k], w[1][k]), k


def _bad_llava(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), "blue").save(tmp_path / "a.png")
    rec = [
        {
            "id": "s1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "What colour?"},
                {"from": "gpt", "value": "blue"},
            ],
        }
    ]
    (tmp_path / "bad.json").write_text(json.dumps(rec))
    return tmp_path / "bad.json"


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["+connector.in_dim=999"], ["connector.in_dim=999", "encoder", "192"]),
        (["+connector.out_dim=7"], ["connector.out_dim=7", "llm", "128"]),
        (["+connector.depht=3"], ["connector.depht", "did you mean 'depth'"]),
        (["connector.depht=3"], ["connector.depht"]),  # Hydra itself refuses an unknown key
        (["stages.align.train.llm=frozn"], ["stages.align.train.llm", "frozen, lora, full"]),
        (["schedule=[align,polish]"], ["schedule", "'polish'"]),
    ],
)
def test_bad_combinations_fail_before_training(overrides, needles, tmp_path, refused):
    rc, err = refused(
        "train",
        *FAST,
        *overrides,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert rc == 1, err[-2000:]
    for n in needles:
        assert n in err, (n, err[-2000:])
    assert not (tmp_path / "run" / "logs").exists()  # no training step ran


def test_placeholder_count_error_names_file_and_record(tmp_path, refused):
    bad = _bad_llava(tmp_path)
    fast = [a for a in FAST if not a.startswith("data.")]
    rc, err = refused(
        "train",
        *fast,
        "data=llava",
        f"data.train={bad}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert rc == 1
    assert str(bad) in err and "s1" in err and "<image>" in err


def test_mixed_image_and_audio_sample_trains_and_generates(tmp_path):
    """One sample holds an image and an audio clip: two encoders and two connectors (keyed by
    modality, the audio one under ``branches.audio``) feed one LLM; both connectors train, the
    answer needs both media, and ``generate`` takes both."""
    from PIL import Image

    from mmbridge.plugins.encoders.whisper_encoder import WhisperEncoder
    from mmbridge.utils.media_io import chirp, write_wav

    ckpt = WhisperEncoder.for_testing(tmp_path).path
    data = tmp_path / "mixed"
    data.mkdir()
    rows = []
    for i in range(24):
        colour = ("red", "blue")[i % 2]
        seconds = (0.5, 1.5)[(i // 2) % 2]  # the answer's second word comes from the audio
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        write_wav(data / f"{i}.wav", chirp(seconds, sr=16000), 16000)
        answer = f"{colour} {'short' if seconds < 1 else 'long'}"
        rows.append(
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "audio": f"{i}.wav",
                "conversations": [
                    {"from": "human", "value": "<image>\n<audio>\nColour and length?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (data / "train.json").write_text(json.dumps(rows[:16]))
    (data / "test.json").write_text(json.dumps(rows[16:]))
    run = tmp_path / "run"
    out = cli(
        "train",
        "experiment=tiny",
        "data=llava",
        f"data.train={data / 'train.json'}",
        f"data.val={data / 'test.json'}",
        f"data.test={data / 'test.json'}",
        "+branches.audio.encoder.name=whisper",
        f"+branches.audio.encoder.checkpoint={ckpt}",
        "+branches.audio.connector.name=pool_mlp",
        "+branches.audio.connector.stride=8",
        "stages.align.max_steps=3",
        "stages.align.val_every=3",
        "stages.align.batch_size=8",
        "stages.instruct.max_steps=8",
        "stages.instruct.val_every=8",
        "stages.instruct.batch_size=8",
        "evaluation.max_samples=8",
        "evaluation.val_samples=4",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["visual_tokens"]) == {"image", "audio"}
    assert m["visual_tokens"]["audio"] > 0 and m["visual_tokens"]["image"] == 64
    assert m["val_loss_last"] < m["val_loss_first"]
    assert m["test"]["n"] == 8
    weights = load_file(str(run / "checkpoints" / "final" / "weights.safetensors"))
    for modality in ("image", "audio"):
        assert any(k.startswith(f"branches.{modality}.connector.") for k in weights), modality
    out = cli(
        "generate",
        f"checkpoint={run / 'checkpoints' / 'final'}",
        f"image={data / '0.png'}",
        f"audio={data / '0.wav'}",
        "prompt=Colour and length?",
        "max_new_tokens=4",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()
