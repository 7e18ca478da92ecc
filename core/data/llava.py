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
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from mmbridge.contracts.types import ROLES, Sample, check_placeholders
from mmbridge.errors import ConfigError, DataError, reading

log = logging.getLogger(__name__)

#: Top-level keys that name a media file; each becomes a key of :attr:`Sample.media`.
MEDIA_KEYS: tuple[str, ...] = ("image", "audio", "video")
_RESERVED = {"id", "conversations", "meta", *MEDIA_KEYS}
#: What ``data.on_error`` may be: stop at the first bad record, or drop bad records and go on.
ON_ERROR = ("raise", "skip")
_CHUNK = 1 << 20


def _where(path: Path, index: int, rid: Any = None, line: int | None = None) -> str:
    """``"file: record 3 (id 'x', line 4)"`` -- how every message names a record."""
    details = ([f"id {rid!r}"] if rid is not None else []) + ([f"line {line}"] if line else [])
    return f"{path}: record {index}" + (f" ({', '.join(details)})" if details else "")


class _RecordError(DataError):
    """A problem of one record (``skip`` mode drops the record); other DataErrors stop the read."""


def _json_list(f: IO[str], path: Path, buf: str, pos: int) -> Iterator[tuple[Any, int]]:
    """Stream the records of a JSON list, one ``raw_decode`` at a time: the file is read in
    chunks and never held whole. ``buf[pos]`` is the opening ``[``. Yields ``(record, line)``."""
    dec = json.JSONDecoder()
    line, counted = 1, 0  # newlines are counted once, up to ``counted``
    eof = False

    def more() -> bool:
        nonlocal buf, pos, counted, line, eof
        if eof:
            return False
        line += buf.count("\n", counted, pos)
        chunk = f.read(_CHUNK)
        buf, pos, counted, eof = buf[pos:] + chunk, 0, 0, not chunk
        return bool(chunk)

    def skip_ws() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos] if pos < len(buf) else ""

    def error(msg: str) -> DataError:
        at = line + buf.count("\n", counted, pos)
        return DataError(f"{path}: invalid JSON at line {at}: {msg}")

    pos += 1
    first = True
    while True:
        c = skip_ws()
        if c == "]":
            pos += 1
            if skip_ws():
                raise error("extra data after the closing ']'")
            return
        if not first:
            if c != ",":
                raise error(
                    f"expected ',' or ']' between records, got {c!r}"
                    if c
                    else "the list is not closed"
                )
            pos += 1
            skip_ws()
        first = False
        while True:
            try:
                record, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                offset = exc.pos - pos  # more() moves the buffer
                if more():
                    continue
                at = line + buf.count("\n", counted, pos + offset)
                raise DataError(f"{path}: invalid JSON at line {at}: {exc.msg}") from None
            if end == len(buf) and more():  # a number cut by the chunk end: read on
                continue
            break
        line += buf.count("\n", counted, pos)
        counted = pos
        yield record, line
        pos = end


