"""The lmms-eval backend ([E] item 1): lmms-eval's own CLI runs a tiny mmbridge checkpoint
(image + audio branches) on two local YAML tasks over local JSON files, offline — a generation
task scored by exact match and a multiple-choice task scored by log-likelihood — and its
scores and per-document outputs equal those of the model's own answers, computed here through
``mmbridge generate``'s path and the model's training forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed (the optional extra: "
    "pip install -e '.[eval]', then antlr4-python3-runtime==4.9.3 --no-deps)",
)

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from mmbridge.config import compose  # noqa: E402
from mmbridge.contracts.types import Sample  # noqa: E402
from mmbridge.data.chat import IGNORE  # noqa: E402
from mmbridge.plugins.encoders.whisper_encoder import WhisperEncoder  # noqa: E402
from mmbridge.registry.plugin_manager import load_registry  # noqa: E402
from mmbridge.runtime.session import open_session, session_from_checkpoint  # noqa: E402
from mmbridge.training.checkpoint import save_checkpoint  # noqa: E402
from mmbridge.utils.media_io import chirp, write_wav  # noqa: E402

GEN_TOKENS = 6
CHOICES = ["red", "green", "blue", "yellow"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40)]
QUESTIONS = [
    "What colour is the shape?",
    "Which shape is drawn?",
    "What is shown?",
    "Describe the picture.",
]

UTILS = """
from PIL import Image

from mmbridge.utils.media_io import read_audio


def doc_to_image(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_image_and_audio(doc):
    audio, sr = read_audio(doc["audio"])
    return [Image.open(doc["image"]).convert("RGB"), {"array": audio, "sampling_rate": sr}]
"""
GEN_TASK = """
task: mmb_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_image_and_audio
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs: {{max_new_tokens: {tokens}}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""
MC_TASK = """
task: mmb_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_image
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: target
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""


def direct_answer(session, media: dict[str, str], question: str) -> str:
    """The model's answer through ``mmbridge generate``'s path (one prompt, no batching)."""
    text = "".join(f"<{m}>\n" for m in media) + question
    sample = Sample(id="q", media=media, conversations=[{"from": "human", "value": text}])
    batch = session.batcher(use_cache=False).batch([sample], generation=True)
    new = session.model.generate(batch, max_new_tokens=GEN_TOKENS)
    return session.chat.tokenizer.decode(new[0], skip_special_tokens=True).strip()


def direct_logprob(session, image: str, question: str, choice: str) -> float:
    """log P(choice | image, question) from the model's training forward: its mean
    cross-entropy over the answer's tokens (the template's ``<|end|>\\n`` unlabelled) x count."""
    sample = Sample(
        id="q",
        media={"image": image},
        conversations=[
            {"from": "human", "value": "<image>\n" + question},
            {"from": "gpt", "value": choice},
        ],
    )
    batcher = session.batcher(use_cache=False)
    item = batcher.encode(sample)
    end = session.chat.tokenizer("<|end|>\n", add_special_tokens=False)["input_ids"]
    at = [i for i, t in enumerate(item["labels"]) if t != IGNORE]
    assert [item["labels"][i] for i in at[-len(end) :]] == end
    for i in at[-len(end) :]:
        item["labels"][i] = IGNORE
    batch = batcher.to_device(batcher.collate([item]))
    with torch.no_grad():
        loss = session.model(batch)
    return -float(loss) * (len(at) - len(end))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny image + audio checkpoint (random, untrained), four documents, the two task
    YAMLs, and the expected outputs of the model itself."""
    root = tmp_path_factory.mktemp("lmms")
    whisper = WhisperEncoder.for_testing(root).path
    registry = load_registry()
    cfg = compose(
        [
            "experiment=tiny",
            f"paths.cache_dir={root / 'cache'}",
            "device=cpu",
            "+branches.audio.encoder.name=whisper",
            f"+branches.audio.encoder.checkpoint={whisper}",
            "+branches.audio.connector.name=pool_mlp",
            "+branches.audio.connector.stride=8",
        ],
        registry,
    )
    save_checkpoint(open_session(cfg, registry, with_data=False).model, cfg, root / "ckpt", [])
    session, _ = session_from_checkpoint(
        str(root / "ckpt"), with_data=False, registry=registry, device="cpu"
    )

    docs = []
    for i, colour in enumerate(COLOURS):
        img = Image.new("RGB", (64, 64), (250 - 40 * i, 240, 235))
        ImageDraw.Draw(img).rectangle([8 + 4 * i, 10, 40 + 5 * i, 50 - 3 * i], fill=colour)
        img.save(root / f"{i}.png")
        write_wav(root / f"{i}.wav", chirp(0.4 + 0.3 * i, sr=16000, f0=200 + 150 * i), 16000)
        docs.append(
            {
                "id": i,
                "image": str(root / f"{i}.png"),
                "audio": str(root / f"{i}.wav"),
                "question": QUESTIONS[i],
            }
        )
    answers = [
        direct_answer(session, {"image": d["image"], "audio": d["audio"]}, d["question"])
        for d in docs
    ]
    logprobs = [
        [direct_logprob(session, d["image"], d["question"], c) for c in CHOICES] for d in docs
    ]
    best = [int(np.argmax(lp)) for lp in logprobs]
    # the last document's gold answer is not what the model says: 3 of 4 right in both tasks
    gold = [*answers[:3], answers[3] + " purple"]
    target = [*best[:3], (best[3] + 1) % len(CHOICES)]
    gen = [{**d, "answer": g} for d, g in zip(docs, gold)]
    mc = [
        {
            "id": d["id"],
            "image": d["image"],
            "question": d["question"],
            "choices": CHOICES,
            "target": t,
        }
        for d, t in zip(docs, target)
    ]

    tasks = root / "tasks"
    tasks.mkdir()
    (root / "gen.json").write_text(json.dumps(gen))
    (root / "mc.json").write_text(json.dumps(mc))
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "mmb_gen.yaml").write_text(GEN_TASK.format(data=root / "gen.json", tokens=GEN_TOKENS))
    (tasks / "mmb_mc.yaml").write_text(MC_TASK.format(data=root / "mc.json"))
    return {
        "root": root,
        "ckpt": root / "ckpt",
        "tasks": tasks,
        "answers": answers,
        "gold": gold,
        "logprobs": logprobs,
        "target": target,
    }


