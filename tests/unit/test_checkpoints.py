"""Checkpoints that say what is wrong, and resume that runs no code from a file.

On the tiny real model: mmbridge checkpoints refuse weights that do not fit (missing,
unexpected, mis-shaped, all listed), a Lightning ``.ckpt`` is pointed to ``checkpoints/final``, a
newer format and an unregistered component are named; Lightning's checkpoints of a real ``fit``
load weights-only, a crafted pickle is refused even with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``,
and a truncated ``last.ckpt`` falls back to the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import shared_registry, stage_of
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from mmbridge.config import compose
from mmbridge.data.batcher import Batcher
from mmbridge.data.chat import ChatEncoder
from mmbridge.data.llava import read_llava
from mmbridge.errors import CheckpointError
from mmbridge.model import assemble
from mmbridge.plugins.datasets.shapes import ShapesDataset
from mmbridge.plugins.recipes.caption_pretrain import CaptionPretrainRecipe
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.runtime.session import session_from_checkpoint
from mmbridge.training.checkpoint import (
    SafeCheckpointIO,
    checkpoint_callback,
    load_weights,
    read_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    torch_load_safe,
)
from mmbridge.training.module import BridgeModule
from mmbridge.training.stages import configure_trainable

BASE = ["experiment=tiny", "encoder.image_size=32", "stages.align.max_steps=4"]
CONNECTOR = "branches.image.connector."


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(overrides: tuple[str, ...] = (), registry=None, seed: int = 0):
    registry = registry or shared_registry()
    cfg = compose([*BASE, *overrides], registry)
    torch.manual_seed(seed)
    model = assemble(cfg, registry)
    configure_trainable(model, stage_of(cfg, "align"))  # the connector trains
    return model, cfg


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    """Eight captioned shapes, batches of four, for the model of :func:`make_model`."""
    model, _ = make_model()
    files = ShapesDataset(n_train=8, n_val=0, n_test=0, image_size=32).prepare(
        tmp_path_factory.mktemp("data")
    )
    recipe = CaptionPretrainRecipe()
    samples = [
        recipe(s, random.Random(i))
        for i, s in enumerate(read_llava(files.splits["train"], files.media_root))
    ]
    chat = ChatEncoder(model.llm.tokenizer, list(model.branches), max_length=256)
    batcher = Batcher.from_model(model, chat)
    return DataLoader(
        [batcher.encode(s) for s in samples], batch_size=4, collate_fn=batcher.collator
    )


def fit(ckpt_dir: Path, loader, max_steps: int, ckpt_path: str | Path | None = None):
    """A real Lightning fit of the tiny model with the project's checkpointing;
    (trainer, module)."""
    model, cfg = make_model()
    module = BridgeModule(model, stage_of(cfg, "align"))
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[checkpoint_callback(ckpt_dir, 1)],
        plugins=[SafeCheckpointIO()],
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=2,
        check_val_every_n_epoch=None,
    )
    trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return trainer, module


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, loader):
    """``checkpoints/align`` of a three-step fit (validation at step 2), and its module."""
    ckpt_dir = tmp_path_factory.mktemp("run") / "checkpoints" / "align"
    _, module = fit(ckpt_dir, loader, 3)
    return ckpt_dir, module


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # a link's target stays; a file is replaced by its first half
    path.write_bytes(data[: len(data) // 2])


# -- Lightning checkpoints: weights-only, the last two kept, fallback ----------------------------


def test_a_real_fit_keeps_two_checkpoints_that_load_weights_only(fitted):
    ckpt_dir, module = fitted
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]
    assert not (ckpt_dir / "last.ckpt").is_symlink()  # a copy: see checkpoint_callback
    ck = torch_load_safe(ckpt_dir / "last.ckpt")  # weights_only=True, no extra safe globals
    assert ck["global_step"] == 3
    assert {
        "state_dict",
        "optimizer_states",
        "lr_schedulers",
        "loops",
        "callbacks",
        "mmbridge",
    } <= set(ck)
    assert set(ck["state_dict"]) == {f"model.{k}" for k in module.model.trainable_state_dict()}
    assert all(k.startswith(f"model.{CONNECTOR}") for k in ck["state_dict"])
    assert (
        ck["mmbridge"]["history"] == module.history and ck["mmbridge"]["history"][0]["step"] == 2.0
    )
    assert torch_load_safe(ckpt_dir / "step=2.ckpt")["global_step"] == 2


def test_resume_continues_and_rotates_in_place(loader, tmp_path):
    run = tmp_path / "checkpoints" / "align"
    _, first = fit(run, loader, 3)
    trainer, resumed = fit(run, loader, 4, ckpt_path=resumable_checkpoint(run))
    assert trainer.global_step == 4 and resumed.history[0] == first.history[0]
    assert [h["step"] for h in resumed.history] == [2.0, 4.0]
    assert sorted(p.name for p in run.iterdir()) == ["last.ckpt", "step=3.ckpt", "step=4.ckpt"]
    assert torch_load_safe(run / "last.ckpt")["global_step"] == 4


def test_truncated_last_checkpoint_falls_back_to_the_previous(loader, tmp_path, caplog):
    run = tmp_path / "checkpoints" / "align"
    fit(run, loader, 3)
    assert resumable_checkpoint(run) == run / "last.ckpt"
    truncate(run / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"'.*last\.ckpt' is unreadable"):
        SafeCheckpointIO().load_checkpoint(run / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="mmbridge.training.checkpoint"):
        assert resumable_checkpoint(run) == run / "step=3.ckpt"  # the same step
        truncate(run / "step=3.ckpt")
        assert resumable_checkpoint(run) == run / "step=2.ckpt"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    unreadable = (
        "is unreadable (PytorchStreamReader failed reading zip archive: "
        "failed finding central directory)"
    )
    assert warnings == [
        f"{run}: last.ckpt {unreadable}; resuming from step=3.ckpt",
        f"{run}: last.ckpt {unreadable}; step=3.ckpt {unreadable}; resuming from step=2.ckpt",
    ]
    trainer, module = fit(run, loader, 4, ckpt_path=resumable_checkpoint(run))
    assert trainer.global_step == 4 and [h["step"] for h in module.history] == [2.0, 4.0]
    assert torch_load_safe(run / "last.ckpt")["global_step"] == 4  # the run heals
    # step 3 rewritten in place (no -v1 copy); Lightning never deletes the file it resumed from
    assert sorted(p.name for p in run.iterdir()) == [
        "last.ckpt",
        "step=2.ckpt",
        "step=3.ckpt",
        "step=4.ckpt",
    ]
    assert torch_load_safe(run / "step=3.ckpt")["global_step"] == 3


def test_linked_last_and_nothing_usable(fitted, tmp_path, caplog):
    run = copy_dir(fitted[0], tmp_path / "align")
    (run / "last.ckpt").unlink()
    (run / "last.ckpt").symlink_to("step=3.ckpt")  # Lightning's save_last="link"
    assert resumable_checkpoint(run) == run / "last.ckpt"
    truncate(run / "step=3.ckpt")
    with caplog.at_level(logging.WARNING, logger="mmbridge.training.checkpoint"):
        assert resumable_checkpoint(run) == run / "step=2.ckpt"
        assert "last.ckpt (-> step=3.ckpt) is unreadable" in caplog.records[-1].getMessage()
        truncate(run / "step=2.ckpt")
        caplog.clear()
        assert resumable_checkpoint(run) is None
    assert len(caplog.records) == 1 and "no usable checkpoint" in caplog.records[0].getMessage()
    assert resumable_checkpoint(tmp_path / "empty") is None


class _RunsACommand:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_in_last_ckpt_is_refused_and_never_runs(
    fitted, loader, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    run = copy_dir(fitted[0], tmp_path / "align")
    marker = tmp_path / "pwned"
    good = torch_load_safe(run / "step=3.ckpt")
    torch.save({**good, "payload": _RunsACommand(marker)}, run / "last.ckpt")

    with pytest.raises(
        CheckpointError, match=r"last\.ckpt. refused: .*unsupported GLOBAL posix\.system"
    ):
        SafeCheckpointIO().load_checkpoint(run / "last.ckpt")
    # not quietly skipped for an older one: a tampered file stops the resume
    with pytest.raises(CheckpointError, match="refused"):
        resumable_checkpoint(run)
    with pytest.raises(CheckpointError, match="refused"):
        fit(tmp_path / "other", loader, 4, ckpt_path=run / "last.ckpt")
    with pytest.raises(CheckpointError, match="Lightning training checkpoint"):
        read_checkpoint(run / "last.ckpt")
    assert not marker.exists()
    # the file is really dangerous: torch.load without weights_only, under this variable, runs it
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(run / "last.ckpt")
    assert marker.exists()


# -- mmbridge checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-connector mmbridge checkpoint in ``run/checkpoints/final``; (dir, model)."""
    model, cfg = make_model(seed=1)
    out = tmp_path_factory.mktemp("saved") / "run" / "checkpoints" / "final"
    save_checkpoint(model, cfg, out, ["align"], registry=shared_registry())
    return out, model