def _records(path: Path) -> Iterator[tuple[Any, int | None]]:
    """``(record, line)`` for each record of a JSON list or JSONL file, streamed (a UTF-8 BOM
    is accepted). A ``.json`` file holding one object gets a message saying a list is expected."""
    try:
        f = path.open(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file: {exc}") from None
    try:
        with f:
            buf = f.read(_CHUNK)
            stripped = buf.lstrip()
            jsonl = path.suffix.lower() == ".jsonl"
            if not jsonl and stripped.startswith("["):
                yield from _json_list(f, path, buf, len(buf) - len(stripped))
                return
            if not jsonl and stripped.startswith("{"):
                _refuse_object(path, buf + f.read())
                f.seek(0)
                buf = ""
            lines = _lines(f, buf)
            for lineno, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    hint = "" if jsonl else " (read as JSONL: the file does not start with '[')"
                    yield (
                        _RecordError(
                            f"{path}: invalid JSON at line {lineno}, column {exc.colno}: "
                            f"{exc.msg}{hint}"
                        ),
                        lineno,
                    )
                    continue
                yield record, lineno
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: cannot read data file: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


def _lines(f: IO[str], head: str) -> Iterator[str]:
    """The file's lines, ``head`` (already read) first."""
    if head:
        rest = f.readline()
        yield from (head + rest).splitlines()
    yield from (line.rstrip("\r\n") for line in f)


def _refuse_object(path: Path, text: str) -> None:
    """A ``.json`` file that is one JSON object (``{"data": [...]}``): say a list is expected.
    JSONL content in a ``.json`` file (one object per line) passes."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(data, dict):
        keys = ", ".join(map(str, list(data)[:8])) or "none"
        hint = (
            " (one record? wrap it in [ ])"
            if "conversations" in data
            else "; point data.train/val/test at a file whose top level is the list of records"
        )
        raise DataError(
            f"{path}: expected a JSON list of records, got an object with keys {keys}{hint}"
        )


def _check_turns(sample: Sample, where: str) -> None:
    for t, turn in enumerate(sample.conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(
                f"{where}: turn {t} must be an object with 'from' and 'value', got {turn!r}"
            )
        role, value = turn["from"], turn["value"]
        if role not in ROLES:
            raise DataError(
                f"{where}: turn {t} has unknown role {role!r}; valid: {', '.join(ROLES)}"
            )
        if not isinstance(value, str):
            raise DataError(f"{where}: turn {t} value must be a string, got {type(value).__name__}")
        if ROLES[role] == "assistant" and not value.strip():
            raise DataError(
                f"{where}: turn {t} is an empty {role} turn (nothing to learn or score)"
            )


def validate_conversations(sample: Sample, where: str) -> None:
    """Check roles, empty answers and the placeholder rule
    (:func:`~mmbridge.contracts.types.check_placeholders`); ``where`` prefixes every message."""
    _check_turns(sample, where)
    check_placeholders(
        ((t["from"], t["value"]) for t in sample.conversations),
        sample.media_counts(),
        MEDIA_KEYS,
        where,
    )


def _media_paths(value: Any, key: str, where: str) -> list[str]:
    """A record's ``image`` (``audio``) value: one path, or a non-empty list of paths."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise DataError(
            f"{where}: '{key}' is an empty list; give one file path or a list of paths "
            f"(one per <{key}> placeholder), or drop the key for a text-only record"
        )
    for k, v in enumerate(values):
        if not isinstance(v, str) or not v:
            at = f" (item {k})" if isinstance(value, list) else ""
            raise DataError(f"{where}: '{key}'{at} must be a non-empty file path, got {v!r}")
    return values


def _parse(record: Any, index: int, line: int | None, path: Path, root: Path) -> Sample:
    if not isinstance(record, dict):
        raise DataError(
            f"{_where(path, index, line=line)}: expected an object, got {type(record).__name__}"
        )
    rid = record.get("id", index)
    where = _where(path, index, rid, line)
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise DataError(f"{where}: 'id' must be a string or an integer")
    media: dict[str, str | list[str]] = {}
    for key in MEDIA_KEYS:
        if key not in record:
            continue
        full = []
        for value in _media_paths(record[key], key, where):
            path_k = os.path.normpath(value if os.path.isabs(value) else os.path.join(root, value))
            if not os.path.isfile(path_k):
                raise DataError(f"{where}: {key} file not found: {path_k} (media_root: {root})")
            full.append(path_k)
        media[key] = full[0] if len(full) == 1 else full  # one file stays a plain path
    conversations = record.get("conversations")
    if conversations is None:
        raise DataError(f"{where}: missing 'conversations'")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"{where}: 'meta' must be an object, got {type(meta).__name__}")
    extra = {k: v for k, v in record.items() if k not in _RESERVED}
    sample = Sample(
        id=str(rid),
        media=media,
        conversations=[dict(t) if isinstance(t, dict) else t for t in conversations],
        meta={**extra, **meta},
    )
    validate_conversations(sample, where)
    return sample


