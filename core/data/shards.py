"""Variable-length rows of float16 vectors in shards on disk, read one row at a time.

An entry is a folder::

    paths.json          the rows' media paths (written once; its SHA-256 is in the index)
    index.json          per-shard lengths, byte counts and SHA-256 (rewritten after each shard)
    shard-00000.bin     rows 0 .. R-1, unpadded: row r is lengths[r] x dim float16, row-major
    shard-00001.bin     rows R .. 2R-1
    ...

Shard ``k`` holds rows ``[k * R, (k + 1) * R)`` (``R = shard_rows``). A shard is written to
``*.partial``, fsynced and renamed into place, and only then recorded in the index (which is
itself replaced atomically): after an interruption the index lists exactly the complete shards,
and a restarted fill computes only the others. Rows are read with ``preadv`` straight into a
tensor: only the rows asked for are ever in memory, and (unlike a memory map) read pages do not
count toward the process's resident memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from mmbridge.errors import DataError
from mmbridge.utils.cache_integrity import file_sha256, move_aside
from mmbridge.utils.io import atomic_write_bytes, atomic_write_text, storage_error

INDEX = "index.json"
PATHS = "paths.json"
STORE_FORMAT = 2
DTYPE = np.float16
ITEMSIZE = 2


class DamagedEntry(DataError):
    """An entry's index is unreadable or inconsistent, or a shard was cut while in use."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.bin"


def shard_rows_range(k: int, rows: int, shard_rows: int) -> range:
    return range(k * shard_rows, min((k + 1) * shard_rows, rows))


def new_index(entry: Path, paths: Sequence[str], shard_rows: int, meta: dict) -> dict:
    """A new entry's index (no shard yet); writes the paths file it refers to."""
    blob = json.dumps(list(paths)).encode()
    atomic_write_bytes(entry / PATHS, blob)
    return {
        "format": STORE_FORMAT,
        "rows": len(paths),
        "shard_rows": shard_rows,
        "dim": None,
        "dtype": "float16",
        "complete": False,
        "paths_sha256": hashlib.sha256(blob).hexdigest(),
        "shards": {},
        **meta,
        "paths": list(paths),
    }