def test_round_trip_records_components_and_loads_exactly(saved):
    out, trained = saved
    _, weights, meta = read_checkpoint(out, registry=shared_registry())
    comps = json.loads(meta["components"])
    assert comps["connector"] == {
        "kind": "connector",
        "name": "mlp",
        "plugin": "mmbridge.plugins.converters",
        "package": "mmbridge",
        "version": comps["llm"]["version"],
    }
    assert {k: c["kind"] for k, c in comps.items()} == {
        "llm": "llm",
        "encoder": "encoder",
        "connector": "connector",
        "data": "dataset",
    }
    model, _ = make_model(seed=2)
    load_weights(model, weights, str(out))
    for k, v in trained.trainable_state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_missing_unexpected_and_mismatched_are_listed_together(saved):
    out, _ = saved
    _, weights, _ = read_checkpoint(out)
    keys = sorted(weights)
    bad = dict(weights)
    del bad[keys[0]]
    bad["llm.not_a_weight"] = torch.zeros(2)
    bad[keys[1]] = torch.zeros(3, 5)
    model, _ = make_model(seed=2)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(model, bad, "ckpt")
    msg = str(err.value)
    assert f"missing 1 tensor(s) the model trains: {keys[0]}" in msg
    assert "1 unexpected tensor(s) (not trained by this model): llm.not_a_weight" in msg
    assert f"1 shape mismatch(es): {keys[1]} (3, 5) vs model {tuple(weights[keys[1]].shape)}" in msg
    for k, v in model.trainable_state_dict().items():  # nothing half-loaded
        torch.testing.assert_close(v, before[k])


