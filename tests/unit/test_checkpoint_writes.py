"""Checkpoint writes that cannot half-write: a disk filling during a training checkpoint's write
(an injected ``ENOSPC`` half-way through the bytes) leaves no file under the checkpoint's name
and no temporary file, names the path and the last good checkpoint, and the run resumes from
that one; the free-space check refuses before writing; the atomic writer names a full disk."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch
from unit.test_checkpoints import fit, loader, make_model  # noqa: F401  (loader: a module fixture)

from mmbridge.errors import StorageError
from mmbridge.training.checkpoint import resumable_checkpoint, save_checkpoint, torch_load_safe
from mmbridge.utils import io as mio

pytestmark = pytest.mark.usefixtures("one_thread")


class _FullDisk:
    """A file object whose writes of a ``.ckpt`` (``victim`` in its name) fail with ENOSPC
    after half the bytes."""

    def __init__(self, f, name: str, victim: str) -> None:
        self.f, self.name, self.victim = f, name, victim

    def write(self, data) -> int:
        if self.victim in self.name:
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.mark.parametrize("victim", ["step=4", "last"])
def test_disk_full_during_a_checkpoint_write_keeps_the_last_good_one(
    loader,  # noqa: F811
    tmp_path,
    monkeypatch,
    victim,
):
    """The disk fills while ``step=4.ckpt`` is written, or after it, while ``last.ckpt`` is."""
    run = tmp_path / "checkpoints" / "align"
    fit(run, loader, 3)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert sorted(before) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]

    real_fdopen = mio.os.fdopen
    opened: list[str] = []

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        name = mio.os.readlink(f"/proc/self/fd/{fd}")
        opened.append(name)
        return _FullDisk(f, name, f".{victim}.ckpt.")

    monkeypatch.setattr(mio.os, "fdopen", fdopen)
    with pytest.raises(StorageError) as err:
        fit(run, loader, 5, ckpt_path=resumable_checkpoint(run))
    monkeypatch.undo()
    good = run / ("last.ckpt" if victim == "step=4" else "step=4.ckpt")
    msg = str(err.value)
    assert f"{run / f'{victim}.ckpt'}: disk full (No space left on device)" in msg
    assert f"the last complete checkpoint, {good}, still resumes" in msg
    assert any(f".{victim}.ckpt." in o for o in opened)  # written under a temporary name
    after = {p.name: p.read_bytes() for p in run.iterdir()}  # no temporary file left
    if victim == "step=4":  # nothing half-written under a checkpoint's name, the old ones intact
        assert after == before
    else:
        assert sorted(after) == ["last.ckpt", "step=3.ckpt", "step=4.ckpt"]
        assert after["last.ckpt"] == before["last.ckpt"]
    assert resumable_checkpoint(run) == good  # the newest complete one
    step = 3 if victim == "step=4" else 4
    assert torch_load_safe(good)["global_step"] == step
    fit(run, loader, 5, ckpt_path=resumable_checkpoint(run))  # space again: the run goes on
    assert torch_load_safe(run / "last.ckpt")["global_step"] == 5


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    model, cfg = make_model()
    monkeypatch.setattr(
        mio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000)
    )
    with pytest.raises(
        StorageError,
        match=r"final: not enough free space for the checkpoint final: "
        r"needs [\d,]+ bytes( \([\d.]+ MiB\))? \(plus 64 KiB headroom\), "
        r"5,000 bytes free",
    ):
        save_checkpoint(model, cfg, tmp_path / "final", ["align"])
    assert not any((tmp_path / "final").iterdir())


def test_atomic_writer_names_a_full_disk_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mio.os, "replace", replace)
    with pytest.raises(
        StorageError, match=rf"{target}: disk full \(No space left on device\): needed 3 bytes, "
    ):
        mio.atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_feature_cache_shard_on_a_full_disk_names_it_and_keeps_complete_shards(tmp_path):
    import numpy as np

    from mmbridge.data import shards

    entry = tmp_path / "entry"
    entry.mkdir()
    index = shards.new_index(entry, [f"/m/{i}.png" for i in range(4)], shard_rows=2, meta={})
    writer = shards.ShardWriter(entry, index)
    feats = np.ones((3, 8), dtype=np.float16)
    writer.add(0, feats)
    writer.add(1, feats)  # shard 0 complete and published
    writer.add(2, feats)

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._file = Full()
    with pytest.raises(StorageError, match=rf"{entry / 'shard-00001.bin.partial'}: disk full"):
        writer.add(3, feats)
    writer.abort()
    assert sorted(p.name for p in entry.iterdir()) == [
        "index.json",
        "paths.json",
        "shard-00000.bin",
    ]
    assert list(shards.read_index(entry)["shards"]) == ["0"]


def test_a_checkpoint_whose_stored_config_is_not_yaml_is_named(tmp_path):
    from safetensors.torch import save_file

    from mmbridge.errors import CheckpointError
    from mmbridge.training.checkpoint import read_checkpoint

    save_file(
        {"w": torch.zeros(2)},
        str(tmp_path / "weights.safetensors"),
        metadata={"config": "a: [1\n b: : 2", "format": "mmbridge-1"},
    )
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint '{tmp_path}/weights.safetensors': the config in "
        r"its metadata is unreadable \(",
    ):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("key", "value"), [("stages", "[align"), ("components", "[]"), ("lora", "maybe")]
)
def test_a_checkpoint_with_damaged_metadata_is_named(tmp_path, key, value):
    from safetensors.torch import save_file

    from mmbridge.errors import CheckpointError
    from mmbridge.training.checkpoint import read_checkpoint

    meta = {"config": "seed: 0", "format": "mmbridge-1", "stages": "[]", key: value}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"), metadata=meta)
    with pytest.raises(
        CheckpointError, match=rf"weights.safetensors': its metadata '{key}' is not a JSON"
    ):
        read_checkpoint(tmp_path)
