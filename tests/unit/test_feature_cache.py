"""The streaming feature cache: exact rows across shards, resume, healing, the disk check; and the
healing of generated data sets and converted assets."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.data import feature_cache
from mmbridge.data.feature_cache import load_or_compute
from mmbridge.errors import DataError

MAX_TOKENS, DIM = 6, 8


class CountingEncoder(ModalityEncoder):
    """A real module with fixed integer weights: features are exact in float16, and each file's
    token count (1..6) depends on its content, so rows have different lengths.

    ``fail_after`` raises inside ``forward`` after that many batches (an interrupted fill); it is
    not part of the cache identity, so a later run resumes the same entry.
    """

    modality = "image"

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.init_args = {"dim": DIM}
        self.proj = nn.Linear(4, DIM, bias=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randint(-3, 4, (DIM, 4), generator=g).float())
        self.fail_after, self.batches, self.items = fail_after, 0, 0

    @property
    def out_dim(self) -> int:
        return DIM

    def load(self, path: str) -> int:
        return int(Path(path).read_text())

    def preprocess(self, raw: int) -> torch.Tensor:
        return torch.tensor([raw % 11, raw % 7, raw % 3, 1.0])

    def num_tokens(self, x: torch.Tensor) -> int:
        return 1 + int(x[0]) % MAX_TOKENS

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("interrupted")
        self.batches += 1
        self.items += batch.shape[0]
        return self._encode(batch)

    def _encode(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.arange(1, MAX_TOKENS + 1, dtype=batch.dtype)[None, :, None]
        n = 1 + batch[:, 0].long() % MAX_TOKENS
        return self.proj(batch)[:, None, :] * scale, torch.arange(MAX_TOKENS)[None, :] < n[:, None]

    def expected(self, path: str) -> torch.Tensor:
        """Row of one file, encoded alone: ``[N, D]`` float16."""
        with torch.no_grad():
            feats, mask = self._encode(self.preprocess(self.load(path))[None])
        return feats[0, mask[0]].half()


@pytest.fixture
def media(tmp_path) -> list[str]:
    root = tmp_path / "media"
    root.mkdir()
    paths = []
    for k in range(23):
        p = root / f"{k:03d}.txt"
        p.write_text(str(k * 5 + 3))
        paths.append(str(p))
    return paths


def _fill(paths, cache, encoder=None, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("shard_rows", 5)
    return load_or_compute(encoder or CountingEncoder(), paths, cache, **kw)


def _warnings(caplog) -> list:
    """The warning records (another test's logging set-up may let INFO lines through too)."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def _assert_exact(table, paths) -> None:
    ref = CountingEncoder()
    for p in paths:
        want = ref.expected(p)
        got = table.lookup(p)
        assert got.dtype == torch.float16 and got.shape == want.shape
        assert torch.equal(got, want), p
    assert table.lengths.tolist() == [ref.expected(p).shape[0] for p in sorted(paths)]


def test_rows_round_trip_exactly_across_shards(media, tmp_path):
    table, stats = _fill(media + media[:3], tmp_path / "fc")  # duplicates are stored once
    assert not stats["hit"] and stats["rows"] == 23
    _assert_exact(table, media)
    entry = Path(stats["path"])
    index = json.loads((entry / "index.json").read_text())
    assert index["complete"] and sorted(index["shards"]) == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]  # 5+5+5+5+3 rows
    # unpadded: the bytes on disk are the sum of the rows, not rows x max length
    lengths = table.lengths
    assert len(set(lengths.tolist())) > 1
    on_disk = sum(f.stat().st_size for f in entry.glob("shard-*.bin"))
    assert (
        on_disk
        == stats["bytes"]
        == int(lengths.sum()) * DIM * 2
        < len(media) * MAX_TOKENS * DIM * 2
    )
    again, stats2 = _fill(media, tmp_path / "fc", encoder=(enc := CountingEncoder()))
    assert stats2["hit"] and enc.items == 0 and stats2["key"] == stats["key"]
    _assert_exact(again, media)
    clone = pickle.loads(pickle.dumps(again))  # as DataLoader workers receive it
    assert torch.equal(clone.lookup(media[7]), again.lookup(media[7]))


def test_fill_through_loader_workers_on_a_device(media, tmp_path):
    table, stats = _fill(media, tmp_path / "fc", num_workers=2, device="cpu", batch_size=3)
    _assert_exact(table, media)


def test_truncated_shard_heals_with_one_warning(media, tmp_path, caplog):
    _, stats = _fill(media, tmp_path / "fc")
    entry = Path(stats["path"])
    shard = entry / "shard-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    enc = CountingEncoder()
    with caplog.at_level(logging.INFO, logger="mmbridge.cache"):
        table, stats = _fill(media, tmp_path / "fc", encoder=enc)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "shard-00002.bin" in warnings[0].getMessage()
    assert "moved to shard-00002.bin.corrupt-" in warnings[0].getMessage()
    assert stats["healed"] == 1 and not stats["hit"]
    assert enc.items == 5  # only the damaged shard's rows are computed again
    assert len(list(entry.glob("shard-00002.bin.corrupt-*"))) == 1
    _assert_exact(table, media)


def test_altered_shard_is_caught_by_its_checksum(media, tmp_path, caplog):
    _, stats = _fill(media, tmp_path / "fc")
    shard = Path(stats["path"]) / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mmbridge.cache"):
        table, stats = _fill(media, tmp_path / "fc")
    assert [r.getMessage() for r in caplog.records if "SHA-256" in r.getMessage()]
    assert len(_warnings(caplog)) == 1 and stats["healed"] == 1
    _assert_exact(table, media)


