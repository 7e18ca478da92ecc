"""The LLaVA reader/writer, the ``llava`` and ``shapes`` data sets and the first two recipes."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmbridge.config import compose
from mmbridge.config.build import build
from mmbridge.contracts.dataset import DatasetFiles
from mmbridge.contracts.types import Sample
from mmbridge.data.llava import read_llava, validate_conversations, write_llava
from mmbridge.errors import ConfigError, DataError
from mmbridge.plugins.datasets import shapes as shapes_mod
from mmbridge.plugins.datasets.llava import LlavaDataset
from mmbridge.plugins.datasets.shapes import (
    BACKGROUND,
    LAYOUTS,
    PALETTE,
    QTYPES,
    ShapesDataset,
    chance_accuracy,
    qa_turns,
)
from mmbridge.plugins.recipes.caption import INSTRUCTIONS, CaptionRecipe
from mmbridge.plugins.recipes.conversations import ConversationsRecipe
from mmbridge.registry.plugin_manager import load_registry

SMALL = {"n_train": 40, "n_val": 4, "n_test": 16}


@pytest.fixture(scope="module")
def shapes_files(tmp_path_factory) -> DatasetFiles:
    return ShapesDataset(**SMALL).prepare(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def shapes_train(shapes_files) -> list[Sample]:
    return read_llava(shapes_files.splits["train"], shapes_files.media_root)


# -- LLaVA reader / writer --------------------------------------------------------------------
def _media(root: Path) -> dict[str, Path]:
    (root / "img").mkdir(parents=True)
    paths = {"image": root / "img" / "a.png", "audio": root / "b.wav"}
    for p in paths.values():
        p.write_bytes(b"x")
    return paths


def _samples(root: Path) -> list[Sample]:
    m = _media(root)
    return [
        Sample(
            "a",
            {"image": str(m["image"])},
            [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}],
            {"caption": "A cat.", "qtypes": ["shape"]},
        ),
        Sample(
            "b",
            {"image": str(m["image"]), "audio": str(m["audio"])},
            [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\n<audio>\nDescribe."},
                {"from": "gpt", "value": "x"},
            ],
        ),
        Sample("c", {}, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]),
    ]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip(tmp_path, suffix):
    samples = _samples(tmp_path / "media")
    path = write_llava(samples, tmp_path / "out" / f"data{suffix}", media_root=tmp_path / "media")
    raw = path.read_text()
    assert '"img/a.png"' in raw and str(tmp_path) not in raw  # relative to the media root
    assert read_llava(path, tmp_path / "media") == samples
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left


def test_absolute_paths_extra_keys_and_int_ids(tmp_path):
    m = _media(tmp_path)
    rec = {
        "id": 7,
        "image": str(m["image"]),
        "source": "web",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}],
    }
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    (s,) = read_llava(tmp_path / "d.json", media_root="/nonexistent")
    assert (s.id, s.media["image"], s.meta) == ("7", str(m["image"]), {"source": "web"})


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


GOOD = {"id": "ok", "image": "img/a.png", "conversations": _turns("<image>\nQ", "A")}
BAD = {
    "missing_conversations": ({"id": "r1", "image": "img/a.png"}, "missing 'conversations'"),
    "unknown_role": (
        {"id": "r1", "conversations": [{"from": "robot", "value": "hi"}]},
        "unknown role 'robot'; valid: human",
    ),
    "missing_media": (
        {"id": "r1", "image": "img/nope.png", "conversations": _turns("<image>\nQ", "A")},
        "image file not found: .*img/nope.png",
    ),
    "no_placeholder": (
        {"id": "r1", "image": "img/a.png", "conversations": _turns("Q", "A")},
        r"0 <image> placeholder\(s\) in user turns for 1 image item\(s\); each image item "
        r"needs exactly one <image>, in a user turn",
    ),
    "two_placeholders": (
        {
            "id": "r1",
            "image": "img/a.png",
            "conversations": _turns("<image>Q", "A", "<image>", "B"),
        },
        r"2 <image> placeholder\(s\) in user turns for 1 image",
    ),
    "placeholder_without_media": (
        {"id": "r1", "conversations": _turns("<audio>Q", "A")},
        r"1 <audio> placeholder\(s\) in user turns for 0 audio",
    ),
    "placeholder_in_answer": (
        {"id": "r1", "image": "img/a.png", "conversations": _turns("<image>Q", "<image>")},
        r"1 <image> placeholder\(s\) in user turns and 1 in other turns for 1 image",
    ),
    "empty_answer": ({"id": "r1", "conversations": _turns("Q", "  ")}, "empty gpt turn"),
    "duplicate_id": (
        {"id": "ok", "conversations": _turns("Q", "A")},
        r"duplicate id 'ok', also used by .*data\.jsonl?: record 0 \(id 'ok'",
    ),
}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors_name_file_and_record(tmp_path, case, suffix):
    _media(tmp_path)
    record, message = BAD[case]
    path = tmp_path / f"data{suffix}"
    records = [GOOD, record]
    path.write_text(
        json.dumps(records, indent=1)
        if suffix == ".json"
        else "\n".join(json.dumps(r) for r in records)
    )
    with pytest.raises(DataError) as err:
        read_llava(path)
    text = str(err.value)
    assert text.startswith(f"{path}: record 1 (id '{record['id']}'")
    assert re.search(message, text), text
    if suffix == ".jsonl":
        assert "line 2" in text


def test_bad_json_names_the_line(tmp_path):
    _media(tmp_path)  # records are read as the file streams: the first one must be valid
    (tmp_path / "a.json").write_text("[\n" + json.dumps(GOOD) + ',\n {"id": 2,,}\n]')
    with pytest.raises(DataError, match=r"a\.json: invalid JSON at line 3"):
        read_llava(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text(json.dumps(GOOD) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"b\.jsonl: invalid JSON at line 3"):
        read_llava(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(
        DataError, match=r"c\.jsonl: record 0 \(id 1, line 1\): missing 'conversations'"
    ):
        read_llava(tmp_path / "c.jsonl")


def test_bom_and_json_object(tmp_path):
    _media(tmp_path)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert [s.id for s in read_llava(tmp_path / "bom.json")] == ["ok"]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert [s.id for s in read_llava(tmp_path / "bom.jsonl")] == ["ok"]
    (tmp_path / "obj.json").write_text(json.dumps({"data": [GOOD]}, indent=1))
    with pytest.raises(
        DataError,
        match=r"obj\.json: expected a JSON list of records, got an object with "
        r"keys data; point data.train/val/test at a file",
    ):
        read_llava(tmp_path / "obj.json")
    (tmp_path / "one.json").write_text(json.dumps(GOOD))
    with pytest.raises(
        DataError, match=r"got an object with keys id, image, conversations \(one record\? wrap"
    ):
        read_llava(tmp_path / "one.json")
    (tmp_path / "latin1.json").write_bytes(b"[\xe9]")
    with pytest.raises(DataError, match=r"latin1\.json: cannot read data file: not UTF-8"):
        read_llava(tmp_path / "latin1.json")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_streamed_in_small_chunks_with_lines(tmp_path, monkeypatch, suffix):
    """The file is read in chunks (here 7 characters): records cut by a chunk end, numbers
    included, come out whole, and errors still name the right line."""
    import mmbridge.data.llava as llava_mod

    monkeypatch.setattr(llava_mod, "_CHUNK", 7)
    _media(tmp_path)
    records = [{**GOOD, "id": f"r{i}", "score": 12345.678 + i} for i in range(30)]
    records[4] = {"id": 123456789, "conversations": _turns("Q", "A")}  # text-only, an int id
    path = tmp_path / f"d{suffix}"
    path.write_text(
        json.dumps(records, indent=1)
        if suffix == ".json"
        else "\n".join(json.dumps(r) for r in records) + "\n"
    )
    got = read_llava(path)
    assert [s.id for s in got] == [str(r["id"]) for r in records]
    assert [s.meta["score"] for s in got if "score" in s.meta] == [
        r["score"] for r in records if "score" in r
    ]
    assert got[4].media == {} and got[5].media["image"].endswith("a.png")  # text-only mixed in
    records[17] = {**GOOD, "id": "bad", "conversations": []}
    path.write_text(
        json.dumps(records, indent=1)
        if suffix == ".json"
        else "\n".join(json.dumps(r) for r in records) + "\n"
    )
    line = (
        path.read_text()
        .splitlines()
        .index(next(x for x in path.read_text().splitlines() if '"bad"' in x))
        + 1
    )
    with pytest.raises(
        DataError, match=rf"record 17 \(id 'bad', line {line if suffix == '.jsonl' else line - 1}\)"
    ):
        read_llava(path)


def test_image_lists_and_duplicate_ids(tmp_path):
    _media(tmp_path)
    one = {**GOOD, "image": ["img/a.png"]}
    (tmp_path / "one.json").write_text(json.dumps([one]))
    assert read_llava(tmp_path / "one.json")[0].media["image"] == str(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "b.png").write_bytes(b"y")
    two = {
        **GOOD,
        "id": "two",
        "image": ["img/b.png", "img/a.png"],
        "conversations": _turns("<image><image>\nSame?", "yes"),
    }
    (tmp_path / "two.json").write_text(json.dumps([GOOD, two]))
    got = read_llava(tmp_path / "two.json")  # a list of images, in placeholder order
    assert got[1].media == {
        "image": [str(tmp_path / "img" / "b.png"), str(tmp_path / "img" / "a.png")]
    }
    assert got[1].paths("image") == got[1].media["image"] and got[0].paths("image") == [
        got[0].media["image"]
    ]
    assert got[1].media_counts() == {"image": 2} and got[0].paths("audio") == []
    # one placeholder for two images: one error naming the record and both counts
    (tmp_path / "short.json").write_text(
        json.dumps([{**two, "conversations": _turns("<image>\nSame?", "yes")}])
    )
    with pytest.raises(
        DataError,
        match=r"short\.json: record 0 \(id 'two', line 1\): 1 <image> placeholder\(s\) "
        r"in user turns for 2 image item\(s\); each image item needs exactly one",
    ):
        read_llava(tmp_path / "short.json")
    (tmp_path / "many.json").write_text(
        json.dumps([{**two, "conversations": _turns("<image><image><image>", "x")}])
    )
    with pytest.raises(
        DataError,
        match=r"record 0 \(id 'two', line 1\): 3 <image> placeholder\(s\) in user turns for 2",
    ):
        read_llava(tmp_path / "many.json")
    for bad, needle in [
        ([], r"'image' is an empty list"),
        (["img/a.png", 3], r"'image' \(item 1\) must be a non-empty file path, got 3"),
        (["img/a.png", "img/none.png"], r"image file not found: .*none\.png"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps([{**two, "image": bad}]))
        with pytest.raises(DataError, match=r"bad\.json: record 0 \(id 'two', line 1\): " + needle):
            read_llava(tmp_path / "bad.json")
    # written back as a list, relative to the media root, and read back equal
    out = write_llava(got, tmp_path / "out.jsonl", media_root=tmp_path)
    assert json.loads(out.read_text().splitlines()[1])["image"] == ["img/b.png", "img/a.png"]
    assert read_llava(out, tmp_path) == got
    (tmp_path / "dup.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [GOOD, {**GOOD, "id": "x"}, GOOD])
    )
    with pytest.raises(
        DataError,
        match=r"dup\.jsonl: record 2 \(id 'ok', line 3\): duplicate id 'ok', "
        r"also used by .*dup\.jsonl: record 0 \(id 'ok', line 1\)$",
    ):
        read_llava(tmp_path / "dup.jsonl")


def test_on_error_skip_lists_every_dropped_record(tmp_path):
    from mmbridge.data.llava import ReadReport

    _media(tmp_path)
    lines = [
        json.dumps(GOOD),
        "{oops",
        json.dumps({"id": "r2", "image": "img/no.png", "conversations": _turns("<image>Q", "A")}),
        json.dumps({**GOOD, "id": "r3"}),
        json.dumps(GOOD),
        json.dumps({"id": "r5"}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 2"):
        read_llava(path)
    report = ReadReport(path)
    got = read_llava(path, on_error="skip", report=report)
    assert [s.id for s in got] == ["ok", "r3"] and report.kept == 2
    assert len(report.dropped) == 4
    for d, needle in zip(
        report.dropped,
        [
            "invalid JSON at line 2",
            "record 2 (id 'r2', line 3): image file not found",
            "record 4 (id 'ok', line 5): duplicate id 'ok'",
            "record 5 (id 'r5', line 6): missing 'conversations'",
        ],
        strict=True,
    ):
        assert needle in d.message, d.message
    # each one: where (file, index, line, id) and why (the message without its prefix)
    assert [(d.file, d.index, d.line, d.id) for d in report.dropped] == [
        (str(path), 1, 2, None),
        (str(path), 2, 3, "r2"),
        (str(path), 4, 5, "ok"),
        (str(path), 5, 6, "r5"),
    ]
    assert report.dropped[0].reason.startswith("invalid JSON at line 2, column")
    assert (
        report.dropped[1].reason
        == f"image file not found: {tmp_path / 'img' / 'no.png'} (media_root: {tmp_path})"
    )
    assert report.dropped[2].reason.startswith("duplicate id 'ok', also used by ")
    assert report.dropped[3].reason == "missing 'conversations'"
    assert report.summary().startswith(
        f"{path}: kept 2 records, dropped 4 (first: {path}: invalid JSON at line 2"
    )
    with pytest.raises(ConfigError, match="data.on_error: 'ignore' is not one of raise, skip"):
        read_llava(path, on_error="ignore")


# -- llava data set ---------------------------------------------------------------------------
def test_llava_dataset(tmp_path):
    write_llava(_samples(tmp_path / "m2")[:1], tmp_path / "train.jsonl", media_root=tmp_path / "m2")
    files = LlavaDataset(
        train=str(tmp_path / "train.jsonl"), media_root=str(tmp_path / "m2")
    ).prepare(tmp_path)
    assert (
        files.splits == {"train": tmp_path / "train.jsonl"} and files.media_root == tmp_path / "m2"
    )
    # default media root: the train file's folder, where img/a.png does not exist -> named error
    # when the records are read (prepare only checks the files: each file is parsed once)
    files = LlavaDataset(train=str(tmp_path / "train.jsonl")).prepare(tmp_path)
    with pytest.raises(DataError, match="image file not found"):
        read_llava(files.splits["train"], files.media_root)
    with pytest.raises(ConfigError, match="data.on_error: 'ignore' is not one of raise, skip"):
        LlavaDataset(train=str(tmp_path / "train.jsonl"), on_error="ignore")
    with pytest.raises(ConfigError, match="data.test: file not found"):
        LlavaDataset(
            train=str(tmp_path / "train.jsonl"),
            test=str(tmp_path / "no.json"),
            media_root=str(tmp_path / "m2"),
        ).prepare(tmp_path)
    with pytest.raises(ConfigError, match="data.train: set the path"):
        LlavaDataset(train="???")


def test_registered_and_configs_build(tmp_path):
    reg = load_registry()
    assert {"llava", "shapes"} <= set(reg.names("dataset"))
    assert {"caption", "conversations"} <= set(reg.names("recipe"))
    # ~experiment: the default experiment sizes the shapes data set (n_train, ...)
    cfg = compose(["~experiment", "data=llava", f"data.train={tmp_path / 't.json'}"], reg)
    assert isinstance(build(reg, "dataset", cfg.data, "data"), LlavaDataset)
    cfg = compose([], reg)
    assert isinstance(build(reg, "dataset", cfg.data, "data"), ShapesDataset)
    assert isinstance(build(reg, "recipe", cfg.stages.align.recipe, "recipe"), CaptionRecipe)
    assert isinstance(
        build(reg, "recipe", cfg.stages.instruct.recipe, "recipe"), ConversationsRecipe
    )


# -- shapes -----------------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_shapes_deterministic_and_splits_differ(tmp_path, shapes_files):
    again = ShapesDataset(**SMALL).prepare(tmp_path / "b")
    assert _tree(again.media_root) == _tree(shapes_files.media_root)  # byte-identical
    other = ShapesDataset(**{**SMALL, "seed": 1}).prepare(tmp_path / "c")
    assert other.media_root.name != shapes_files.media_root.name
    a, b = _tree(shapes_files.media_root), _tree(other.media_root)
    assert sum(a[k] == b[k] for k in a if k.endswith(".png")) <= 2
    train = {v for k, v in a.items() if k.startswith("images/train/")}
    assert not train & {v for k, v in a.items() if k.startswith(("images/test/", "images/val/"))}
    assert set(shapes_files.splits) == {"train", "val", "test"}


def test_shapes_ground_truth_matches_pixels(shapes_train):
    rows = LAYOUTS["grid"]
    names = list(PALETTE)
    rgb = np.array([PALETTE[n] for n in names], dtype=float)
    for s in shapes_train:
        img = np.asarray(Image.open(s.media["image"]).convert("RGB")).astype(int)
        size = img.shape[0]
        covered = np.zeros(img.shape[:2], bool)
        for o in s.meta["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            nearest = names[int(np.argmin(((rgb - img[cy, cx]) ** 2).sum(1)))]
            assert nearest == o["colour"], (s.id, o)
            assert np.abs(img[cy, cx] - PALETTE[o["colour"]]).max() <= 8
            assert rows[cy * 3 // size][cx * 3 // size] == o["position"]
            covered[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
        assert (img[~covered] == BACKGROUND).all(), s.id  # nothing drawn outside the objects
        objs = s.meta["objects"]
        for qtype, question, answer in qa_turns(s):
            if qtype == "count":
                colour = next((c for c in PALETTE if re.search(rf"\b{c}\b", question)), None)
                assert int(answer) == sum(colour in (None, o["colour"]) for o in objs)
            elif qtype == "colour":
                (o,) = [o for o in objs if o["shape"] in question]
                assert answer == o["colour"]
            elif qtype == "shape":
                (o,) = [o for o in objs if re.search(rf"\b{o['colour']}\b", question)]
                assert answer == o["shape"]
            else:
                (o,) = [o for o in objs if f"{o['colour']} {o['shape']}" in question]
                assert answer == o["position"]


def test_shapes_conversations_format(shapes_train):
    positions = {p for row in LAYOUTS["grid"] for p in row}
    vocab = set(PALETTE) | set(shapes_mod.SHAPES) | positions | {"1", "2", "3"}
    qtypes, questions = Counter(), set()
    for s in shapes_train:
        validate_conversations(s, s.id)
        conv = s.conversations
        assert conv[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert len(s.meta["qtypes"]) == len(conv) // 2
        assert len(s.meta["objects"]) in (1, 2, 3)
        assert (
            s.meta["caption"].count(",") + s.meta["caption"].count(" and ")
            == len(s.meta["objects"]) - 1
        )
        for q, question, answer in qa_turns(s):
            assert answer in vocab and len(answer.split()) <= 2
            qtypes[q] += 1
            questions.add(question.split()[0] + question.split()[1])
    assert set(qtypes) == set(QTYPES)
    assert len(questions) >= 8  # several phrasings


def _prepare(cache: str, barrier, queue) -> None:
    barrier.wait()  # both processes start generating at the same moment
    queue.put(str(ShapesDataset(**SMALL).prepare(Path(cache)).media_root))


def test_shapes_concurrent_prepare(tmp_path, shapes_files):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    roots = {queue.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (root,) = roots
    assert _tree(Path(root)) == _tree(shapes_files.media_root)
    assert [p.name for p in (tmp_path / "shapes").iterdir() if p.is_dir()] == [Path(root).name]


def test_shapes_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = shapes_mod.make_sample

    def failing(cfg, split, index):
        if split == "test" and index == 3:
            raise KeyboardInterrupt
        return real(cfg, split, index)

    monkeypatch.setattr(shapes_mod, "make_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        ShapesDataset(**SMALL).prepare(tmp_path)
    assert [p.suffix for p in (tmp_path / "shapes").iterdir()] == [".lock"]
    stale = tmp_path / "shapes" / f".tmp-{ShapesDataset(**SMALL).key}-killed"
    stale.mkdir()  # what a killed run leaves behind
    monkeypatch.setattr(shapes_mod, "make_sample", real)
    files = ShapesDataset(**SMALL).prepare(tmp_path)
    assert not stale.exists()
    assert len(read_llava(files.splits["test"], files.media_root)) == SMALL["n_test"]


def test_shapes_bad_args():
    with pytest.raises(
        ConfigError, match="data.colours: unknown value 'magneta'.*valid: red, green"
    ):
        ShapesDataset(colours=["red", "magneta"])
    with pytest.raises(ConfigError, match="data.max_objects"):
        ShapesDataset(layout="row", max_objects=4)


def _qa(*pairs: tuple[str, str]) -> Sample:
    turns = []
    for _, a in pairs:
        turns += [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}]
    return Sample("x", conversations=turns, meta={"qtypes": [q for q, _ in pairs]})


def test_chance_accuracy_majority_rule():
    train = [
        _qa(("colour", "red"), ("count", "2")),
        _qa(("colour", "Red"), ("count", "1")),
        _qa(("colour", "blue"), ("count", "2")),
        _qa(("shape", "circle"), ("shape", "square")),
    ]
    test = [
        _qa(("colour", "red"), ("count", "2")),
        _qa(("colour", "blue"), ("count", "2")),
        _qa(("count", "3"), ("shape", "circle")),
        _qa(("position", "left")),
    ]
    # shape: a tie broken alphabetically ("circle"); position: never seen in training -> 0
    assert chance_accuracy(train, test) == {
        "colour": 0.5,
        "count": 2 / 3,
        "shape": 1.0,
        "position": 0.0,
        "overall": 4 / 7,
    }


# -- recipes ----------------------------------------------------------------------------------
def test_caption_recipe(shapes_train):
    recipe = CaptionRecipe()
    s = shapes_train[0]
    out = recipe(s, random.Random(3))
    assert out == recipe(s, random.Random(3))  # deterministic for a seeded rng
    human, gpt = out.conversations
    assert human["value"].count("<image>") == 1 and human["value"].startswith("<image>\n")
    assert human["value"][len("<image>\n") :] in INSTRUCTIONS["image"]
    assert gpt == {"from": "gpt", "value": s.meta["caption"]} and out.meta["qtypes"] == ["caption"]
    assert s.conversations != out.conversations and len(s.conversations) > 2  # input untouched
    drawn = {recipe(s, random.Random(i)).conversations[0]["value"] for i in range(60)}
    assert len(drawn) >= 8
    audio = Sample("a", {"audio": "/x.wav"}, _turns("<audio>\nWhat is said?", "hello there"))
    out = CaptionRecipe(instructions=["Transcribe."])(audio, random.Random(0))
    assert [t["value"] for t in out.conversations] == ["<audio>\nTranscribe.", "hello there"]
    assert recipe(Sample("t", {}, _turns("q", "a")), random.Random(0)) is None


def test_conversations_recipe():
    s = Sample(
        "s",
        {"image": "/x.png", "audio": "/y.wav"},
        _turns("<image>\nQ1", "A1", "Q2 <audio>", "A2", "Q3", "A3"),
        {"qtypes": ["a", "b", "c"]},
    )
    assert ConversationsRecipe()(s, random.Random(0)) is s
    assert ConversationsRecipe(max_turns=3)(s, random.Random(0)) is s
    out = ConversationsRecipe(max_turns=1)(s, random.Random(0))
    assert [t["value"] for t in out.conversations] == ["<audio>\n<image>\nQ1", "A1"]
    assert out.meta["qtypes"] == ["a"]
    validate_conversations(out, "cut")
    with pytest.raises(ConfigError, match="recipe.max_turns"):
        ConversationsRecipe(max_turns=0)
