"""Fuzzed readers: valid files of every data format, mutated by a seeded loop (a key dropped, a
value of another type, the text truncated, the top level of another shape, bytes that are not
UTF-8, huge or deeply nested values). The only outcomes allowed are a correct read or one of
mmbridge's own errors naming the file; a raw ``KeyError`` / ``TypeError`` / ... fails the test.
Hypothesis is not a dependency: the loop is a fixed-seed generator, so a failure reproduces."""

from __future__ import annotations

import base64
import copy
import csv
import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmbridge.data.llava import read_llava
from mmbridge.errors import MMBridgeError
from mmbridge.plugins.datasets.gqa import GQADataset
from mmbridge.plugins.datasets.multiple_choice import MultipleChoiceDataset
from mmbridge.plugins.datasets.pope import POPEDataset
from mmbridge.plugins.datasets.vqa import VQADataset

ROUNDS = 40  # per format: all formats together take about a second
_PNG = io.BytesIO()
Image.new("RGB", (4, 4), (10, 20, 30)).save(_PNG, format="PNG")


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_PNG.getvalue())


# -- valid files in each official layout: (file to mutate, its JSON, reader) -----------------------


def _vqav2(root: Path) -> tuple[Path, Any, Callable[[], Any]]:
    for i in (1, 2):
        _image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    qs = {
        "data_subtype": "val2014",
        "questions": [{"image_id": i, "question": f"q{i}?", "question_id": 10 * i} for i in (1, 2)],
    }
    anns = {
        "annotations": [
            {
                "question_id": 10 * i,
                "answer_type": "other",
                "multiple_choice_answer": "a",
                "answers": [{"answer": "a", "answer_id": k} for k in range(10)],
            }
            for i in (1, 2)
        ]
    }
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    path = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    return path, qs, lambda: VQADataset(path=str(path))


def _vqav2_annotations(root: Path) -> tuple[Path, Any, Callable[[], Any]]:
    questions, qs, _ = _vqav2(root)
    questions.write_text(json.dumps(qs))
    path = root / "v2_mscoco_val2014_annotations.json"
    return path, json.loads(path.read_text()), lambda: VQADataset(path=str(questions))


def _textvqa(root: Path) -> tuple[Path, Any, Callable[[], Any]]:
    _image(root / "train_images" / "abc.jpg")
    data = {
        "data": [{"question_id": 7, "question": "what?", "image_id": "abc", "answers": ["x"] * 10}]
    }
    path = root / "TextVQA_0.5.1_val.json"
    return path, data, lambda: VQADataset(path=str(path))


def _gqa(root: Path) -> tuple[Path, Any, Callable[[], Any]]:
    _image(root / "images" / "n1.jpg")
    data = {
        "q1": {
            "imageId": "n1",
            "question": "is it?",
            "answer": "yes",
            "types": {"structural": "verify"},
        }
    }
    path = root / "testdev_balanced_questions.json"
    return path, data, lambda: GQADataset(path=str(path))


def _pope(root: Path) -> tuple[Path, Any, Callable[[], Any]]:
    _image(root / "img" / "a.jpg")
    rows = [
        {"question_id": i, "image": "a.jpg", "text": "Is there a dog?", "label": lab}
        for i, lab in ((1, "yes"), (2, "no"))
    ]
    path = root / "coco_pope_random.json"
    return path, rows, lambda: POPEDataset(path=str(path), image_dir=str(root / "img"))


def _scienceqa(root: Path) -> tuple[Path, Any, Callable[[], Any]]:
    _image(root / "images" / "test" / "5" / "image.png")
    problems = {
        "5": {
            "question": "Which?",
            "choices": ["a", "b", "c"],
            "answer": 1,
            "hint": "",
            "image": "image.png",
            "subject": "science",
        },
        "6": {"question": "No image", "choices": ["a", "b"], "answer": 0, "image": None},
    }
    (root / "pid_splits.json").write_text(json.dumps({"test": ["5", "6"]}))
    return root / "problems.json", problems, lambda: MultipleChoiceDataset(path=str(root))


def _llava(root: Path) -> tuple[Path, Any, Callable[[], Any]]:
    _image(root / "a.png")
    rows = [
        {
            "id": "s1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "A square."},
            ],
        },
        {
            "id": 2,
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        },
    ]
    path = root / "train.json"
    return path, rows, lambda: read_llava(path)


FORMATS = {
    "vqav2": _vqav2,
    "vqav2_annotations": _vqav2_annotations,
    "textvqa": _textvqa,
    "gqa": _gqa,
    "pope": _pope,
    "scienceqa": _scienceqa,
    "llava": _llava,
}


# -- mutations -------------------------------------------------------------------------------------

_ODD_VALUES = [
    None,
    0,
    -1,
    1.5,
    True,
    "",
    "x" * 5000,
    10**40,
    1e308,
    [],
    {},
    [1, [2]],
    {"a": None},
    "\u0000",
    "../../etc/passwd",
    "{image_id}",
]


_DEEP = "<deep>"


def _dumps(data: Any, jsonl: bool) -> bytes:
    text = (
        "\n".join(json.dumps(r) for r in data)
        if jsonl and isinstance(data, list)
        else json.dumps(data)
    )
    return text.replace(json.dumps(_DEEP), "[" * 5000 + "1" + "]" * 5000).encode()


def _containers(node: Any, out: list) -> list:
    if isinstance(node, dict | list):
        out.append(node)
        for v in node.values() if isinstance(node, dict) else node:
            _containers(v, out)
    return out