def test_partial_file_is_an_error(saved, tmp_path):
    out, _ = saved
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        meta = f.metadata()
    weights = {
        k: v for k, v in load_file(str(out / "weights.safetensors")).items() if ".0." not in k
    }
    save_file(weights, str(tmp_path / "weights.safetensors"), metadata=meta)
    with pytest.raises(
        CheckpointError, match=rf"missing 2 tensor\(s\) .*{CONNECTOR}net\.0\.bias"
    ) as err:
        session_from_checkpoint(str(tmp_path), with_data=False, registry=shared_registry())
    assert f"{CONNECTOR}net.0.weight" in str(err.value)


def test_architecture_override_on_eval_is_an_error(saved):
    out, _ = saved
    with pytest.raises(
        CheckpointError, match=r"does not fit the model.*\n  missing 2 tensor\(s\)"
    ) as err:
        session_from_checkpoint(
            str(out), overrides=["connector.depth=3"], with_data=False, registry=shared_registry()
        )
    assert f"{CONNECTOR}net.4.weight" in str(err.value)


def test_lightning_checkpoint_is_pointed_to_final(saved, fitted):
    final, _ = saved
    run = final.parents[1]
    align = copy_dir(fitted[0], run / "checkpoints" / "align")
    for where in (align / "last.ckpt", align / "step=2.ckpt", align):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(where)
        assert str(err.value) == (
            f"checkpoint '{where}' is a Lightning training checkpoint (for "
            f"`resume=RUN_DIR`), not an mmbridge checkpoint; pass {final} "
            f"(or a weights.safetensors file)"
        )
    with pytest.raises(CheckpointError, match=rf"no weights.safetensors there; pass {final}$"):
        read_checkpoint(run)


def test_newer_format_is_a_version_error(saved, tmp_path):
    out, _ = saved
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        meta = {**f.metadata(), "format": "mmbridge-2"}
    save_file(
        load_file(str(out / "weights.safetensors")),
        str(tmp_path / "weights.safetensors"),
        metadata=meta,
    )
    with pytest.raises(
        CheckpointError,
        match=r"has format mmbridge-2, newer than this mmbridge reads "
        r"\(mmbridge-1 to mmbridge-1\); upgrade",
    ):
        read_checkpoint(tmp_path)


FANCY = """
import mmbridge
from mmbridge.plugins.converters.mlp import MLPConverter

class FancyMLP(MLPConverter):
    '''An MLP connector from a third-party package.'''

@mmbridge.hookimpl
def register_components(registry):
    registry.add_connector("fancy_mlp", FancyMLP)
"""


def test_unknown_component_names_its_package(fake_dist, tmp_path, monkeypatch):
    monkeypatch.delenv("MMBRIDGE_DISABLE_PLUGINS", raising=False)
    fake_dist("mmbridge-fancy", "mmbridge_fancy", FANCY, ep_name="fancy")
    with_plugin = load_registry()
    model, cfg = make_model(("connector.name=fancy_mlp",), registry=with_plugin)
    save_checkpoint(model, cfg, tmp_path / "final", ["align"], registry=with_plugin)
    _, _, meta = read_checkpoint(tmp_path / "final", registry=with_plugin)
    assert json.loads(meta["components"])["connector"]["package"] == "mmbridge-fancy"
    with pytest.raises(CheckpointError) as err:
        session_from_checkpoint(
            str(tmp_path / "final"), with_data=False, registry=shared_registry()
        )
    assert str(err.value) == (
        f"checkpoint '{tmp_path / 'final' / 'weights.safetensors'}' needs components that are not "
        f"installed:\n  connector: connector 'fancy_mlp' of plugin 'fancy' is not registered; pip "
        "install mmbridge-fancy (version 0.1 wrote it), "
        "or unset MMBRIDGE_DISABLE_PLUGINS if it is installed"
    )


def test_safetensors_header_length_starting_like_a_pickle_is_still_read(tmp_path):
    """The header length's first byte can be 0x80, a pickle's first byte: not a Lightning file."""
    path = tmp_path / "weights.safetensors"
    for n in range(256):
        save_file({"x": torch.ones(2)}, str(path), metadata={"config": "seed: 3\n", "pad": "p" * n})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    cfg, weights, _ = read_checkpoint(path)
    assert cfg.seed == 3 and weights["x"].tolist() == [1.0, 1.0]
