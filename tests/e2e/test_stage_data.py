"""Per-stage data (``stages.<name>.data``, falling back to the run's ``data``) and data
mixtures (:mod:`mmbridge.data.mixture`): a two-stage run whose stages read two sources, the
sampling ratios of a mixture, its determinism, and the validation messages naming the key."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import shared_registry
from PIL import Image

from mmbridge.config import compose
from mmbridge.config.validation import validate_config
from mmbridge.contracts.types import Sample
from mmbridge.data.mixture import draw, mix_splits
from mmbridge.data.sources import read_data
from mmbridge.errors import ConfigError


def _samples(prefix: str, n: int) -> list[Sample]:
    return [Sample(id=f"{prefix}{i}", media={}, conversations=[]) for i in range(n)]


def _llava(root: Path, name: str, n: int, colour: tuple[int, int, int]) -> Path:
    """A LLaVA JSONL file of ``n`` caption records with ids ``<name>-<i>`` and their images."""
    images = root / name
    images.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (16, 16), colour).save(images / f"{i}.png")
        rows.append(
            {
                "id": f"{name}-{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": f"a {name} square"},
                ],
            }
        )
    path = images / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the mixture's draw ---------------------------------------------------------------------------
def test_a_mixture_draws_each_source_at_its_weight():
    small, large = _samples("s", 40), _samples("l", 400)
    out = draw([small, large], [0.7, 0.3], 5000, seed=3)
    share = Counter(s.id[0] for s in out)["s"] / len(out)
    assert len(out) == 5000 and abs(share - 0.7) < 0.02  # binomial sd at n=5000: 0.0065
    # without replacement inside a source until it is used up: the 40 small ones each ~87 times
    counts = Counter(s.id for s in out if s.id[0] == "s")
    assert len(counts) == 40 and max(counts.values()) - min(counts.values()) <= 1
    assert [s.id for s in draw([small, large], [0.7, 0.3], 5000, seed=3)] == [s.id for s in out]
    assert [s.id for s in draw([small, large], [0.7, 0.3], 5000, seed=4)] != [s.id for s in out]


def test_mixture_splits_draw_training_splits_and_keep_evaluation_splits_whole():
    a = {"train": _samples("a", 10), "test": _samples("at", 3)}
    b = {"train": _samples("b", 30), "val": _samples("bv", 2), "test": _samples("bt", 4)}
    out = mix_splits([a, b], [1.0, 1.0], None, seed=0)
    assert len(out["train"]) == 40  # size null: the sum of the sources' sizes
    assert [s.id for s in out["test"]] == ["at0", "at1", "at2", "bt0", "bt1", "bt2", "bt3"]
    assert [s.id for s in out["val"]] == ["bv0", "bv1"]
    assert len(mix_splits([a, b], [1.0, 1.0], 7, seed=0)["train"]) == 7


def test_a_mixture_node_reads_its_sources_through_the_registry(tmp_path):
    red, blue = _llava(tmp_path, "red", 6, (255, 0, 0)), _llava(tmp_path, "blue", 30, (0, 0, 255))
    cfg = compose(
        [
            "experiment=tiny",
            "data=mixture",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"data.sources=[{{name: llava, train: {red}, weight: 3}},"
            f"{{name: llava, train: {blue}, weight: 1}}]",
            "data.size=400",
        ],
        shared_registry(),
    )
    validate_config(cfg, shared_registry())
    splits = read_data(shared_registry(), cfg.data, "data", tmp_path / "data", seed=0)
    share = Counter(s.id.split("-")[0] for s in splits["train"])
    assert set(splits) == {"train"} and len(splits["train"]) == 400
    assert abs(share["red"] / 400 - 0.75) < 0.07  # sd 0.022
    assert Path(splits["train"][0].media["image"]).is_file()  # media resolved per source


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "stages.align.data.sources=[{name: llava, train: x.json, weight: 0}]",
            "stages.align.data.sources.0.weight=0: expected a number > 0",
        ),
        ("stages.align.data.sources=[{name: nope, weight: 1}]", "stages.align.data.sources.0.name"),
        ("stages.align.data.sources=[]", "stages.align.data.sources=[]: expected a non-empty list"),
    ],
)
def test_a_bad_stage_mixture_is_refused_naming_the_stage_key(override, message, tmp_path):
    cfg = compose(
        ["experiment=tiny", "+data@stages.align.data=mixture", override], shared_registry()
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, shared_registry())
    assert message in str(err.value)


# -- a run of two stages reading two sources ------------------------------------------------------
@pytest.mark.slow
def test_two_stages_train_on_their_own_sources_and_the_run_data_is_the_fallback(tmp_path):
    from mmbridge.runtime.config import RunConfig
    from mmbridge.runtime.session import open_session
    from mmbridge.runtime.stage import prepare_stage
    from mmbridge.runtime.train import train

    captions = _llava(tmp_path, "cap", 12, (200, 30, 30))
    overrides = [
        "experiment=tiny",
        "data.n_train=24",
        "data.n_val=4",
        "data.n_test=4",
        "+data@stages.align.data=llava",
        f"stages.align.data.train={captions}",
        "stages.align.max_steps=2",
        "stages.align.val_every=2",
        "stages.align.batch_size=4",
        "stages.instruct.max_steps=2",
        "stages.instruct.val_every=2",
        "stages.instruct.batch_size=4",
        "evaluation.max_samples=4",
        "evaluation.val_samples=2",
        "debug.record_sample_ids=true",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    registry = shared_registry()
    cfg = compose(overrides, registry)
    validate_config(cfg, registry)
    session = open_session(cfg, registry, cache=False)
    assert session.data_of("instruct") is session.splits  # no stages.instruct.data: the run's
    assert {s.id for s in session.data_of("align")["train"]} == {f"cap-{i}" for i in range(12)}
    assert {s.id for s in prepare_stage(session, "instruct").train_ds.samples} <= {
        s.id for s in session.splits["train"]
    }

    metrics = train(RunConfig.parse(cfg), registry, tmp_path / "run")
    seen = {
        n: json.loads((tmp_path / "run" / "debug" / f"{n}_rank0_ids.json").read_text())["ids"]
        for n in ("align", "instruct")
    }
    shapes = {s.id for s in session.splits["train"]}
    assert len(seen["align"]) == 8 and all(i.startswith("cap-") for i in seen["align"])
    assert len(seen["instruct"]) == 8 and set(seen["instruct"]) <= shapes
    assert metrics["stages"]["align"]["steps"] == 2 and metrics["test"]["n"] == 4
