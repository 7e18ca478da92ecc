"""The frozen-encoder feature cache, streamed to and from sharded files on disk.

Features are computed once per (encoder identity, media set, autocast) and reused by every
later run. The key hashes the encoder's :meth:`~mmbridge.ModalityEncoder.cache_identity`
(class, arguments, preprocessing, weights fingerprint) and the sorted list of media files with
their sizes and modification times, so any change of either makes a new entry.

An entry is a folder of shards (:mod:`mmbridge.data.shards`): rows are stored unpadded
(``N_r x D`` float16 each, with per-row lengths in the index) and read one at a time, so neither
filling nor reading ever holds the table in memory. The fill runs the encoder in batches fed by
a DataLoader (media decoded in ``num_workers`` worker processes), publishes each finished shard
at once (an interrupted fill resumes after the last complete shard), and before writing
anything estimates the size from the first batch and refuses when the disk cannot hold it.
A file lock makes two runs filling the same entry compute it once. A damaged entry (truncated
or altered shard, unreadable index) is moved aside with one warning and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from rich.progress import Progress, TaskID
from torch.utils.data import DataLoader, Dataset

from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.data import shards
from mmbridge.errors import DataError
from mmbridge.utils.cache_integrity import move_aside

log = logging.getLogger("mmbridge.cache")

FORMAT_VERSION = 2
#: Rows per shard: a few thousand (CLIP-L/336 features: ~2.4 GB a shard).
SHARD_ROWS = 2048
#: Entries up to this size have every shard's SHA-256 checked when opened; larger ones only
#: their sizes (a truncation), unless ``verify=True``.
VERIFY_LIMIT = 2 << 30
#: Kept free on the disk on top of the estimate.
DISK_RESERVE = 256 << 20


def _media_fingerprint(paths: Sequence[str]) -> list[list]:
    out = []
    for p in sorted(set(paths)):
        st = os.stat(p)
        out.append([p, st.st_size, int(st.st_mtime)])
    return out


def cache_key(encoder: ModalityEncoder, paths: Sequence[str], autocast: str | None = None) -> str:
    payload = {
        "v": FORMAT_VERSION,
        "encoder": encoder.cache_identity(),
        "media": _media_fingerprint(paths),
        "autocast": autocast,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class FeatureTable:
    """Cached features of a set of media files, read from disk on demand.

    ``lookup(path) -> [N, D]`` float16; ``lengths`` is ``[S]`` (int64, the ``N`` of each row, in
    the order of :attr:`index`). Safe to hand to DataLoader workers (each reopens the files).
    """

    def __init__(self, reader: shards.ShardReader, paths: Sequence[str]) -> None:
        self._reader = reader
        self.index = {p: k for k, p in enumerate(paths)}
        self.path = reader.entry

    @property
    def lengths(self) -> torch.Tensor:
        return self._reader.lengths

    @property
    def dim(self) -> int:
        return self._reader.dim

    def lookup(self, path: str) -> torch.Tensor:
        return self._reader.row(self.index[path])

    def length(self, path: str) -> int:
        """The ``N`` of ``path``'s row, from the stored lengths (no row is read)."""
        return int(self._reader.lengths[self.index[path]])

    def __contains__(self, path: str) -> bool:
        return path in self.index

    def __len__(self) -> int:
        return len(self.index)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` (a tensor, or a dict of them, nested) on ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class _Media(Dataset):
    """Row positions and preprocessed media, decoded in the loader's workers."""

    def __init__(self, encoder: ModalityEncoder, paths: list[str]) -> None:
        self.encoder, self.paths = encoder, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.encoder.preprocess(self.encoder.load(self.paths[i]))


class _Collate:
    def __init__(self, encoder: ModalityEncoder) -> None:
        self.encoder = encoder

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[list[int], Any]:
        return [i for i, _ in items], self.encoder.collate([x for _, x in items])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class _Progress:
    """A log line (``mmbridge.cache``) every ``every_items`` items or ``every_s`` seconds with
    done / total, items/s and the time left; a rich bar as well when stderr is a terminal."""

    def __init__(self, desc: str, total: int, every_items: int, every_s: float = 30.0) -> None:
        self.desc, self.total, self.every_items, self.every_s = (
            desc,
            total,
            max(1, every_items),
            every_s,
        )
        self.done = self._last_done = 0
        self.t0 = self._t_last = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if sys.stderr is not None and sys.stderr.isatty():
            self._bar = Progress(transient=True)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task(self.desc, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            assert self._task is not None  # __enter__ added it with the bar
            self._bar.advance(self._task, n)
        now = time.monotonic()
        if (
            self.done - self._last_done >= self.every_items
            or now - self._t_last >= self.every_s
            or self.done == self.total
        ):
            self._last_done, self._t_last = self.done, now
            rate = self.done / max(now - self.t0, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "%s: %d/%d (%.1f items/s, ETA %s)",
                self.desc,
                self.done,
                self.total,
                rate,
                time.strftime("%H:%M:%S", time.gmtime(left)) if left < 1e7 else "?",
            )


def _check_disk(entry: Path, lengths: torch.Tensor, dim: int, rows: int, modality: str) -> None:
    """Estimate the entry's size from the first batch's lengths; refuse when it does not fit."""
    need = float(lengths.float().mean()) * dim * shards.ITEMSIZE * rows
    free = shutil.disk_usage(entry).free
    log.info(
        "caching %d %s features in %s: about %s (~%.0f vectors x %d float16 per file, from the "
        "first batch); %s free",
        rows,
        modality,
        entry,
        _gb(need),
        float(lengths.float().mean()),
        dim,
        _gb(free),
    )
    if need + DISK_RESERVE > free:
        raise DataError(
            f"feature cache: {rows} {modality} features need about {_gb(need)} in {entry.parent} "
            f"(paths.feature_cache_dir), but only {_gb(free)} is free there; free some space, "
            f"point paths.feature_cache_dir to a larger disk, or set cache_features=false (the "
            f"encoder then runs every step)"
        )


def _fill(
    encoder: ModalityEncoder,
    entry: Path,
    index: dict,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast: str | None,
    log_every: int,
) -> None:
    rows, shard_rows = index["rows"], index["shard_rows"]
    todo = [
        r
        for k in range(shards.n_shards(index))
        if str(k) not in index["shards"]
        for r in shards.shard_rows_range(k, rows, shard_rows)
    ]
    if not todo:
        return
    paths = index["paths"]
    loader = DataLoader(
        _Media(encoder, [paths[r] for r in todo]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Collate(encoder),
        pin_memory=device.type == "cuda",
    )
    writer = shards.ShardWriter(entry, index)
    amp = (
        torch.autocast(device.type, dtype=getattr(torch, autocast))
        if autocast
        else contextlib.nullcontext()
    )
    desc = f"caching {encoder.modality} features"
    checked = False
    try:
        with _Progress(desc, len(todo), log_every) as progress, torch.inference_mode(), amp:
            for positions, batch in loader:
                feats, mask = encoder(to_device(batch, device))  # [B, N, D], [B, N]
                # numpy's boolean indexing: torch's is ~100x slower on float16 CPU tensors
                feats = feats.to(torch.float16).cpu().numpy()
                mask = mask.bool().cpu()
                if not checked:
                    _check_disk(entry, mask.sum(1), feats.shape[-1], len(todo), encoder.modality)
                    checked = True
                for i, f, m in zip(positions, feats, mask.numpy()):
                    writer.add(todo[i], f[m])
                progress.advance(len(positions))
    except BaseException:
        writer.abort()
        raise


def _open(entry: Path, checksums: bool | None) -> FeatureTable | None:
    """The complete, whole entry at ``entry``; ``None`` when it needs (re)building."""
    try:
        index = shards.read_index(entry)
    except shards.DamagedEntry:
        return None
    if index is None or not index["complete"] or _damage(entry, index, checksums):
        return None
    return FeatureTable(shards.ShardReader(entry, index), index["paths"])


def _damage(entry: Path, index: dict, checksums: bool | None) -> dict[int, str]:
    if checksums is None:
        checksums = sum(s["nbytes"] for s in index["shards"].values()) <= VERIFY_LIMIT
    return shards.check_shards(entry, index, checksums)


def _device_of(encoder: ModalityEncoder) -> torch.device:
    return next((p.device for p in encoder.parameters()), torch.device("cpu"))


def load_or_compute(
    encoder: ModalityEncoder,
    paths: Sequence[str],
    cache_dir: Path,
    batch_size: int = 32,
    autocast: str | None = None,
    *,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    shard_rows: int = SHARD_ROWS,
    verify: bool | None = None,
    log_every: int = 1000,
) -> tuple[FeatureTable, dict]:
    """The features of ``paths`` from the cache, computing and storing the missing part.

    Args:
        encoder: The frozen encoder; it runs in eval mode under ``torch.inference_mode``.
        paths: Media files (duplicates are stored once).
        cache_dir: Where entries live (``<modality>-<key>/``).
        batch_size: Files per encoder call.
        autocast: E.g. ``"bfloat16"``: run the encoder under autocast, as training would under
            ``bf16-mixed``; part of the key.
        device: Where the encoder runs for the fill (``None``: where it already is). It is moved
            there and back.
        num_workers: DataLoader worker processes decoding media (0: in this process).
        shard_rows: Rows per shard of a new entry (a resumed entry keeps its own).
        verify: Check every shard's SHA-256 when opening (``None``: only for entries up to
            :data:`VERIFY_LIMIT`; sizes are always checked).
        log_every: A progress line every this many files (and at least every 30 s).

    Returns:
        The table and a stats dict: ``hit`` (nothing computed), ``seconds``, ``key``, ``path``
        (the entry folder), ``rows``, ``bytes`` (on disk), ``resumed`` (shards kept from an
        interrupted fill) and ``healed`` (damaged shards or entries moved aside).

    Raises:
        DataError: The disk cannot hold the entry (estimated from the first batch).
    """
    unique = sorted(set(paths))
    key = cache_key(encoder, unique, autocast)
    entry = Path(cache_dir) / f"{encoder.modality}-{key}"
    t0 = time.perf_counter()
    stats = {
        "hit": True,
        "key": key,
        "path": str(entry),
        "rows": len(unique),
        "resumed": 0,
        "healed": 0,
    }
    table = _open(entry, verify)
    if table is None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            table = _open(entry, verify)  # another run may have filled it while we waited
            if table is None:
                stats["hit"] = False
                index = _prepare(entry, encoder, unique, key, autocast, shard_rows, verify, stats)
                _fill_on(
                    encoder, entry, index, batch_size, num_workers, device, autocast, log_every
                )
                table = FeatureTable(shards.ShardReader(entry, index), unique)
    stats["bytes"] = int(table.lengths.sum()) * table.dim * shards.ITEMSIZE
    stats["seconds"] = time.perf_counter() - t0
    return table, stats


def _prepare(
    entry: Path,
    encoder: ModalityEncoder,
    unique: list[str],
    key: str,
    autocast: str | None,
    shard_rows: int,
    verify: bool | None,
    stats: dict,
) -> dict:
    """The entry's index, with what is damaged moved aside and leftovers removed (under the
    lock)."""
    try:
        index = shards.read_index(entry)
        if index is not None and index["paths"] != unique:
            raise shards.DamagedEntry("its index lists other media files")
    except shards.DamagedEntry as exc:
        move_aside(entry, str(exc), what="feature-cache entry")
        stats["healed"] += 1
        index = None
    if index is not None:
        bad = _damage(entry, index, verify)
        if bad:
            shards.heal(entry, index, bad)
            stats["healed"] += len(bad)
        stats["resumed"] = len(index["shards"])
        if index["shards"]:
            log.info(
                "feature cache %s: %d of %d shards already written, computing the rest",
                entry.name,
                len(index["shards"]),
                shards.n_shards(index),
            )
    else:
        entry.mkdir(parents=True, exist_ok=True)
        index = shards.new_index(
            entry,
            unique,
            shard_rows,
            {
                "key": key,
                "modality": encoder.modality,
                "autocast": autocast,
                "identity": json.loads(json.dumps(encoder.cache_identity(), default=str)),
            },
        )
        if not unique:
            index.update(dim=int(encoder.out_dim), complete=True)
        shards.write_index(entry, index)
    shards.sweep(entry, index)
    return index


def _fill_on(
    encoder: ModalityEncoder,
    entry: Path,
    index: dict,
    batch_size: int,
    num_workers: int,
    device: str | torch.device | None,
    autocast: str | None,
    log_every: int,
) -> None:
    """Fill on ``device`` (moving the encoder there and back), in eval mode."""
    home = _device_of(encoder)
    target = torch.device(device) if device is not None else home
    was_training = encoder.training
    encoder.eval()
    if target != home:
        encoder.to(target)
    try:
        _fill(encoder, entry, index, batch_size, num_workers, target, autocast, log_every)
    finally:
        if target != home:
            encoder.to(home)
        encoder.train(was_training)
