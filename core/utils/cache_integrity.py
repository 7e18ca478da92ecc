"""Cache entries that heal: completion manifests, checksums, and moving a damaged entry aside.

A cache entry (a generated data set, a converted model asset, a feature-cache shard) is only
trusted when it proves it is whole: a folder carries a manifest of its files and their sizes,
written last, with a checksum of the manifest itself; a shard carries its SHA-256 in its index.
A damaged entry is never deleted: it is renamed to ``<name>.corrupt-<time>`` next to itself (so
it can be inspected, and nothing is lost if the check was wrong) with one warning line on the
``mmbridge.cache`` logger, and the caller rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("mmbridge.cache")

#: The manifest written last into a published folder: its files, their sizes, a checksum.
MANIFEST = ".complete.json"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def move_aside(path: str | Path, reason: str, what: str = "cache entry") -> Path:
    """Rename a damaged ``path`` to ``path.corrupt-<time>`` and log one warning line.

    Returns the new location.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    k = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.corrupt-{stamp}-{k}")
        k += 1
    os.replace(path, dest)
    log.warning("%s %s is damaged (%s): moved to %s and rebuilt", what, path, reason, dest.name)
    return dest


def _listing(directory: Path) -> list[list]:
    files = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files.append([p.relative_to(directory).as_posix(), p.stat().st_size])
    return files


def _digest(files: list[list]) -> str:
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Record the files of a finished ``directory`` and their sizes (call it last)."""
    directory = Path(directory)
    files = _listing(directory)
    (directory / MANIFEST).write_text(json.dumps({"files": files, "sha256": _digest(files)}) + "\n")


def manifest_problem(directory: str | Path) -> str | None:
    """What is wrong with a published ``directory``, or ``None`` when it is whole.

    Checks that the manifest is readable and unaltered (its checksum) and that every file it
    lists exists with its recorded size: a truncated, missing or half-copied file is found
    without reading file contents (a few thousand ``stat`` calls).
    """
    directory = Path(directory)
    marker = directory / MANIFEST
    if not marker.is_file():
        return f"no completion manifest {MANIFEST} (unfinished, or written by an older version)"
    try:
        data = json.loads(marker.read_text())
        files = data["files"]
        ok = data["sha256"] == _digest(files)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest {MANIFEST}: {exc}"
    if not ok:
        return f"manifest {MANIFEST} does not match its checksum"
    for rel, size in files:
        p = directory / rel
        try:
            actual = p.stat().st_size
        except OSError:
            return f"file {rel} is missing"
        if actual != size:
            return f"file {rel} has {actual} bytes, {size} were written"
    return None
