"""Shared part of the benchmark data sources: official files in, one LLaVA JSONL per split out
(with the scorer's ``meta``, :mod:`mmbridge.evaluation.benchmarks`), written once per content."""

from __future__ import annotations

import hashlib
import json
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

from mmbridge.contracts.dataset import DatasetFiles, DatasetSource
from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.llava import write_llava
from mmbridge.errors import ConfigError, DataError, reading

#: LLaVA-1.5's short-answer instruction (VQAv2, GQA, TextVQA, POPE).
SHORT_ANSWER = "Answer the question using a single word or phrase."


def abspath(value: str | os.PathLike | None) -> Path | None:
    """``value`` expanded and absolute (None stays None)."""
    return None if value is None else Path(os.path.abspath(os.path.expanduser(str(value))))


def required(value: Any, key: str, what: str) -> Path:
    """The path of config key ``key``; refused when unset (``???``, empty) or missing on disk."""
    if not isinstance(value, str | os.PathLike) or str(value) in ("", "???"):
        raise ConfigError(f"{key}: set the path of {what}, got {value!r}")
    path = abspath(value)
    assert path is not None
    if not path.exists():
        raise ConfigError(f"{key}: not found: {path} ({what})")
    return path


def read_json(path: Path, key: str, shape: type | None = None, expected: str = "") -> Any:
    """A JSON file, or a JSON-lines file when it is not one JSON document (POPE's ``.json``).

    Args:
        path: The file.
        key: The config key that named it (for the message).
        shape: ``dict`` or ``list``: the top-level type the format has; anything else is refused.
        expected: The format's layout in words, for the messages.

    Raises:
        DataError: naming the file for an unreadable file, text that is not UTF-8 JSON (lines),
            or a top level of another shape.
    """
    with reading(path, expected=expected or "a JSON file"):
        text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError(f"{key}: {path}: JSON nested too deeply") from None
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataError(f"{key}: {path} is neither JSON nor JSON lines ({exc})") from exc
    if shape is not None and not isinstance(data, shape):
        what = {dict: "a JSON object", list: "a JSON list (or JSON lines)"}.get(
            shape, shape.__name__
        )
        raise DataError(
            f"{key}: {path}: expected {what} at the top level"
            f"{f' ({expected})' if expected else ''}, got {type(data).__name__}"
        )
    return data


def records(data: Any, path: Path, what: str = "record", start: int = 0) -> list[tuple[int, dict]]:
    """The object records of a list, refusing any record that is not a JSON object (named
    ``what`` and its position counted from ``start``)."""
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise DataError(
                f"{path}: {what} {i + start}: expected a JSON object, got {type(r).__name__}"
            )
        out.append((i, r))
    return out


def text_field(record: dict, key: str) -> str:
    """``record[key]`` as text: a string or a number, never a container or null."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"'{key}' must be a string, got {type(value).__name__}")
    return str(value)


def image_question(
    sid: str, image: Path, question: str, answer: str, meta: dict[str, Any]
) -> Sample:
    """A one-turn sample: the image placeholder, the question, the reference answer."""
    if not image.is_file():
        raise DataError(f"question {sid}: image file not found: {image}")
    return Sample(
        id=sid,
        media={"image": str(image)},
        conversations=[
            {"from": "human", "value": f"{placeholder('image')}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        meta=meta,
    )


class BenchmarkSource(DatasetSource):
    """A benchmark read from its official files: :meth:`read` turns them into samples; the
    LLaVA file is written to ``cache_dir/<name>-<digest>/`` once per content and options."""

    name = "benchmark"
    split = "test"

    @abstractmethod
    def inputs(self) -> list[Path]:
        """The official files the samples are read from (their content keys the cache)."""

    @abstractmethod
    def read(self, out_dir: Path) -> list[Sample]:
        """The samples, in file order (``out_dir``: where decoded media may be written)."""

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["files"] = {str(p): _digest(p) for p in self.inputs()}
        return ident

    def prepare(self, cache_dir: Path) -> DatasetFiles:
        key = hashlib.sha256(
            json.dumps(self.identity(), sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        out = Path(cache_dir) / f"{self.name}-{key}"
        target = out / f"{self.split}.jsonl"
        if not target.is_file():
            try:
                with reading(self.inputs(), expected=f"the official {self.name} layout"):
                    samples = self.read(out)
            except DataError as exc:  # name the source file where the message names only a record
                files = [str(p) for p in self.inputs()]
                if any(f in str(exc) for f in files):
                    raise
                raise DataError(f"{', '.join(files)}: {exc}") from exc
            if not samples:
                raise DataError(
                    f"data ({self.name}): no questions read from "
                    f"{', '.join(map(str, self.inputs()))}"
                )
            write_llava(samples, target)
        return DatasetFiles(splits={self.split: target}, media_root=out)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
