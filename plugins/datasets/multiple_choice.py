"""``multiple_choice``: ScienceQA-IMG (``problems.json``) and MMBench (its TSV with base64
images): the options in the prompt, the letter read from free answers, optionally MMBench's
CircularEval (:func:`mmbridge.evaluation.benchmarks.score_multiple_choice`)."""

from __future__ import annotations

import base64
import csv
import sys
from pathlib import Path

from mmbridge.contracts.types import Sample
from mmbridge.data.choices import choice_prompt, option_letters
from mmbridge.errors import ConfigError, DataError, reading
from mmbridge.plugins.datasets._benchmark import (
    BenchmarkSource,
    abspath,
    image_question,
    read_json,
    required,
    text_field,
)

FORMATS = ("scienceqa", "mmbench")
INSTRUCTION = "Answer with the option's letter from the given choices directly."
_PNG = b"\x89PNG"
_CIRCULAR_STRIDE = 1_000_000  # MMBench's TSVs keep the rotations of question i at i + k * 1e6


class MultipleChoiceDataset(BenchmarkSource):
    """Multiple-choice questions with images, in their official layouts.

    * ScienceQA: ``path`` = the folder with ``problems.json`` (``{pid: {"question", "choices",
      "answer": index, "hint", "image": "image.png" | null, "subject", ...}}``) and
      ``pid_splits.json`` (``{"test": [pid, ...]}``); images ``<image_dir>/<split>/<pid>/image.png``
      (``image_dir`` default: ``images`` in ``path``). Only the questions with an image (IMG).
    * MMBench: ``path`` = the TSV (``index, question, hint, A, B, C, D, answer, category, image``
      with the image in base64; decoded once into the cache).

    Args:
        path: ScienceQA's folder or MMBench's TSV.
        format: ``scienceqa`` or ``mmbench`` (default: ``mmbench`` for a ``.tsv``, else
            ``scienceqa``).
        image_dir: ScienceQA's image folder.
        source_split: ScienceQA's split to read (``pid_splits.json`` key).
        circular: MMBench's CircularEval: every question also asked with its options rotated
            (or grouped with the rotations the TSV already holds); ``mc_circular_accuracy``
            counts a question only when all its rotations are answered right.
        instruction: The line after the options.
        split: The split name the questions get.
    """

    name = "multiple_choice"

    def __init__(
        self,
        path: str,
        format: str | None = None,
        image_dir: str | None = None,
        source_split: str = "test",
        circular: bool = False,
        instruction: str = INSTRUCTION,
        split: str = "test",
    ) -> None:
        self.path = required(
            path, "data.path", "ScienceQA's folder (problems.json) or an MMBench TSV"
        )
        fmt = format or ("mmbench" if self.path.suffix.lower() == ".tsv" else "scienceqa")
        if fmt not in FORMATS:
            raise ConfigError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
        self.format = fmt
        self.image_dir = abspath(image_dir) or self.path / "images"
        self.source_split = source_split
        self.circular = bool(circular)
        self.instruction = instruction
        self.split = split

    def inputs(self) -> list[Path]:
        if self.format == "mmbench":
            return [self.path]
        return [self.path / "problems.json", self.path / "pid_splits.json"]

    def read(self, out_dir: Path) -> list[Sample]:
        rows = self._mmbench(out_dir) if self.format == "mmbench" else self._scienceqa()
        out = []
        for row in rows:
            rotations = range(len(row["options"])) if self.circular and not row["rotated"] else [0]
            for k in rotations:
                opts = row["options"][k:] + row["options"][:k]
                text, by_letter = choice_prompt(
                    row["question"], opts, row["hint"], self.instruction
                )
                letter = option_letters(len(opts))[opts.index(row["options"][row["answer"]])]
                meta = {
                    "benchmark": "multiple_choice",
                    "options": by_letter,
                    "letter": letter,
                    "qtype": row["category"],
                    "question_id": row["id"],
                }
                if self.circular:
                    meta["circular"] = row["group"]
                sid = f"{row['id']}@{k}" if len(rotations) > 1 else row["id"]
                out.append(image_question(sid, row["image"], text, letter, meta))
        return out

    def _scienceqa(self) -> list[dict]:
        for name in ("problems.json", "pid_splits.json"):
            if not (self.path / name).is_file():
                raise ConfigError(f"data.path: {self.path} has no {name} (ScienceQA's layout)")
        problems_file, splits_file = self.path / "problems.json", self.path / "pid_splits.json"
        problems = read_json(
            problems_file,
            "data.path",
            dict,
            "ScienceQA problems: {pid: {'question', 'choices', 'answer', 'image'}}",
        )
        splits = read_json(splits_file, "data.path", dict, "ScienceQA splits: {split: [pid, ...]}")
        if self.source_split not in splits:
            raise ConfigError(
                f"data.source_split: {self.source_split!r} is not in pid_splits.json; "
                f"splits: {', '.join(splits)}"
            )
        pids = splits[self.source_split]
        if not isinstance(pids, list):
            raise DataError(
                f"{splits_file}: '{self.source_split}' must be a list of pids, "
                f"got {type(pids).__name__}"
            )
        rows = []
        for pid in pids:
            with reading(splits_file, f"pid {pid!r}", "a pid that problems.json holds"):
                p = problems[str(pid)]
            with reading(
                problems_file,
                f"pid {pid}",
                "'question', 'choices' (a list of texts), "
                "'answer' (the index of the right choice), 'image'",
            ):
                if not isinstance(p, dict):
                    raise TypeError(f"expected an object, got {type(p).__name__}")
                if not p.get("image"):
                    continue  # ScienceQA-IMG: the questions with an image
                choices = p["choices"]
                if not isinstance(choices, list) or len(choices) < 2:
                    raise TypeError(
                        f"'choices' must be a list of at least 2 texts, got {choices!r:.80}"
                    )
                options = [text_field({"choice": c}, "choice") for c in choices]
                answer = p["answer"]
                if (
                    isinstance(answer, bool)
                    or not isinstance(answer, int)
                    or not 0 <= answer < len(options)
                ):
                    raise DataError(
                        f"{problems_file}: pid {pid}: 'answer' {answer!r} is not the index of one "
                        f"of its {len(options)} choices (0..{len(options) - 1})"
                    )
                hint = p.get("hint")
                rows.append(
                    {
                        "id": str(pid),
                        "question": text_field(p, "question"),
                        "options": options,
                        "answer": answer,
                        "hint": str(hint) if hint else None,
                        "category": str(p.get("subject", "all")),
                        "group": str(pid),
                        "rotated": False,
                        "image": self.image_dir
                        / self.source_split
                        / str(pid)
                        / text_field(p, "image"),
                    }
                )
        return rows

    def _mmbench(self, out_dir: Path) -> list[dict]:
        csv.field_size_limit(sys.maxsize)  # base64 images are larger than csv's default field limit
        images = out_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        expected = "index, question, A, B, ..., answer, image (base64) columns"
        with (
            reading(self.path, expected=f"a tab-separated file of {expected}"),
            self.path.open(encoding="utf-8-sig", newline="") as f,
        ):
            records = list(csv.DictReader(f, delimiter="\t"))
        rows = []
        indices = [_index(r, i, self.path) for i, r in enumerate(records)]
        rotated = any(index >= _CIRCULAR_STRIDE for index in indices)
        for i, (r, index) in enumerate(zip(records, indices, strict=True)):
            with reading(self.path, f"row {i + 2} (index {index})", expected):
                letters = [c for c in option_letters(9) if _value(r.get(c)) is not None]
                answer = _value(r.get("answer"))
                if answer not in letters:
                    raise DataError(
                        f"{self.path}: index {index}: answer {answer!r} is not one of its options "
                        f"{', '.join(letters)} "
                        "(a test TSV without answers cannot be scored offline)"
                    )
                if _value(r.get("image")) is None:
                    raise KeyError("image")
                data = base64.b64decode(r["image"], validate=True)
                if not data:
                    raise ValueError("the 'image' cell decodes to no bytes")
                image = images / f"{index}{'.png' if data.startswith(_PNG) else '.jpg'}"
                image.write_bytes(data)
                if _value(r.get("question")) is None:
                    raise KeyError("question")
                rows.append(
                    {
                        "id": str(index),
                        "question": r["question"],
                        "options": [r[c] for c in letters],
                        "answer": letters.index(answer),
                        "hint": _value(r.get("hint")),
                        "category": _value(r.get("category")) or "all",
                        "group": str(index % _CIRCULAR_STRIDE),
                        "rotated": rotated,
                        "image": image,
                    }
                )
        return rows


def _index(row: dict, i: int, path: Path) -> int:
    """A TSV row's ``index`` as an integer (pandas may have written ``12.0``)."""
    value = _value(row.get("index"))
    try:
        index = float(value) if value is not None else None
    except ValueError:
        index = None
    if index is None or not index.is_integer() or index < 0:
        raise DataError(
            f"{path}: row {i + 2}: 'index' must be a non-negative integer, got {row.get('index')!r}"
        )
    return int(index)


def _value(cell: str | None) -> str | None:
    """A TSV cell, None when empty or pandas' ``nan``."""
    if cell is None or cell.strip() in ("", "nan", "NaN"):
        return None
    return cell.strip()


COMPONENTS = {"dataset": {"multiple_choice": MultipleChoiceDataset}}
