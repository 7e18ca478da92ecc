"""Data and logging at LLaVA scale: the loggers chosen in config (``loggers``) and the
``hf_local`` data source (Hugging Face ``datasets`` saved locally, LLaVA schema)."""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mmbridge.config import compose
from mmbridge.config.schema import Root
from mmbridge.data.llava import ReadReport, read_llava
from mmbridge.data.sources import read_source
from mmbridge.errors import ConfigError, DataError
from mmbridge.plugins.datasets.hf_local import HFLocalDataset
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.training import loggers as loggers_mod
from mmbridge.training.loggers import make_loggers

# --- loggers ----------------------------------------------------------------------------------


def _cfg(*names: str):
    return Root(loggers=list(names), run_name="tiny")


def test_default_loggers_write_csv_and_tensorboard_per_stage(tmp_path):
    out = make_loggers(Root(run_name="tiny"), tmp_path, "align")  # the schema's default loggers
    assert [type(x) for x in out] == [CSVLogger, TensorBoardLogger]
    assert Path(out[0].log_dir) == tmp_path / "logs" / "align"
    assert Path(out[1].log_dir) == tmp_path / "logs" / "tb_align"
    out[0].log_metrics({"train/loss": 1.5}, step=3)
    out[0].save()
    rows = list(csv.DictReader((tmp_path / "logs" / "align" / "metrics.csv").open()))
    assert rows == [{"step": "3", "train/loss": "1.5"}]
    out[1].log_metrics({"train/loss": 1.5}, step=3)
    out[1].finalize("success")
    assert list((tmp_path / "logs" / "tb_align").glob("events.out.tfevents.*"))


def test_tensorboard_missing_falls_back_to_csv_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loggers_mod, "_available", lambda module: False)
    monkeypatch.setattr(loggers_mod, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="mmbridge.training.loggers"):
        first = make_loggers(_cfg("tensorboard"), tmp_path, "align")
        second = make_loggers(_cfg("csv", "tensorboard"), tmp_path, "instruct")
    assert [type(x) for x in first] == [CSVLogger] and Path(
        first[0].log_dir
    ) == tmp_path / "logs" / "align"
    assert [type(x) for x in second] == [CSVLogger]  # not two CSV loggers
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0]


def test_wandb_logs_offline_under_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored after the test (Lightning sets it)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    out = make_loggers(_cfg("csv", "wandb"), tmp_path, "instruct")
    assert type(out[0]) is CSVLogger and type(out[1]).__name__ == "WandbLogger"
    init = out[1]._wandb_init
    assert (
        init["dir"] == str(tmp_path / "logs")
        and init["name"] == "tiny-instruct"
        and init["group"] == "tiny"
    )
    out[1].log_metrics({"train/loss": 1.5}, step=3)
    assert out[1].experiment.settings.mode in ("offline", "dryrun")
    out[1].finalize("success")
    out[1].experiment.finish()
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_logger_errors_name_the_key_and_the_options(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"loggers: unknown logger 'mlflow'; available: csv, tensorboard, wandb"
    ):
        make_loggers(_cfg("csv", "mlflow"), tmp_path, "align")
    monkeypatch.setattr(loggers_mod, "_available", lambda module: module != "wandb")
    with pytest.raises(ConfigError, match=r"'wandb' needs the wandb package \(pip install wandb\)"):
        make_loggers(_cfg("wandb"), tmp_path, "align")


# --- hf_local ---------------------------------------------------------------------------------


