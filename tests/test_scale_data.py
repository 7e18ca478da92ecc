"""Data and logging at LLaVA scale: the loggers chosen in config (``loggers``) and the
``hf_local`` data source (Hugging Face ``datasets`` saved locally, LLaVA schema)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import OmegaConf

from mmbridge.errors import ConfigError
from mmbridge.training import loggers as loggers_mod
from mmbridge.training.loggers import make_loggers

# --- loggers ----------------------------------------------------------------------------------


def _cfg(*names: str):
    return OmegaConf.create({"loggers": list(names), "run_name": "tiny"})


def test_default_loggers_write_csv_and_tensorboard_per_stage(tmp_path):
    out = make_loggers(OmegaConf.create({"run_name": "tiny"}), tmp_path, "align")
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
    assert [type(x) for x in first] == [CSVLogger] and Path(first[0].log_dir) == tmp_path / "logs" / "align"
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
    assert init["dir"] == str(tmp_path / "logs") and init["name"] == "tiny-instruct" and init["group"] == "tiny"
    out[1].log_metrics({"train/loss": 1.5}, step=3)
    assert out[1].experiment.settings.mode in ("offline", "dryrun")
    out[1].finalize("success")
    out[1].experiment.finish()
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_logger_errors_name_the_key_and_the_options(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"loggers: unknown logger 'mlflow'; available: csv, tensorboard, wandb"):
        make_loggers(_cfg("csv", "mlflow"), tmp_path, "align")
    monkeypatch.setattr(loggers_mod, "_available", lambda module: module != "wandb")
    with pytest.raises(ConfigError, match=r"'wandb' needs the wandb package \(pip install wandb\)"):
        make_loggers(_cfg("wandb"), tmp_path, "align")