def n_shards(index: dict) -> int:
    return -(-index["rows"] // index["shard_rows"])


def read_index(entry: Path) -> dict | None:
    """The entry's index (with its ``paths``), ``None`` when there is none yet;
    :class:`DamagedEntry` when it or the paths file is unreadable or does not add up."""
    path = entry / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        blob = (entry / PATHS).read_bytes()
        if hashlib.sha256(blob).hexdigest() != index["paths_sha256"]:
            raise ValueError(f"{PATHS} does not match its SHA-256")
        index["paths"] = json.loads(blob)
        rows, shard_rows, shards = int(index["rows"]), int(index["shard_rows"]), index["shards"]
        if index["format"] != STORE_FORMAT or len(index["paths"]) != rows or shard_rows < 1:
            raise ValueError("header does not match its paths")
        dim = index["dim"]
        for key, info in shards.items():
            k = int(key)
            expected = len(shard_rows_range(k, rows, shard_rows))
            if expected == 0 or len(info["lengths"]) != expected:
                raise ValueError(
                    f"shard {k} lists {len(info['lengths'])} rows, {expected} expected"
                )
            if int(info["nbytes"]) != sum(info["lengths"]) * int(dim) * ITEMSIZE:
                raise ValueError(f"shard {k}: byte count does not match its lengths")
            if info["file"] != shard_name(k):
                raise ValueError(f"shard {k}: unexpected file name {info['file']!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedEntry(f"index {path.name} is unreadable: {exc}") from exc
    return index


def write_index(entry: Path, index: dict) -> None:
    atomic_write_text(
        entry / INDEX,
        json.dumps({k: v for k, v in index.items() if k != "paths"}, separators=(",", ":")),
    )


def check_shards(entry: Path, index: dict, checksums: bool) -> dict[int, str]:
    """Shards of ``index`` whose file is missing, of the wrong size or (``checksums``) whose
    SHA-256 differs: ``{shard: reason}``."""
    bad = {}
    for key, info in index["shards"].items():
        path = entry / info["file"]
        try:
            size = path.stat().st_size
        except OSError:
            bad[int(key)] = f"{info['file']} is missing"
            continue
        if size != info["nbytes"]:
            bad[int(key)] = f"{info['file']} has {size} bytes, {info['nbytes']} were written"
        elif checksums and file_sha256(path) != info["sha256"]:
            bad[int(key)] = f"{info['file']} does not match its SHA-256"
    return bad


def heal(entry: Path, index: dict, bad: dict[int, str]) -> None:
    """Move the damaged shards aside (one warning line) and drop them from the index."""
    for k in bad:
        path = entry / shard_name(k)
        if path.exists():
            move_aside(path, bad[k], what="feature-cache shard")
        index["shards"].pop(str(k), None)
    index["complete"] = False
    write_index(entry, index)


def sweep(entry: Path, index: dict) -> None:
    """Remove leftovers of an interrupted fill: partial shards and shards not in the index."""
    listed = {info["file"] for info in index["shards"].values()}
    for p in entry.glob("shard-*"):
        if p.name.endswith(".bin") and p.name in listed or ".corrupt-" in p.name:
            continue
        p.unlink(missing_ok=True)


class ShardWriter:
    """Appends rows in order (the rows of missing shards, ascending) and publishes each shard
    (file, then index) as soon as its last row is written."""

    def __init__(self, entry: Path, index: dict) -> None:
        self.entry, self.index = entry, index
        self._k: int | None = None
        self._file: BinaryIO | None = None
        self._hash: hashlib._Hash | None = None
        self._lengths: list[int] = []

    def add(self, row: int, feats: np.ndarray) -> None:
        """Append ``row``'s features ``[N, D]`` (float16)."""
        k = row // self.index["shard_rows"]
        if k != self._k:
            if self._k is not None:
                raise RuntimeError(f"row {row} arrived before shard {self._k} was complete")
            self._open(k)
        expected = shard_rows_range(k, self.index["rows"], self.index["shard_rows"])
        if row != expected.start + len(self._lengths):
            raise RuntimeError(f"row {row} out of order in shard {k}")
        if self.index["dim"] is None:
            self.index["dim"] = int(feats.shape[1])
        data = np.ascontiguousarray(feats, dtype=DTYPE).tobytes()
        assert self._file is not None and self._hash is not None  # _open(k) ran above
        try:
            self._file.write(data)
        except OSError as exc:  # a full disk: the complete shards and the index stay valid
            raise storage_error(self.entry / f"{shard_name(k)}.partial", exc, len(data)) from exc
        self._hash.update(data)
        self._lengths.append(int(feats.shape[0]))
        if len(self._lengths) == len(expected):
            self._publish()

    def _open(self, k: int) -> None:
        self._k, self._lengths, self._hash = k, [], hashlib.sha256()
        self._file = open(self.entry / f"{shard_name(k)}.partial", "wb")  # noqa: SIM115

    def _publish(self) -> None:
        k, f, h = self._k, self._file, self._hash
        assert k is not None and f is not None and h is not None  # called by write() only
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            raise storage_error(self.entry / f"{shard_name(k)}.partial", exc) from exc
        f.close()
        name = shard_name(k)
        os.replace(self.entry / f"{name}.partial", self.entry / name)
        dim = self.index["dim"]
        self.index["shards"][str(k)] = {
            "file": name,
            "lengths": self._lengths,
            "nbytes": sum(self._lengths) * dim * ITEMSIZE,
            "sha256": h.hexdigest(),
        }
        self.index["complete"] = len(self.index["shards"]) == n_shards(self.index)
        write_index(self.entry, self.index)
        self._k, self._file = None, None

    def abort(self) -> None:
        """Drop the shard being written (complete shards stay)."""
        if self._file is not None:
            assert self._k is not None  # _open sets both
            with contextlib.suppress(
                OSError
            ):  # a buffer a full disk cannot take: the file goes anyway
                self._file.close()
            (self.entry / f"{shard_name(self._k)}.partial").unlink(missing_ok=True)
            self._k, self._file = None, None


class ShardReader:
    """Rows of a complete entry, read on demand.

    Holds only the per-row lengths and offsets (``O(rows)`` integers); file descriptors are
    opened lazily in each process (a reader handed to DataLoader workers reopens its files).
    """

    def __init__(self, entry: Path, index: dict) -> None:
        self.entry = Path(entry)
        self.dim = int(index["dim"])
        self.shard_rows = int(index["shard_rows"])
        rows = int(index["rows"])
        lengths = np.zeros(rows, dtype=np.int64)
        for key, info in index["shards"].items():
            r = shard_rows_range(int(key), rows, self.shard_rows)
            lengths[r.start : r.stop] = info["lengths"]
        starts = np.zeros(rows, dtype=np.int64)  # offset of each row in its shard, in vectors
        for k in range(n_shards(index)):
            r = shard_rows_range(k, rows, self.shard_rows)
            seg = lengths[r.start : r.stop]
            starts[r.start : r.stop] = np.cumsum(seg) - seg
        self.lengths = torch.from_numpy(lengths)  # [S]
        self._starts = starts
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            fd = self._fds[k] = os.open(self.entry / shard_name(k), os.O_RDONLY)
        return fd

    def row(self, r: int) -> torch.Tensor:
        """Row ``r``: ``[N_r, D]`` float16."""
        n = int(self.lengths[r])
        out = torch.empty(n, self.dim, dtype=torch.float16)
        if n == 0:
            return out
        k = r // self.shard_rows
        want = n * self.dim * ITEMSIZE
        # numpy's stubs do not declare ndarray a Buffer, though it has the buffer protocol
        got = os.preadv(
            self._fd(k),
            [out.numpy().view(np.uint8).reshape(-1)],  # type: ignore[list-item]
            int(self._starts[r]) * self.dim * ITEMSIZE,
        )
        if got != want:
            raise DamagedEntry(
                f"{self.entry / shard_name(k)}: read {got} of {want} bytes of row {r} "
                f"(the file was cut after the cache was opened); the next run rebuilds it"
            )
        return out


__all__ = [
    "DamagedEntry",
    "ShardReader",
    "ShardWriter",
    "check_shards",
    "heal",
    "move_aside",
    "new_index",
    "read_index",
    "sweep",
    "write_index",
]