def _png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_hf_local_datasetdict_with_embedded_images_reads_as_llava(tmp_path):
    datasets = pytest.importorskip("datasets")
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    train = datasets.Dataset.from_dict(
        {
            "id": ["a", "b", "c"],
            "image": [{"bytes": red, "path": None}, None, {"bytes": blue, "path": "blue.png"}],
            "conversations": [
                _turns("<image>\nColour?", "red"),
                _turns("Say hi.", "hi"),
                _turns("<image>\nColour?", "blue"),
            ],
            "caption": ["a red square", "", "a blue square"],
        }
    ).cast_column("image", datasets.Image())
    val = datasets.Dataset.from_dict(
        {
            "id": ["v"],
            "image": [{"bytes": red, "path": None}],
            "conversations": [_turns("<image>\nColour?", "red")],
            "caption": ["x"],
        }
    ).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "saved"))

    source = HFLocalDataset(train=str(tmp_path / "saved"))
    files = source.prepare(tmp_path / "cache")
    assert sorted(files.splits) == ["train", "val"]
    samples = read_llava(files.splits["train"], files.media_root)
    assert [s.id for s in samples] == ["a", "b", "c"]
    assert Path(samples[0].media["image"]).read_bytes() == red  # written as it was, not re-encoded
    assert Path(samples[2].media["image"]).read_bytes() == blue and samples[2].media[
        "image"
    ].endswith(".png")
    assert samples[1].media == {} and samples[1].conversations == _turns("Say hi.", "hi")
    assert samples[0].meta == {"caption": "a red square"}
    assert [s.id for s in read_llava(files.splits["val"], files.media_root)] == ["v"]
    # converted once: a second prepare reuses the files
    stamp = files.splits["train"].stat().st_mtime_ns
    assert source.prepare(tmp_path / "cache").splits["train"].stat().st_mtime_ns == stamp


def _parquet_with_paths(tmp_path: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(_png((0, 255, 0)))
    ds = datasets.Dataset.from_dict(
        {
            "id": [1, 2, 3],
            "image": ["1.png", None, "1.png"],
            "conversations": [
                _turns("<image>\nColour?", "green"),
                _turns("<image>\nColour?", "none"),
                _turns("Colour?", "green"),
            ],
        }
    )
    ds.to_parquet(str(tmp_path / "train.parquet"))
    return tmp_path / "train.parquet"


def test_hf_local_parquet_with_paths_goes_through_the_reader_rules(tmp_path):
    """Row 2 has a placeholder and no image, row 3 an image and no placeholder: the placeholder
    rule (check_placeholders) stops the read at row 2 with ``raise`` and drops both, listed,
    with ``skip``; relative paths resolve against media_root."""
    path = _parquet_with_paths(tmp_path)
    files = HFLocalDataset(train=str(path), media_root=str(tmp_path / "imgs")).prepare(
        tmp_path / "cache"
    )
    with pytest.raises(DataError, match=r"record 1 \(id 2, line 2\): 1 <image> placeholder"):
        read_llava(files.splits["train"], files.media_root)
    report = ReadReport(files.splits["train"])
    samples = read_llava(files.splits["train"], files.media_root, on_error="skip", report=report)
    assert [s.id for s in samples] == ["1"] and samples[0].media == {
        "image": str(tmp_path / "imgs" / "1.png")
    }
    assert [(d.index, d.id) for d in report.dropped] == [(1, "2"), (2, "3")]
    assert "(id 2," in report.dropped[0].message and "(id 3," in report.dropped[1].message


def test_hf_local_is_a_data_option_of_the_run(tmp_path):
    """``data=hf_local`` composes, builds through the registry and reads with on_error=skip."""
    path = _parquet_with_paths(tmp_path)
    registry = load_registry()
    cfg = compose(
        [
            "data=hf_local",
            f"data.train={path}",
            f"data.media_root={tmp_path / 'imgs'}",
            "data.on_error=skip",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        registry,
    )
    splits = read_source(registry, cfg.data, "data", Path(cfg.paths.data_dir))
    assert [s.id for s in splits["train"]] == ["1"]


def test_hf_local_without_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "t.parquet").write_bytes(b"")
    with pytest.raises(
        ConfigError,
        match=r"needs the Hugging Face `datasets` package: pip install 'mmbridge\[data\]'",
    ):
        HFLocalDataset(train=str(tmp_path / "t.parquet")).prepare(tmp_path / "cache")


def test_hf_local_refuses_a_datasetdict_with_other_split_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": ["a"], "conversations": [_turns("Hi", "hi")]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ConfigError, match=r"data.train: .*holds a DatasetDict \(splits train\)"):
        HFLocalDataset(train=str(tmp_path / "dd"), val=str(tmp_path / "single")).prepare(
            tmp_path / "cache"
        )
    with pytest.raises(ConfigError, match=r"data.val: not found"):
        HFLocalDataset(train=str(tmp_path / "single"), val=str(tmp_path / "nope")).prepare(
            tmp_path / "cache"
        )
