"""Shared part of the benchmark data sources: official files in, one LLaVA JSONL per split out
(with the scorer's ``meta``, :mod:`mmbridge.evaluation.benchmarks`), written once per content."""

from __future__ import annotations

import hashlib
import json
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

from mmbridge.data.llava import write_llava
from mmbridge.dataset import DatasetFiles, DatasetSource
from mmbridge.errors import ConfigError, DataError
from mmbridge.types import Sample, placeholder

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


def read_json(path: Path, key: str) -> Any:
    """A JSON file, or a JSON-lines file when it is not one JSON document (POPE's ``.json``)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{key}: {path} is neither JSON nor JSON lines ({exc})") from exc


def image_question(sid: str, image: Path, question: str, answer: str, meta: dict[str, Any]) -> Sample:
    """A one-turn sample: the image placeholder, the question, the reference answer."""
    if not image.is_file():
        raise DataError(f"question {sid}: image file not found: {image}")
    return Sample(id=sid, media={"image": str(image)},
                  conversations=[{"from": "human", "value": f"{placeholder('image')}\n{question}"},
                                 {"from": "gpt", "value": answer}], meta=meta)


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
        key = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]
        out = Path(cache_dir) / f"{self.name}-{key}"
        target = out / f"{self.split}.jsonl"
        if not target.is_file():
            samples = self.read(out)
            if not samples:
                raise DataError(f"data ({self.name}): no questions read from {', '.join(map(str, self.inputs()))}")
            write_llava(samples, target)
        return DatasetFiles(splits={self.split: target}, media_root=out)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