def run_lmms_eval(bench, out: Path) -> tuple[dict, dict[str, list[dict]]]:
    """lmms-eval's CLI in a subprocess (offline); returns (results, samples per task)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "LMMS_EVAL_DATASETS_CACHE": str(bench["root"] / "hf"),
        "MMBRIDGE_DISABLE_PLUGINS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "mmbridge",
        "--model_args",
        f"checkpoint={bench['ckpt']},device=cpu",
        "--tasks",
        "mmb_gen,mmb_mc",
        "--include_path",
        str(bench["tasks"]),
        "--batch_size",
        "3",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    found = sorted(out.rglob("*_results.json"))
    # lmms-eval's CLI logs an error during evaluation and still exits 0: the file tells
    assert proc.returncode == 0 and found, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(found[0].read_text())
    samples = {
        t: [
            json.loads(line)
            for line in next(out.rglob(f"*_samples_{t}.jsonl")).read_text().splitlines()
        ]
        for t in ("mmb_gen", "mmb_mc")
    }
    return results, samples


def test_lmms_eval_cli_scores_equal_the_models_own_answers(bench, tmp_path):
    results, samples = run_lmms_eval(bench, tmp_path / "out")

    # generation: every document's output is the model's own answer; exact match follows
    got = {s["doc_id"]: s["filtered_resps"] for s in samples["mmb_gen"]}
    assert got == dict(enumerate(bench["answers"]))
    expected = np.mean([a == g for a, g in zip(bench["answers"], bench["gold"])])
    assert expected == 0.75
    assert results["results"]["mmb_gen"]["exact_match,none"] == pytest.approx(expected)

    # multiple choice: each option's -log P is the model's own (lmms-eval picks the smallest),
    # and so is the accuracy
    for s in samples["mmb_mc"]:
        nll = [float(r[0]) for r in s["filtered_resps"]]
        assert nll == pytest.approx(
            [-lp for lp in bench["logprobs"][s["doc_id"]]], rel=1e-4, abs=1e-4
        )
    assert [s["acc"] for s in sorted(samples["mmb_mc"], key=lambda s: s["doc_id"])] == [1, 1, 1, 0]
    assert results["results"]["mmb_mc"]["acc,none"] == pytest.approx(0.75)


def test_entry_point_registers_the_backend_in_either_import_order():
    """``mmbridge.lmms`` imported before lmms-eval's model registry (which loads the entry
    point, importing it back) still registers ``mmbridge``."""
    code = textwrap.dedent("""
        import mmbridge.lmms
        from importlib.metadata import entry_points
        from lmms_eval.models import get_model
        print([ep.value for ep in entry_points(group="lmms_eval.models") if ep.name == "mmbridge"])
        print(get_model("mmbridge").__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["['mmbridge.lmms:manifest']", "MMBridgeLMM"]


def test_backend_loglikelihood_is_greedy_and_model_args_are_checked(bench):
    """Called directly: the model's own greedy answer is greedy, with -log P equal to the
    training forward's; a changed answer is not; ``model_args`` are checked before loading."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.instance import unwrap_generation_output as unwrap

    from mmbridge.errors import ConfigError
    from mmbridge.lmms import MMBridgeLMM

    with pytest.raises(ConfigError, match="pretrained=.*checkpoint, device, batch_size"):
        MMBridgeLMM(checkpoint=str(bench["ckpt"]), pretrained="x")
    with pytest.raises(ConfigError, match="batch_size=auto"):
        MMBridgeLMM(checkpoint=str(bench["ckpt"]), batch_size="auto")

    lm = MMBridgeLMM(checkpoint=str(bench["ckpt"]), device="cpu", batch_size=2)
    docs = json.loads((bench["root"] / "mc.json").read_text())
    lm.task_dict["t"] = {"test": docs}

    def image(doc):
        return [Image.open(doc["image"]).convert("RGB")]

    def request(doc_id: int, continuation: str) -> Instance:
        args = (docs[doc_id]["question"], continuation, image, doc_id, "t", "test")
        return Instance(
            request_type="loglikelihood",
            arguments=args,
            idx=0,
            metadata={"task": "t", "doc_id": doc_id, "repeats": 1},
        )

    choice = CHOICES[bench["target"][1]]  # the most probable option of document 1
    out = [
        unwrap(r)[0]
        for r in lm.loglikelihood(
            [request(1, " " + choice), request(1, " red purple"), request(0, " " + CHOICES[0])]
        )
    ]
    assert out[0][0] == pytest.approx(-bench["logprobs"][1][bench["target"][1]], rel=1e-4)
    assert out[2][0] == pytest.approx(-bench["logprobs"][0][0], rel=1e-4)
    assert out[1][1] is False


def test_score_continuations_marks_the_greedy_tokens(bench):
    """The model's own greedy tokens after the generation prompt score as greedy (in a right-
    padded batch beside a longer row); the same tokens with the last one changed do not, and
    lose log-probability."""
    from mmbridge.lmms import score_continuations

    session, _ = session_from_checkpoint(str(bench["ckpt"]), with_data=False, device="cpu")
    batcher, chat = session.batcher(use_cache=False), session.chat
    rows = []
    for k in (0, 1):
        sample = Sample(
            id=str(k),
            media={"image": str(bench["root"] / f"{k}.png")},
            conversations=[{"from": "human", "value": "<image>\n" + QUESTIONS[k] * (1 + 2 * k)}],
        )
        item = batcher.encode(sample, add_generation_prompt=True)
        batch = batcher.to_device(batcher.collate([item], left_pad=True))
        new = session.model.generate(batch, max_new_tokens=4)[0].tolist()
        rows.append((item, new))
    (item, new), (other, other_new) = rows
    changed = [*new[:-1], (new[-1] + 1) % len(chat.tokenizer)]

    def with_answer(item: dict, answer: list[int]) -> dict:
        return {
            **item,
            "input_ids": item["input_ids"] + answer,
            "labels": [IGNORE] * len(item["input_ids"]) + answer,
            "slot_modality": item["slot_modality"] + [""] * len(answer),
        }

    batch = batcher.collate(
        [with_answer(item, new), with_answer(other, other_new), with_answer(item, changed)]
    )
    (lp, greedy), (_, other_greedy), (lp_changed, changed_greedy) = score_continuations(
        session.model, batch
    )
    assert greedy and other_greedy and not changed_greedy
    assert lp_changed < lp < 0