def _mutate_data(data: Any, rng: random.Random) -> Any:
    """One structural mutation of a parsed JSON document."""
    data = copy.deepcopy(data)
    kind = rng.choice(["drop", "retype", "retype", "shape", "deep", "empty"])
    if kind == "shape":
        return rng.choice(
            [[data], list(data.values())[:1] if isinstance(data, dict) else {"x": data}, 5, "s"]
        )
    if kind == "deep":  # nested past the recursion limit: written out as text (see _DEEP)
        return [_DEEP] if isinstance(data, list) else {**data, "deep": _DEEP}
    nodes = [n for n in _containers(data, []) if n]
    if not nodes:
        return data
    node = rng.choice(nodes)
    key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
    if kind == "drop":
        del node[key]
    elif kind == "empty":
        node[key] = type(node[key])() if isinstance(node[key], dict | list | str) else None
    else:
        node[key] = rng.choice(_ODD_VALUES)
    return data


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """A byte-level mutation: truncated, not UTF-8, or a byte flipped."""
    kind = rng.choice(["truncate", "encoding", "flip"])
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))]
    if kind == "encoding":
        at = rng.randrange(len(raw))
        return raw[:at] + b"\xff\xfe\xc3" + raw[at:]
    at = rng.randrange(len(raw))
    return raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :]


def _check(read: Callable[[], Any], cache: Path, named: Path) -> str:
    """Run the reader; a correct read or an mmbridge error naming ``named`` (the file, or the
    folder that holds it for a format read from a folder). Returns the outcome."""
    try:
        source = read()
        if isinstance(source, list):
            return "read"
        files = source.prepare(cache)
        for split in files.splits.values():  # what prepare wrote must read back
            assert read_llava(split, files.media_root)
        return "read"
    except MMBridgeError as exc:
        assert str(named) in str(exc) or str(named.parent) in str(exc), (
            f"{type(exc).__name__}: {exc}"
        )
        assert "\n" not in str(exc).strip() or "Traceback" not in str(exc)
        return "error"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_mutated_files_read_or_fail_with_the_file_named(fmt, tmp_path):
    rng = random.Random(f"fuzz-{fmt}")
    outcomes = {"read": 0, "error": 0}
    for i in range(ROUNDS):
        root = tmp_path / f"r{i}"
        path, data, read = FORMATS[fmt](root)
        jsonl = fmt == "pope"
        raw = (
            _mutate_bytes(_dumps(data, jsonl), rng)
            if i % 3 == 2
            else _dumps(_mutate_data(data, rng), jsonl)
        )
        path.write_bytes(raw)
        outcomes[_check(read, root / "cache", path)] += 1
    # the loop exercised both outcomes: a fuzz test that never errs (or never reads) tests nothing
    assert outcomes["error"] >= ROUNDS // 4, outcomes
    assert outcomes["read"] >= 1 or fmt in ("vqav2_annotations",), outcomes


def _mmbench(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def test_mutated_mmbench_tsv(tmp_path):
    rng = random.Random("fuzz-mmbench")
    good = {
        "index": "3",
        "question": "Colour?",
        "hint": "nan",
        "A": "red",
        "B": "blue",
        "answer": "A",
        "category": "c",
        "image": base64.b64encode(_PNG.getvalue()).decode(),
    }
    outcomes = {"read": 0, "error": 0}
    for i in range(ROUNDS):
        path = tmp_path / f"r{i}" / "mmbench.tsv"
        path.parent.mkdir()
        row = dict(good)
        kind = i % 4
        if kind == 0:
            row.pop(rng.choice(list(row)))
        elif kind == 1:
            row[rng.choice(list(row))] = str(rng.choice(_ODD_VALUES))
        _mmbench(path, [row, {**good, "index": "4"}])
        if kind == 2:
            path.write_bytes(_mutate_bytes(path.read_bytes(), rng))
        if kind == 3:
            path.write_text(rng.choice(["", "index\n", "a\tb\n1\t2\n", json.dumps(good)]))
        outcomes[
            _check(lambda p=path: MultipleChoiceDataset(path=str(p)), path.parent / "cache", path)
        ] += 1
    assert outcomes["error"] >= ROUNDS // 4 and outcomes["read"] >= 1, outcomes


def test_pope_label_other_than_yes_or_no_is_refused(tmp_path):
    path, rows, read = _pope(tmp_path)
    rows[1]["label"] = "maybe"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(
        MMBridgeError,
        match=r"coco_pope_random.json: line 2 \(question_id 2\): "
        r"label 'maybe' is not one of yes, no",
    ):
        read().prepare(tmp_path / "cache")


def test_vqa_question_without_image_id_names_file_record_and_key(tmp_path):
    path, data, read = _vqav2(tmp_path)
    del data["questions"][1]["image_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(MMBridgeError) as err:
        read().prepare(tmp_path / "cache")
    assert str(err.value).startswith(f"{path}: question_id 20: missing key 'image_id'")


def test_corrupt_parquet_under_hf_local_names_the_file(tmp_path):
    pytest.importorskip("datasets")
    from mmbridge.plugins.datasets.hf_local import HFLocalDataset

    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    with pytest.raises(MMBridgeError, match=f"{bad}: .*expected a save_to_disk folder"):
        HFLocalDataset(train=str(bad)).prepare(tmp_path / "cache")
