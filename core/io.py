"""Atomic file writing, the one helper every writer of mmbridge uses.

A file is written to a temporary file in its own directory and renamed into place, so a reader
never sees half a file and a crash leaves the previous version. The result has the permissions
a plain ``open(path, "w")`` would give (``0o666`` less the umask): ``mkstemp``'s ``0o600`` would
make caches and reports unreadable to a teammate sharing them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename), creating parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON (non-JSON numbers such as numpy floats as floats)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=float) + "\n")