@pytest.mark.parametrize("name", ["index.json", "paths.json"])
def test_corrupt_index_moves_the_entry_aside(media, tmp_path, caplog, name):
    _, stats = _fill(media, tmp_path / "fc")
    entry = Path(stats["path"])
    text = (entry / name).read_text()
    (entry / name).write_text(text[: len(text) // 3])
    with caplog.at_level(logging.WARNING, logger="mmbridge.cache"):
        table, stats = _fill(media, tmp_path / "fc")
    assert (
        len(_warnings(caplog)) == 1
        and "index.json is unreadable" in _warnings(caplog)[0].getMessage()
    )
    assert len(list(entry.parent.glob(f"{entry.name}.corrupt-*"))) == 1
    _assert_exact(table, media)


def test_interrupted_fill_resumes_after_the_last_complete_shard(media, tmp_path, caplog):
    # batches of 4 rows, shards of 5: after 3 batches (12 rows) shards 0 and 1 are complete
    with pytest.raises(RuntimeError, match="interrupted"):
        _fill(media, tmp_path / "fc", encoder=CountingEncoder(fail_after=3))
    entry = next((tmp_path / "fc").glob("image-*[!k]"))
    index = json.loads((entry / "index.json").read_text())
    assert not index["complete"] and sorted(index["shards"]) == ["0", "1"]
    assert not list(entry.glob("*.partial"))
    enc = CountingEncoder()
    with caplog.at_level(logging.INFO, logger="mmbridge.cache"):
        table, stats = _fill(media, tmp_path / "fc", encoder=enc)
    assert stats["resumed"] == 2 and enc.items == 23 - 10
    assert any("2 of 5 shards already written" in r.getMessage() for r in caplog.records)
    _assert_exact(table, media)


def test_refuses_when_the_disk_cannot_hold_it(media, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        feature_cache.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096)
    )
    with pytest.raises(
        DataError, match=r"need about .* only 0\.0 MB is free.*paths\.feature_cache_dir"
    ):
        _fill(media, tmp_path / "fc")
    entry = next((tmp_path / "fc").glob("image-*[!k]"))
    assert not list(entry.glob("shard-*"))  # nothing was written


def test_progress_is_logged_without_a_terminal(media, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mmbridge.cache"):
        _fill(media, tmp_path / "fc", log_every=8)
    lines = [r.getMessage() for r in caplog.records if "items/s" in r.getMessage()]
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["8/23", "16/23", "23/23"]
    assert all("ETA" in line for line in lines)
    assert any("about" in r.getMessage() and "free" in r.getMessage() for r in caplog.records)


def test_real_vision_encoder_round_trip(tmp_path):
    from mmbridge.plugins.encoders.hf_vision import HFVisionEncoder

    enc = HFVisionEncoder.for_testing(tmp_path / "enc")
    paths = [enc.example_media(tmp_path / "img", k) for k in range(5)]
    table, _ = load_or_compute(enc, paths, tmp_path / "fc", batch_size=5, shard_rows=2)
    with torch.inference_mode():
        feats, mask = enc(enc.collate([enc.preprocess(enc.load(p)) for p in sorted(paths)]))
    for k, p in enumerate(sorted(paths)):
        assert torch.equal(table.lookup(p), feats[k, mask[k]].half())


def test_generated_data_set_heals(tmp_path, caplog):
    from mmbridge.data.generated import publish_once

    calls = []

    def generate(out: Path) -> None:
        calls.append(out)
        (out / "a.json").write_text("[1, 2, 3]")
        (out / "img").mkdir()
        (out / "img" / "0.png").write_bytes(b"\x89PNG" + bytes(100))

    final = publish_once(tmp_path, "k1", generate)
    assert publish_once(tmp_path, "k1", generate) == final and len(calls) == 1
    (final / "img" / "0.png").write_bytes(b"\x89PNG")  # truncated
    with caplog.at_level(logging.WARNING, logger="mmbridge.cache"):
        again = publish_once(tmp_path, "k1", generate)
    assert again == final and len(calls) == 2 and (final / "img" / "0.png").stat().st_size == 104
    assert (
        len(_warnings(caplog)) == 1
        and "img/0.png has 4 bytes, 104 were written" in _warnings(caplog)[0].getMessage()
    )
    aside = list(tmp_path.glob("k1.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "a.json").read_text() == "[1, 2, 3]"  # nothing deleted


def test_converted_asset_heals(tmp_path, caplog):
    from mmbridge.registry.assets import Asset

    class Toy(Asset):
        name, format, source = "toy", "hf", "a test"
        conversions = 0

        def source_available(self) -> bool:
            return True

        def convert(self, out_dir: Path) -> str:
            Toy.conversions += 1
            (out_dir / "model.safetensors").write_bytes(bytes(64))
            return "ok"

    asset = Toy()
    path = asset.ensure(tmp_path)
    assert asset.is_converted(tmp_path) and Toy.conversions == 1
    (path / "model.safetensors").write_bytes(bytes(10))
    assert not asset.is_converted(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mmbridge.cache"):
        asset.ensure(tmp_path)
    assert Toy.conversions == 2 and (path / "model.safetensors").stat().st_size == 64
    assert (
        len(_warnings(caplog)) == 1
        and "model.safetensors has 10 bytes" in _warnings(caplog)[0].getMessage()
    )
    assert len(list((tmp_path / "assets").glob("toy.corrupt-*"))) == 1


def test_cache_dir_is_not_left_half_written_by_a_refused_fill(media, tmp_path, monkeypatch):
    """After a refusal, a fill with enough space completes normally."""
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda p: usage(1, 1, 0))
    with pytest.raises(DataError):
        _fill(media, tmp_path / "fc")
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", real)
    table, stats = _fill(media, tmp_path / "fc")
    _assert_exact(table, media)
