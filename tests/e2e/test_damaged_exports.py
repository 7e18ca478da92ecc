"""Damaged checkpoints and bundles, and exports that would destroy what they read.

A bundle records the sha256 of every file it loads; one flipped byte, a removed, truncated or
replaced file is refused naming the file. A checkpoint directory with one file removed,
truncated or replaced loads or fails with one CheckpointError naming it, never a raw error.
``export`` over its own run (or the checkpoint it reads) is refused even with ``overwrite``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from e2e.test_export import TINY, make_checkpoint
from helpers import shared_registry

import mmbridge
from mmbridge.errors import CheckpointError, ConfigError, IntegrityError, MMBridgeError
from mmbridge.export import export

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory as `mmbridge train` leaves it (the parts export reads)."""
    root = tmp_path_factory.mktemp("run")
    make_checkpoint(root / "checkpoints" / "final", TINY)
    (root / "metrics.json").write_text(json.dumps({"test": {"exact_match": 0.5}}))
    (root / "config.yaml").write_text((root / "checkpoints" / "final" / "config.yaml").read_text())
    return root


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory) -> Path:
    return export(
        run / "checkpoints" / "final",
        tmp_path_factory.mktemp("exp") / "bundle",
        registry=shared_registry(),
    )


def _load(path: Path):
    return mmbridge.load(path, device="cpu", registry=shared_registry())


def test_bundle_records_a_checksum_of_every_file_it_loads(bundle):
    manifest = json.loads((bundle / "mmbridge.json").read_text())
    listed = set(manifest["checksums"])
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert listed == on_disk - {"mmbridge.json", "README.md"}
    assert {"weights.safetensors", "config.yaml", "files/llm.path/tokenizer.json"} <= listed
    assert all(len(v) == 64 for v in manifest["checksums"].values())


def test_a_flipped_byte_in_the_weights_is_refused(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    data = bytearray((copy / "weights.safetensors").read_bytes())
    data[-7] ^= 0x10  # a bit of the last tensor: safetensors itself would load it silently
    (copy / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError,
        match=rf"bundle '{copy}' is damaged: weights.safetensors has changed "
        r"since the bundle was written \(sha256 differs\)",
    ):
        _load(copy)


@pytest.mark.parametrize("damage", ["remove", "truncate", "replace"])
def test_every_file_of_a_bundle_damaged_is_one_error_naming_it(bundle, tmp_path, damage):
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    rng = random.Random(damage)
    for i, victim in enumerate(rng.sample(files, min(5, len(files)))):
        copy = Path(shutil.copytree(bundle, tmp_path / f"b{i}"))
        target = copy / victim.relative_to(bundle)
        rel = target.relative_to(copy).as_posix()
        if damage == "remove":
            target.unlink()
        elif damage == "truncate":
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        else:
            target.write_text('{"not": "what was there"}')
        if rel == "README.md":  # the model card is not read by load
            assert _load(copy) is not None
            continue
        with pytest.raises(MMBridgeError) as err:
            _load(copy)
        msg = str(err.value)
        assert str(copy) in msg and (rel in msg or "mmbridge.json" in rel), msg


@pytest.mark.parametrize("damage", ["remove", "truncate", "replace"])
def test_a_damaged_checkpoint_directory_is_one_error_naming_it(run, tmp_path, damage):
    for name in ("weights.safetensors", "config.yaml"):
        copy = Path(shutil.copytree(run / "checkpoints" / "final", tmp_path / f"{damage}-{name}"))
        target = copy / name
        if damage == "remove":
            target.unlink()
        elif damage == "truncate":
            target.write_bytes(target.read_bytes()[:100])
        else:
            target.write_bytes(b"\x00" * 64)
        try:
            _load(copy)  # config.yaml is informative: the weights' metadata holds the config
        except CheckpointError as exc:
            assert str(copy) in str(exc), exc
        else:
            assert name == "config.yaml"


def test_a_bundle_without_its_manifest_says_so(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    (copy / "mmbridge.json").unlink()
    with pytest.raises(
        CheckpointError,
        match="weights file of a format=bundle export whose mmbridge.json is missing",
    ):
        _load(copy)


def test_export_over_its_own_run_is_refused_even_with_overwrite(run, tmp_path):
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    ckpt = run / "checkpoints" / "final"
    for out in (run, ckpt, run / "checkpoints", ckpt / "inside"):
        with pytest.raises(ConfigError, match=rf"out={out}: (holds|lies inside) "):
            export(ckpt, out, overwrite=True, registry=shared_registry())
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    bundle = export(ckpt, tmp_path / "b", registry=shared_registry())
    with pytest.raises(
        ConfigError, match=rf"out={bundle}: holds {bundle}"
    ):  # re-export a bundle over itself
        export(bundle, bundle, overwrite=True, registry=shared_registry())
    assert _load(bundle) is not None


def test_export_checks_free_space_before_writing(run, tmp_path, monkeypatch):
    from mmbridge.errors import StorageError
    from mmbridge.utils import io as mio

    monkeypatch.setattr(
        mio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 4096, 4096)
    )
    with pytest.raises(
        StorageError,
        match=rf"{tmp_path}: not enough free space for the bundle export: "
        r"needs [\d,]+ bytes \([\d.]+ MiB\) \(plus 64 KiB headroom\), 4,096 bytes free",
    ):
        export(run / "checkpoints" / "final", tmp_path / "b", registry=shared_registry())
    assert list(tmp_path.iterdir()) == []
