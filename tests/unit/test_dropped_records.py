"""``data.on_error=skip``: every dropped record is listed, with where it is and why, in the run
directory (``dropped_records.jsonl``), and one summary line per split is logged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mmbridge.config import compose
from mmbridge.data.sources import dropped_records_file, read_source
from mmbridge.errors import DataError
from mmbridge.runtime.config import RunConfig
from mmbridge.runtime.session import load_splits


def _turns(q: str, a: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def planted(tmp_path):
    """A train JSONL file and a val JSON list with bad records planted among good ones; returns
    the files and the drops expected, in file order."""
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        (tmp_path / "img" / f"{name}.png").write_bytes(b"x")
    good = {"id": "g0", "image": "img/a.png", "conversations": _turns("<image>\nQ", "A")}
    train_lines = [
        json.dumps(good),
        "{not json",
        json.dumps(
            {"id": "missing", "image": "img/none.png", "conversations": _turns("<image>\nQ", "A")}
        ),
        json.dumps(
            {
                "id": "two",
                "image": ["img/a.png", "img/b.png"],
                "conversations": _turns("<image>\nQ", "A"),
            }
        ),
        json.dumps(
            {
                "id": "pair",
                "image": ["img/a.png", "img/b.png"],
                "conversations": _turns("<image>\n<image>\nSame?", "no"),
            }
        ),
        json.dumps({**good, "conversations": _turns("<image>\nQ again", "B")}),  # duplicate id g0
        json.dumps({"id": 7, "conversations": [{"from": "robot", "value": "hi"}]}),
        json.dumps({"id": "text", "conversations": _turns("Hi", "Hello")}),
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(train_lines) + "\n")
    val = tmp_path / "val.json"
    val.write_text(
        json.dumps(
            [{**good, "id": "v0"}, {"id": "v1", "image": [], "conversations": _turns("Q", "A")}],
            indent=1,
        )
    )
    t, v = str(train), str(val)
    # a JSON list names a record by the line its object starts on (the "{" before its id)
    v1_line = next(k for k, x in enumerate(val.read_text().splitlines()) if '"v1"' in x)
    expected = [
        {
            "split": "train",
            "file": t,
            "index": 1,
            "line": 2,
            "id": None,
            "reason": "invalid JSON at line 2, column 2: "
            "Expecting property name enclosed in double quotes",
        },
        {
            "split": "train",
            "file": t,
            "index": 2,
            "line": 3,
            "id": "missing",
            "reason": f"image file not found: {tmp_path / 'img' / 'none.png'} "
            f"(media_root: {tmp_path})",
        },
        {
            "split": "train",
            "file": t,
            "index": 3,
            "line": 4,
            "id": "two",
            "reason": "1 <image> placeholder(s) in user turns for 2 image item(s); "
            "each image item needs exactly one <image>, in a user turn",
        },
        {
            "split": "train",
            "file": t,
            "index": 5,
            "line": 6,
            "id": "g0",
            "reason": f"duplicate id 'g0', also used by {t}: record 0 (id 'g0', line 1)",
        },
        {
            "split": "train",
            "file": t,
            "index": 6,
            "line": 7,
            "id": "7",
            "reason": "turn 0 has unknown role 'robot'; "
            "valid: human, user, gpt, assistant, system, tool",
        },
        {
            "split": "val",
            "file": v,
            "index": 1,
            "line": v1_line,
            "id": "v1",
            "reason": "'image' is an empty list; give one file path or a list of paths "
            "(one per <image> placeholder), or drop the key for a text-only record",
        },
    ]
    return tmp_path, train, val, expected


def _cfg(registry, root, train, val, on_error="skip"):
    return compose(
        [
            "data=llava",
            f"data.train={train}",
            f"data.val={val}",
            f"data.media_root={root}",
            f"data.on_error={on_error}",
            f"paths.cache_dir={root / 'cache'}",
        ],
        registry,
    )


def test_skip_lists_every_dropped_record_in_the_run_dir(registry, planted, caplog):
    root, train, val, expected = planted
    run_dir = root / "run"
    with caplog.at_level(logging.WARNING, logger="mmbridge.data.sources"):
        run = RunConfig.parse(_cfg(registry, root, train, val))
        splits = load_splits(run, registry, run_dir=run_dir)
    assert [s.id for s in splits["train"]] == ["g0", "pair", "text"] and [
        s.id for s in splits["val"]
    ] == ["v0"]
    assert splits["train"][1].media["image"] == [
        str(root / "img" / "a.png"),
        str(root / "img" / "b.png"),
    ]
    path = dropped_records_file(run_dir, "data")
    assert path == run_dir / "dropped_records.jsonl"
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert got == expected
    # one summary line per split that lost records, naming the file of the list
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith(
        f"data split 'train': {train}: kept 3 records, dropped 5 (first: {train}: "
        f"invalid JSON at line 2"
    ) and lines[0].endswith(f"; all listed in {path}")
    assert lines[1].startswith(f"data split 'val': {val}: kept 1 records, dropped 1")
    assert not [
        p for p in run_dir.iterdir() if p.name != path.name
    ]  # written atomically: no temp file left


def test_skip_without_drops_writes_an_empty_list_and_raise_writes_none(registry, planted):
    root, train, val, _ = planted
    clean = root / "clean.jsonl"
    clean.write_text(
        json.dumps({"id": "c", "image": "img/a.png", "conversations": _turns("<image>\nQ", "A")})
        + "\n"
    )
    cfg = compose(
        [
            "data=llava",
            f"data.train={clean}",
            f"data.media_root={root}",
            "data.on_error=skip",
            f"paths.cache_dir={root / 'cache'}",
        ],
        registry,
    )
    read_source(registry, cfg.data, "data", Path(cfg.paths.data_dir), run_dir=root / "run1")
    assert (root / "run1" / "dropped_records.jsonl").read_text() == ""
    with pytest.raises(DataError, match=r"train\.jsonl: invalid JSON at line 2"):
        strict = _cfg(registry, root, train, val, "raise")
        read_source(
            registry, strict.data, "data", Path(strict.paths.data_dir), run_dir=root / "run2"
        )
    assert not (root / "run2").exists()
    # another data set key (an extra evaluation set) gets its own file
    assert (
        dropped_records_file(root, "evaluation.extra_data.x").name
        == "dropped_records.evaluation.extra_data.x.jsonl"
    )
