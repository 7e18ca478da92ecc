"""``multiple_choice``: ScienceQA-IMG (``problems.json``) and MMBench (its TSV with base64
images): the options in the prompt, the letter read from free answers, optionally MMBench's
CircularEval (:func:`mmbridge.evaluation.benchmarks.score_multiple_choice`)."""

from __future__ import annotations

import base64
import csv
import sys
from pathlib import Path

from mmbridge.errors import ConfigError, DataError
from mmbridge.evaluation.benchmarks import choice_prompt, option_letters
from mmbridge.plugins.datasets._benchmark import (
    BenchmarkSource,
    abspath,
    image_question,
    read_json,
    required,
)
from mmbridge.types import Sample

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
        format: ``scienceqa`` or ``mmbench`` (default: ``mmbench`` for a ``.tsv``, else ``scienceqa``).
        image_dir: ScienceQA's image folder.
        source_split: ScienceQA's split to read (``pid_splits.json`` key).
        circular: MMBench's CircularEval: every question also asked with its options rotated
            (or grouped with the rotations the TSV already holds); ``mc_circular_accuracy``
            counts a question only when all its rotations are answered right.
        instruction: The line after the options.
        split: The split name the questions get.
    """

    name = "multiple_choice"

    def __init__(self, path: str, format: str | None = None, image_dir: str | None = None,
                 source_split: str = "test", circular: bool = False, instruction: str = INSTRUCTION,
                 split: str = "test") -> None:
        self.path = required(path, "data.path", "ScienceQA's folder (problems.json) or an MMBench TSV")
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
                text, by_letter = choice_prompt(row["question"], opts, row["hint"], self.instruction)
                letter = option_letters(len(opts))[opts.index(row["options"][row["answer"]])]
                meta = {"benchmark": "multiple_choice", "options": by_letter, "letter": letter,
                        "qtype": row["category"], "question_id": row["id"]}
                if self.circular:
                    meta["circular"] = row["group"]
                sid = f"{row['id']}@{k}" if len(rotations) > 1 else row["id"]
                out.append(image_question(sid, row["image"], text, letter, meta))
        return out

    def _scienceqa(self) -> list[dict]:
        for name in ("problems.json", "pid_splits.json"):
            if not (self.path / name).is_file():
                raise ConfigError(f"data.path: {self.path} has no {name} (ScienceQA's layout)")
        problems = read_json(self.path / "problems.json", "data.path")
        splits = read_json(self.path / "pid_splits.json", "data.path")
        if self.source_split not in splits:
            raise ConfigError(f"data.source_split: {self.source_split!r} is not in pid_splits.json; "
                              f"splits: {', '.join(splits)}")
        rows = []
        for pid in splits[self.source_split]:
            p = problems[str(pid)]
            if not p.get("image"):
                continue  # ScienceQA-IMG: the questions with an image
            rows.append({"id": str(pid), "question": p["question"], "options": list(p["choices"]),
                         "answer": int(p["answer"]), "hint": p.get("hint") or None,
                         "category": p.get("subject", "all"), "group": str(pid), "rotated": False,
                         "image": self.image_dir / self.source_split / str(pid) / p["image"]})
        return rows

    def _mmbench(self, out_dir: Path) -> list[dict]:
        csv.field_size_limit(sys.maxsize)  # base64 images are larger than csv's default field limit
        images = out_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        with self.path.open(encoding="utf-8-sig", newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t"))
        rows = []
        rotated = any(int(float(r["index"])) >= _CIRCULAR_STRIDE for r in records)
        for r in records:
            index = int(float(r["index"]))
            letters = [c for c in option_letters(9) if _value(r.get(c)) is not None]
            answer = _value(r.get("answer"))
            if answer not in letters:
                raise DataError(f"{self.path}: index {index}: answer {answer!r} is not one of its options "
                                f"{', '.join(letters)} (a test TSV without answers cannot be scored offline)")
            data = base64.b64decode(r["image"])
            image = images / f"{index}{'.png' if data.startswith(_PNG) else '.jpg'}"
            image.write_bytes(data)
            rows.append({"id": str(index), "question": r["question"], "options": [r[c] for c in letters],
                         "answer": letters.index(answer), "hint": _value(r.get("hint")),
                         "category": _value(r.get("category")) or "all",
                         "group": str(index % _CIRCULAR_STRIDE), "rotated": rotated, "image": image})
        return rows


def _value(cell: str | None) -> str | None:
    """A TSV cell, None when empty or pandas' ``nan``."""
    if cell is None or cell.strip() in ("", "nan", "NaN"):
        return None
    return cell.strip()


COMPONENTS = {"dataset": {"multiple_choice": MultipleChoiceDataset}}