@dataclass(frozen=True)
class DroppedRecord:
    """One record that ``on_error="skip"`` dropped: where it is and why."""

    file: str
    index: int  # position of the record in the file (0-based)
    line: int | None  # line of the record (JSONL: its line; JSON list: where it starts)
    id: str | None  # the record's id (None when it has none or is not an object)
    reason: str  # the error, without the file / record prefix
    message: str  # the full error message, as ``on_error="raise"`` would raise it

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "index": self.index,
            "line": self.line,
            "id": self.id,
            "reason": self.reason,
        }


@dataclass
class ReadReport:
    """What :func:`read_llava` kept and dropped (``on_error="skip"``) from one file."""

    path: Path
    kept: int = 0
    dropped: list[DroppedRecord] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``train.json: kept 998 records, dropped 2 (first: ...)``."""
        first = f" (first: {self.dropped[0].message})" if self.dropped else ""
        return f"{self.path}: kept {self.kept} records, dropped {len(self.dropped)}{first}"


def _dropped(
    exc: DataError, path: Path, index: int, line: int | None, record: Any
) -> DroppedRecord:
    message = str(exc)
    rid = record.get("id") if isinstance(record, dict) else None
    rid = (
        None if rid is None or isinstance(rid, bool) or not isinstance(rid, str | int) else str(rid)
    )
    # the prefixes that _parse, read_llava and _records put on their messages
    prefixes = [_where(path, index, rid, line), _where(path, index, line=line), str(path)]
    if isinstance(record, dict):  # _parse names a record without id by its index
        prefixes.insert(1, _where(path, index, record.get("id", index), line))
    prefix = next((p for p in prefixes if message.startswith(f"{p}: ")), None)
    reason = message[len(prefix) + 2 :] if prefix is not None else message
    return DroppedRecord(str(path), index, line, rid, reason, message)


def read_llava(
    path: str | Path,
    media_root: str | Path | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    report: ReadReport | None = None,
) -> list[Sample]:
    """Read and validate a LLaVA JSON (a list) or JSONL file, streaming it once.

    Records may mix media and text-only samples; an ``image`` (``audio``) value is one path
    or a list of paths with as many ``<image>`` placeholders (the k-th path fills the k-th
    placeholder; a one-element list reads as one path). Ids must be unique.

    Args:
        path: The data file; ``.jsonl`` (or content not starting with ``[``) is read as JSONL.
            A UTF-8 byte-order mark is accepted.
        media_root: Folder that relative media paths start from (default: the file's folder).
        on_error: ``"raise"``: the first invalid record is an error. ``"skip"``: invalid
            records (and JSONL lines that are not JSON) are dropped, each with where it is
            and why in ``report.dropped``; an unreadable file or a broken JSON list still raises.
        report: Filled with the counts and the dropped records' messages when given.

    Returns:
        The valid samples, with absolute media paths, in file order.

    Raises:
        DataError: naming the file and the record (index, id, line for JSONL).
        ConfigError: for an unknown ``on_error``.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}")
    path = Path(path)
    root = Path(os.path.abspath(media_root if media_root is not None else path.parent))
    report = report if report is not None else ReadReport(path)
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for index, (record, line) in enumerate(_records(path)):
        try:
            if isinstance(record, _RecordError):
                raise record
            with reading(path, f"record {index}" + (f" (line {line})" if line else "")):
                sample = _parse(record, index, line, path, root)
            where = _where(path, index, sample.id, line)
            if sample.id in seen:
                raise DataError(
                    f"{where}: duplicate id {sample.id!r}, also used by {seen[sample.id]}"
                )
        except DataError as exc:
            if on_error == "raise":
                raise
            report.dropped.append(_dropped(exc, path, index, line, record))
            continue
        seen[sample.id] = where
        samples.append(sample)
    report.kept = len(samples)
    if not samples:  # a stage on this split then fails without knowing the file
        log.warning("%s: no %srecord in the file", path, "valid " if report.dropped else "")
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
            value = sample.media[key]
            record[key] = (
                _relative(value, root)
                if isinstance(value, str)
                else [_relative(v, root) for v in value]
            )
    record["conversations"] = [dict(t) for t in sample.conversations]
    if sample.meta:
        record["meta"] = sample.meta
    return record


def write_llava(
    samples: Iterable[Sample], path: str | Path, media_root: str | Path | None = None
) -> Path:
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
