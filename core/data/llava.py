"""Reading and writing LLaVA-format data files (JSON list or JSONL), with validation.

A record looks like LLaVA's instruction data (Liu et al., 2304.08485)::

    {"id": "0001", "image": "images/0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}],
     "meta": {"caption": "A red circle in the centre."}}

Media paths are relative to a media root (or absolute). Any other top-level key is kept in
:attr:`Sample.meta`. Every problem is a :class:`~mmbridge.errors.DataError` naming the file and
the record (index and id; the line for JSONL).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmbridge.errors import DataError
from mmbridge.types import ROLES, Sample, placeholder

#: Top-level keys that name a media file; each becomes a key of :attr:`Sample.media`.
MEDIA_KEYS: tuple[str, ...] = ("image", "audio", "video")
_RESERVED = {"id", "conversations", "meta", *MEDIA_KEYS}


def _where(path: Path, index: int, rid: Any = None, line: int | None = None) -> str:
    """``"file: record 3 (id 'x', line 4)"`` -- how every message names a record."""
    details = ([f"id {rid!r}"] if rid is not None else []) + ([f"line {line}"] if line else [])
    return f"{path}: record {index}" + (f" ({', '.join(details)})" if details else "")


def _load_records(path: Path) -> list[tuple[Any, int | None]]:
    """``(record, line or None)`` for each record of a JSON list or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read data file: {exc}") from None
    stripped = text.lstrip()
    if path.suffix.lower() != ".jsonl" and (stripped.startswith("[") or not stripped):
        try:
            data = json.loads(text) if stripped else []
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return [(r, None) for r in data]
    records = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append((json.loads(raw), lineno))
        except json.JSONDecodeError as exc:
            hint = "" if path.suffix.lower() == ".jsonl" else " (read as JSONL: the file does not start with '[')"
            raise DataError(f"{path}: invalid JSON at line {lineno}, column {exc.colno}: {exc.msg}{hint}") from None
    return records


def validate_conversations(sample: Sample, where: str) -> None:
    """Check roles, empty answers and that each media item has exactly one placeholder.

    Placeholders may only appear in human (user) turns; ``where`` prefixes every message.
    """
    counts = dict.fromkeys(MEDIA_KEYS, 0)
    for t, turn in enumerate(sample.conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {t} must be an object with 'from' and 'value', got {turn!r}")
        role, value = turn["from"], turn["value"]
        if role not in ROLES:
            raise DataError(f"{where}: turn {t} has unknown role {role!r}; valid: {', '.join(ROLES)}")
        if not isinstance(value, str):
            raise DataError(f"{where}: turn {t} value must be a string, got {type(value).__name__}")
        if ROLES[role] == "assistant" and not value.strip():
            raise DataError(f"{where}: turn {t} is an empty {role} turn (nothing to learn or score)")
        for key in MEDIA_KEYS:
            n = value.count(placeholder(key))
            if n and ROLES[role] != "user":
                raise DataError(f"{where}: turn {t} ({role}) contains {placeholder(key)}; "
                                f"placeholders belong in human turns")
            counts[key] += n
    for key in MEDIA_KEYS:
        expected = 1 if key in sample.media else 0
        if counts[key] != expected:
            raise DataError(f"{where}: {counts[key]} {placeholder(key)} placeholder(s) for "
                            f"{expected} {key} file(s); each {key} needs exactly one")


def _parse(record: Any, index: int, line: int | None, path: Path, root: Path) -> Sample:
    if not isinstance(record, dict):
        raise DataError(f"{_where(path, index, line=line)}: expected an object, got {type(record).__name__}")
    rid = record.get("id", index)
    where = _where(path, index, rid, line)
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise DataError(f"{where}: 'id' must be a string or an integer")
    media: dict[str, str] = {}
    for key in MEDIA_KEYS:
        if key not in record:
            continue
        value = record[key]
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: '{key}' must be one non-empty file path, got {value!r}")
        full = os.path.normpath(value if os.path.isabs(value) else os.path.join(root, value))
        if not os.path.isfile(full):
            raise DataError(f"{where}: {key} file not found: {full} (media_root: {root})")
        media[key] = full
    conversations = record.get("conversations")
    if conversations is None:
        raise DataError(f"{where}: missing 'conversations'")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"{where}: 'meta' must be an object, got {type(meta).__name__}")
    extra = {k: v for k, v in record.items() if k not in _RESERVED}
    sample = Sample(id=str(rid), media=media, conversations=[dict(t) if isinstance(t, dict) else t
                                                             for t in conversations],
                    meta={**extra, **meta})
    validate_conversations(sample, where)
    return sample


def read_llava(path: str | Path, media_root: str | Path | None = None) -> list[Sample]:
    """Read and validate a LLaVA JSON (a list) or JSONL file.

    Args:
        path: The data file; ``.jsonl`` (or content not starting with ``[``) is read as JSONL.
        media_root: Folder that relative media paths start from (default: the file's folder).

    Returns:
        The samples, with absolute media paths.

    Raises:
        DataError: naming the file and the record, for the first invalid record.
    """
    path = Path(path)
    root = Path(os.path.abspath(media_root if media_root is not None else path.parent))
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for index, (record, line) in enumerate(_load_records(path)):
        sample = _parse(record, index, line, path, root)
        if sample.id in seen:
            raise DataError(f"{_where(path, index, sample.id, line)}: duplicate id (also record {seen[sample.id]})")
        seen[sample.id] = index
        samples.append(sample)
    return samples


def _relative(media: str, root: Path | None) -> str:
    if root is None:
        return media
    full = Path(os.path.abspath(media))
    try:
        return full.relative_to(root).as_posix()
    except ValueError:  # outside the root: an absolute path still reads back correctly
        return str(full)


def to_record(sample: Sample, media_root: str | Path | None = None) -> dict[str, Any]:
    """The JSON record of ``sample`` (media relative to ``media_root`` when it is given)."""
    root = Path(os.path.abspath(media_root)) if media_root is not None else None
    record: dict[str, Any] = {"id": sample.id}
    for key in MEDIA_KEYS:
        if key in sample.media:
            record[key] = _relative(sample.media[key], root)
    record["conversations"] = [dict(t) for t in sample.conversations]
    if sample.meta:
        record["meta"] = sample.meta
    return record


def write_llava(samples: Iterable[Sample], path: str | Path,
                media_root: str | Path | None = None) -> Path:
    """Write samples as a LLaVA JSON list (JSONL if ``path`` ends in ``.jsonl``), atomically.

    The file is written next to its destination and moved into place with ``os.replace``, so a
    reader never sees half a file. Output is deterministic (same samples -> same bytes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [to_record(s, media_root) for s in samples]
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
