"""Benchmark formats (VQAv2, TextVQA, GQA, POPE, ScienceQA-IMG, MMBench) read from fixtures in
their exact official layouts, scored with answers chosen here, against figures worked out by
hand; and ``mmbridge eval data=pope`` end to end on a tiny checkpoint."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import mmbridge_exe
from PIL import Image

from mmbridge.config import compose
from mmbridge.data.llava import read_llava
from mmbridge.errors import ConfigError, DataError
from mmbridge.evaluation import benchmarks as bm
from mmbridge.evaluation.qa import qa_items
from mmbridge.model import assemble
from mmbridge.plugins.datasets.gqa import GQADataset
from mmbridge.plugins.datasets.multiple_choice import MultipleChoiceDataset
from mmbridge.plugins.datasets.pope import POPEDataset
from mmbridge.plugins.datasets.vqa import VQADataset
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.training.checkpoint import save_checkpoint


def _image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def _score(source, tmp_path: Path, answers: dict[str, str]):
    """Read ``source`` as mmbridge does and score ``answers`` (question id -> free answer)."""
    files = source.prepare(tmp_path / "cache")
    (split,) = files.splits
    items = qa_items(read_llava(files.splits[split], files.media_root))
    preds = [answers[it.sample.id.split("#")[0]] for it in items]
    out, per_item = bm.score(
        [it.sample.meta for it in items],
        [it.answer for it in items],
        preds,
        [it.qtype for it in items],
    )
    return out, per_item, items


# -- normalisation and answer reading --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two dogs.", "2 dogs"),
        ("dont know", "don't know"),
        ("The cat", "cat"),
        ("yes!", "yes"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("t-shirt", "t shirt"),
        ("man's hat", "man 's hat"),
        ("None", "0"),
        ("  Red\n", "red"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert bm.normalize_vqa_answer(raw) == norm


def test_vqa_normalisation_matches_lmms_eval_processor():
    """The same answers as lmms-eval's copy of EvalAI's processor, when it is installed."""
    mod = pytest.importorskip(
        "lmms_eval.tasks._task_utils.vqa_eval_metric",
        reason="lmms-eval not installed (pip install -e '.[eval]')",
    )
    proc = mod.EvalAIAnswerProcessor()
    for raw in [
        "Two dogs.",
        "dont know",
        "the man's hat",
        "yes, it is!",
        "a (red) car",
        "1,000 people",
        "3.5 m",
        "Ten",
        "it's   blue",
        "N/A",
        "well...ok",
        "isnt",
        "e-mail @home",
    ]:
        assert bm.normalize_vqa_answer(raw) == proc(raw), raw


def test_vqa_accuracy_leave_one_out():
    assert bm.vqa_accuracy("red", ["red"] * 10) == 1.0
    # 3 of 10 match: 3 subsets drop a match (2/3), 7 keep all three (1) -> (3 * 2/3 + 7) / 10
    assert bm.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # 1 of 10: the subset without it scores 0, the other nine 1/3 -> 9 * (1/3) / 10
    assert bm.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    assert bm.vqa_accuracy("blue", ["red"] * 10) == 0.0
    with pytest.raises(DataError, match="answers"):
        bm.vqa_accuracy("x", [])


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. a dog", "B"),
        ("The answer is (C).", "C"),
        ("a dog", "B"),
        ("A dog is shown", "B"),
        ("I think it is a cat", "A"),
        ("C", "C"),
        ("no idea", None),
        ("Either A, B or C", None),
    ],
)
def test_extract_choice(text, letter):
    assert bm.extract_choice(text, {"A": "cat", "B": "dog", "C": "bird"}) == letter


def test_pope_answer_reading():
    assert bm.pope_answer("Yes, there is a dog.") == "yes"
    assert bm.pope_answer("No") == "no"
    assert bm.pope_answer("There is not a dog in the image.") == "no"
    assert bm.pope_answer("Yes. No cat though.") == "yes"  # the first sentence only
    assert bm.pope_answer("Nope") == "yes"  # POPE's rule: only the words No / no / not say no


def test_score_hook_leaves_other_questions_alone():
    out, per_item = bm.score(
        [{}, {"benchmark": "gqa"}], ["a", "b"], ["a", "b"], ["t", "t"], prefix="x/"
    )
    assert out == {"x/gqa_accuracy": 1.0} and per_item == [None, 1.0]
    with pytest.raises(
        DataError, match="meta.benchmark='vqav2'.*available: vqa, gqa, pope, multiple_choice"
    ):
        bm.score([{"benchmark": "vqav2"}], ["a"], ["a"], ["t"])


# -- VQAv2 / TextVQA -------------------------------------------------------------------------------


def _vqav2(root: Path) -> Path:
    """VQAv2's val layout: questions + annotations JSON, images in val2014/."""
    rows = [
        (42, 420, "What colour is the bus?", "other", ["red"] * 10),
        (43, 430, "How many dogs?", "number", ["2"] * 3 + ["3"] * 7),
        (44, 440, "Is it raining?", "yes/no", ["yes"] + ["no"] * 9),
    ]
    questions, annotations = [], []
    for image_id, qid, q, atype, answers in rows:
        _image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
        questions.append({"image_id": image_id, "question": q, "question_id": qid})
        annotations.append(
            {
                "question_type": "what",
                "multiple_choice_answer": max(set(answers), key=answers.count),
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
                "image_id": image_id,
                "answer_type": atype,
                "question_id": qid,
            }
        )
    path = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    path.write_text(
        json.dumps(
            {
                "info": {},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": {},
                "data_subtype": "val2014",
                "questions": questions,
            }
        )
    )
    (root / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps(
            {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": annotations}
        )
    )
    return path


def test_vqav2_official_layout(tmp_path):
    path = _vqav2(tmp_path / "vqav2")
    src = VQADataset(path=str(path))  # annotations and images found by their official names
    out, per_item, items = _score(src, tmp_path, {"420": "Red.", "430": "two", "440": "Yes"})
    assert per_item == pytest.approx([1.0, 0.9, 0.3])
    assert out["vqa_accuracy"] == pytest.approx((1.0 + 0.9 + 0.3) / 3)
    assert out["vqa_accuracy/number"] == pytest.approx(0.9)
    assert out["vqa_accuracy/yes/no"] == pytest.approx(0.3)
    assert items[0].sample.conversations[0]["value"] == (
        "<image>\nWhat colour is the bus?\nAnswer the question using a single word or phrase."
    )
    assert items[1].answer == "3" and items[0].sample.media["image"].endswith(
        "COCO_val2014_000000000042.jpg"
    )


def test_vqav2_without_annotations_is_refused(tmp_path):
    path = _vqav2(tmp_path / "vqav2")
    (tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(ConfigError, match="data.annotations"):
        VQADataset(path=str(path)).prepare(tmp_path / "cache")


def test_textvqa_official_layout(tmp_path):
    root = tmp_path / "textvqa"
    _image(root / "train_images" / "003a8ae2ef43b901.jpg")
    answers = ["nokia"] * 2 + ["samsung"] * 8
    (root / "TextVQA_0.5.1_val.json").write_text(
        json.dumps(
            {
                "dataset_type": "val",
                "dataset_name": "textvqa",
                "dataset_version": "0.5.1",
                "data": [
                    {
                        "question": "what brand is the phone?",
                        "image_id": "003a8ae2ef43b901",
                        "image_classes": ["Mobile phone"],
                        "flickr_original_url": "",
                        "flickr_300k_url": "",
                        "image_width": 1024,
                        "image_height": 768,
                        "answers": answers,
                        "question_tokens": ["what", "brand", "is", "the", "phone"],
                        "question_id": 34602,
                        "set_name": "val",
                    }
                ],
            }
        )
    )
    src = VQADataset(path=str(root / "TextVQA_0.5.1_val.json"))
    out, per_item, items = _score(src, tmp_path, {"34602": "Nokia"})
    # 2 of 10 match: the 2 subsets without one keep 1 (1/3), the other 8 keep 2 (2/3)
    assert out["vqa_accuracy"] == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert items[0].answer == "samsung"


# -- GQA -------------------------------------------------------------------------------------------


def test_gqa_official_layout(tmp_path):
    root = tmp_path / "gqa"
    questions = {}
    for qid, image, q, a, structural in [
        ("201307251", "n161313", "Is it overcast?", "no", "verify"),
        ("201640614", "n235859", "What vehicle is it?", "car", "query"),
        ("202225914", "n235859", "What colour is the car?", "green", "query"),
    ]:
        _image(root / "images" / f"{image}.jpg")
        questions[qid] = {
            "semantic": [],
            "entailed": [],
            "equivalent": [qid],
            "question": q,
            "imageId": image,
            "isBalanced": True,
            "groups": {"global": None, "local": None},
            "answer": a,
            "semanticStr": "",
            "annotations": {},
            "fullAnswer": f"It is {a}.",
            "types": {"structural": structural, "semantic": "attr", "detailed": "x"},
        }
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    src = GQADataset(path=str(root / "testdev_balanced_questions.json"))
    out, per_item, _ = _score(
        src, tmp_path, {"201307251": "No.", "201640614": "A car", "202225914": "blue"}
    )
    assert per_item == [1.0, 1.0, 0.0]  # "A car" == "car" once the article goes
    assert out == pytest.approx(
        {"gqa_accuracy": 2 / 3, "gqa_accuracy/query": 0.5, "gqa_accuracy/verify": 1.0}
    )


# -- POPE ------------------------------------------------------------------------------------------


def test_pope_official_layout(tmp_path):
    root = tmp_path / "pope"
    images = tmp_path / "val2014"
    rows = {
        "random": [(1, "yes"), (2, "yes"), (3, "no"), (4, "no")],
        "adversarial": [(1, "yes"), (2, "no")],
    }
    for cat, qs in rows.items():
        lines = []
        for qid, label in qs:
            name = f"COCO_val2014_{qid:012d}.jpg"
            _image(images / name)
            lines.append(
                json.dumps(
                    {
                        "question_id": qid,
                        "image": name,
                        "text": "Is there a dog in the image?",
                        "label": label,
                    }
                )
            )
        root.mkdir(exist_ok=True)
        (root / f"coco_pope_{cat}.json").write_text(
            "\n".join(lines) + "\n"
        )  # JSON lines, as published
    src = POPEDataset(path=str(root), image_dir=str(images))
    answers = {
        "random-1": "Yes, there is.",
        "random-2": "No.",
        "random-3": "Yes",
        "random-4": "There is not a dog.",
        "adversarial-1": "yes",
        "adversarial-2": "yes",
    }
    out, per_item, _ = _score(src, tmp_path, answers)
    # random: TP 1, FN 1, FP 1, TN 1; adversarial: TP 1, FP 1; together TP 2, FP 2, TN 1, FN 1
    assert out["pope/accuracy/random"] == 0.5 and out["pope/f1/random"] == 0.5
    assert out["pope/recall/adversarial"] == 1.0 and out["pope/precision/adversarial"] == 0.5
    assert out["pope/f1/adversarial"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert out["pope/accuracy"] == pytest.approx(3 / 6)
    assert out["pope/precision"] == pytest.approx(2 / 4)
    assert out["pope/recall"] == pytest.approx(2 / 3)
    assert out["pope/f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert out["pope/yes_ratio"] == pytest.approx(4 / 6)
    assert out["pope/yes_ratio/random"] == 0.5 and out["pope/yes_ratio/adversarial"] == 1.0
    assert sum(per_item) == 3


# -- multiple choice: ScienceQA-IMG, MMBench -------------------------------------------------------


def test_scienceqa_img_official_layout(tmp_path):
    root = tmp_path / "scienceqa"
    problems = {
        "5": {
            "question": "Which animal is a mammal?",
            "choices": ["frog", "whale", "shark"],
            "answer": 1,
            "hint": "Look at the picture.",
            "image": "image.png",
            "task": "closed choice",
            "grade": "grade3",
            "subject": "natural science",
            "topic": "biology",
            "category": "x",
            "skill": "x",
            "lecture": "",
            "solution": "",
            "split": "test",
        },
        "7": {
            "question": "Which is a state?",
            "choices": ["Ohio", "Paris"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "task": "closed choice",
            "grade": "grade4",
            "subject": "social science",
            "topic": "geography",
            "category": "x",
            "skill": "x",
            "lecture": "",
            "solution": "",
            "split": "test",
        },
        "9": {
            "question": "Text only?",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": None,
            "subject": "language science",
            "split": "test",
        },
        "11": {
            "question": "Train one",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "subject": "natural science",
            "split": "train",
        },
    }
    for pid in ("5", "7"):
        _image(root / "images" / "test" / pid / "image.png")
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(
        json.dumps({"train": ["11"], "val": [], "test": ["5", "7", "9"]})
    )
    src = MultipleChoiceDataset(path=str(root))
    out, per_item, items = _score(src, tmp_path, {"5": "The answer is B.", "7": "Paris"})
    assert [it.sample.id for it in items] == [
        "5#0",
        "7#0",
    ]  # IMG: the text-only question is left out
    assert items[0].sample.conversations[0]["value"] == (
        "<image>\nContext: Look at the picture.\nWhich animal is a mammal?\n"
        "A. frog\nB. whale\nC. shark\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert items[0].answer == "B"
    assert per_item == [1.0, 0.0]
    assert out["mc_accuracy"] == 0.5 and out["mc_accuracy/natural science"] == 1.0
    assert out["mc_unmatched"] == 0.0


def _png_b64(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_tsv(path: Path, rows: list[dict]) -> Path:
    cols = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "image",
        "source",
        "l2-category",
        "comment",
        "split",
    ]
    lines = ["\t".join(cols)]
    for r in rows:
        lines.append("\t".join(str(r.get(c, "nan")) for c in cols))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mmbench_circular_evaluation(tmp_path):
    tsv = _mmbench_tsv(
        tmp_path / "mmbench_dev_en.tsv",
        [
            {
                "index": 0,
                "question": "What colour is it?",
                "hint": "nan",
                "A": "red",
                "B": "blue",
                "answer": "A",
                "category": "attribute",
                "image": _png_b64((255, 0, 0)),
                "split": "dev",
            },
            {
                "index": 1,
                "question": "Which shape?",
                "hint": "A drawing.",
                "A": "circle",
                "B": "square",
                "C": "star",
                "answer": "C",
                "category": "shape",
                "image": _png_b64((0, 0, 255)),
                "split": "dev",
            },
        ],
    )
    plain, _, items = _score(
        MultipleChoiceDataset(path=str(tsv)), tmp_path / "a", {"0": "A", "1": "C"}
    )
    assert plain["mc_accuracy"] == 1.0 and "mc_circular_accuracy" not in plain
    assert Image.open(items[0].sample.media["image"]).getpixel((0, 0)) == (255, 0, 0)

    src = MultipleChoiceDataset(path=str(tsv), circular=True)
    files = src.prepare(tmp_path / "b")
    samples = read_llava(files.splits["test"], files.media_root)
    # 2 + 3 rotations; the right option moves with each rotation
    assert [(s.id, s.meta["letter"]) for s in samples] == [
        ("0@0", "A"),
        ("0@1", "B"),
        ("1@0", "C"),
        ("1@1", "B"),
        ("1@2", "A"),
    ]
    assert "A. square\nB. star\nC. circle" in samples[3].conversations[0]["value"]
    # question 0 right in both rotations; question 1 wrong in its last rotation
    answers = ["red", "B", "C", "(B) star", "B"]
    out, per_item = bm.score(
        [s.meta for s in samples],
        [s.conversations[1]["value"] for s in samples],
        answers,
        [s.meta["qtype"] for s in samples],
    )
    assert per_item == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert out["mc_accuracy"] == pytest.approx(4 / 5)
    assert out["mc_circular_accuracy"] == 0.5


def test_mmbench_tsv_with_its_own_rotations(tmp_path):
    """MMBench's circular TSVs carry the rotations as rows ``i + k * 1e6``: grouped, not
    re-rotated."""
    img = _png_b64((0, 255, 0))
    tsv = _mmbench_tsv(
        tmp_path / "mmbench_circular.tsv",
        [
            {
                "index": 3,
                "question": "Q?",
                "A": "x",
                "B": "y",
                "answer": "A",
                "category": "c",
                "image": img,
            },
            {
                "index": 1000003,
                "question": "Q?",
                "A": "y",
                "B": "x",
                "answer": "B",
                "category": "c",
                "image": img,
            },
        ],
    )
    out, per_item, items = _score(
        MultipleChoiceDataset(path=str(tsv), circular=True), tmp_path, {"3": "A", "1000003": "A"}
    )
    assert [it.sample.meta["circular"] for it in items] == ["3", "3"]
    assert per_item == [1.0, 0.0] and out["mc_circular_accuracy"] == 0.0


def test_mmbench_unknown_format_and_missing_answers(tmp_path):
    tsv = _mmbench_tsv(
        tmp_path / "mmbench_test.tsv",
        [
            {
                "index": 0,
                "question": "Q?",
                "A": "x",
                "B": "y",
                "answer": "nan",
                "image": _png_b64((0, 0, 0)),
            }
        ],
    )
    with pytest.raises(DataError, match="answer None is not one of its options A, B"):
        MultipleChoiceDataset(path=str(tsv)).prepare(tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.format: 'seed' is not one of scienceqa, mmbench"):
        MultipleChoiceDataset(path=str(tsv), format="seed")


# -- mmbridge eval data=<format> -------------------------------------------------------------------


def test_eval_cli_scores_pope_on_a_checkpoint(tmp_path):
    """``mmbridge eval checkpoint=... data=pope data.path=...``: the stored config's data node is
    replaced by the group's, the POPE metrics are printed and written, and they are the
    metrics of the answers in predictions.jsonl read by POPE's rule."""
    registry = load_registry(autoload=False)
    cfg = compose(
        ["experiment=tiny", "encoder.image_size=32", f"paths.cache_dir={tmp_path / 'cache'}"],
        registry,
    )
    torch.manual_seed(0)
    save_checkpoint(assemble(cfg, registry), cfg, tmp_path / "ckpt", [], registry=registry)
    labels = ["yes", "no", "yes", "no"]
    lines = []
    for i, label in enumerate(labels):
        _image(tmp_path / "coco" / f"{i}.jpg", colour=(60 * i, 0, 0))
        lines.append(
            json.dumps(
                {"question_id": i, "image": f"{i}.jpg", "text": "Is there a cat?", "label": label}
            )
        )
    (tmp_path / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            mmbridge_exe(),
            "eval",
            f"checkpoint={tmp_path / 'ckpt'}",
            "data=pope",
            f"data.path={tmp_path / 'coco_pope_random.json'}",
            f"data.image_dir={tmp_path / 'coco'}",
            "device=cpu",
            "evaluation.max_new_tokens=4",
            f"out={tmp_path / 'm.json'}",
            f"predictions={tmp_path / 'p.jsonl'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    media = [r for r in rows if r["mode"] == "media"]
    assert [r["answer"] for r in media] == labels and metrics["n"] == 4
    said_no = [
        any(
            w in ("No", "no", "not")
            for w in r["prediction"].split(".")[0].replace(",", "").split(" ")
        )
        for r in media
    ]
    said_yes = [not n for n in said_no]
    assert metrics["pope/yes_ratio"] == pytest.approx(sum(said_yes) / 4)
    assert metrics["pope/accuracy"] == pytest.approx(
        sum((y and lab == "yes") or (not y and lab == "no") for y, lab in zip(said_yes, labels)) / 4
    )
    assert [r["score"] for r in media] == [
        float((y and lab == "yes") or (not y and lab == "no")) for y, lab in zip(said_yes, labels)
    ]
    assert "no_media/pope/accuracy" in metrics
    assert "pope/accuracy" in proc.stdout and "pope/yes_ratio" in proc.stdout


def test_eval_refuses_an_unknown_data_option(tmp_path):
    registry = load_registry(autoload=False)
    cfg = compose(["experiment=tiny"], registry)
    from mmbridge.config import merge_overrides

    with pytest.raises(
        ConfigError, match="unknown option 'vqa2' of config group 'data'.*did you mean"
    ):
        merge_overrides(cfg, ["data=vqa2"], registry)
    merged = merge_overrides(cfg, ["data=gqa", "data.path=/x.json", "seed=3"], registry)
    assert merged.data.name == "gqa" and merged.data.path == "/x.json" and merged.seed == 3
    assert "n_train" not in merged.data  # the shapes node is replaced, not merged into
