"""Atomic file writing, the one helper every writer of mmbridge uses.

A file is written to a temporary file in its own directory and renamed into place, so a reader
never sees half a file and a crash leaves the previous version. The result has the permissions
a plain ``open(path, "w")`` would give (``0o666`` less the umask): ``mkstemp``'s ``0o600`` would
make caches and reports unreadable to a teammate sharing them.

A write that fails for lack of space (``ENOSPC``, ``EDQUOT``) or permission leaves the previous
file and raises :class:`~mmbridge.errors.StorageError` naming the path, the bytes it needed and
the bytes free; :func:`check_free_space` says the same before a write of known size starts.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmbridge.errors import StorageError

#: Headroom kept free beyond a write's own size (logs, the index files written after it).
MARGIN = 64 << 10
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def free_bytes(path: str | Path) -> int:
    """Bytes free to an unprivileged writer on the file system of ``path`` (or of its nearest
    existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 1 << 20 else f"{n:,} bytes ({n / (1 << 20):.1f} MiB)"


def check_free_space(path: str | Path, needed: int, what: str = "the output") -> None:
    """Refuse a write of ``needed`` bytes to ``path`` when its file system has less free space
    (plus :data:`MARGIN`).

    Raises:
        StorageError: naming the path, the bytes needed and the bytes free.
    """
    free = free_bytes(path)
    if needed + MARGIN > free:
        raise StorageError(
            f"{path}: not enough free space for {what}: needs {_size(needed)} "
            f"(plus {MARGIN >> 10} KiB headroom), {_size(free)} free"
        )


def storage_error(path: str | Path, exc: OSError, needed: int | None = None) -> StorageError:
    """``exc`` (a failed write to ``path``) as one :class:`StorageError` line."""
    if exc.errno in _FULL:
        need = f" needed {_size(needed)}," if needed is not None else ""
        return StorageError(
            f"{path}: disk full ({exc.strerror}):{need} {_size(free_bytes(path))} free; "
            f"the previous file, if any, is unchanged"
        )
    return StorageError(f"{path}: cannot write ({exc.strerror or exc})")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename), creating parents.

    Raises:
        StorageError: when the disk is full or the location not writable; ``path`` keeps its
            previous content and no temporary file is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise storage_error(path, exc, len(data)) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(path, exc, len(data)) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON (non-JSON numbers such as numpy floats as floats)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=float) + "\n")
