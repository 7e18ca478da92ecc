"""``pope``: POPE's object-hallucination questions (yes/no), scored by accuracy, precision,
recall, F1 and yes-ratio, overall and per category (random, popular, adversarial)."""

from __future__ import annotations

import re
from pathlib import Path

from mmbridge.contracts.types import Sample
from mmbridge.errors import ConfigError, DataError, reading
from mmbridge.plugins.datasets._benchmark import (
    SHORT_ANSWER,
    BenchmarkSource,
    image_question,
    read_json,
    records,
    required,
    text_field,
)

#: The only answers POPE has (its scorer counts "yes" as the positive class).
LABELS = ("yes", "no")
_CATEGORY = re.compile(r"_pope_(\w+)$")


class POPEDataset(BenchmarkSource):
    """POPE in its official layout: JSON-lines files ``coco_pope_{random,popular,adversarial}.json``
    (``{"question_id", "image", "text", "label"}`` per line) and the COCO images they name.

    Args:
        path: One POPE file, or the folder holding them (every ``*_pope_*.json``).
        image_dir: Folder of the images (COCO val2014).
        prompt: Instruction after the question.
        split: The split name the questions get.
    """

    name = "pope"

    def __init__(
        self, path: str, image_dir: str = "???", prompt: str = SHORT_ANSWER, split: str = "test"
    ) -> None:
        self.path = required(path, "data.path", "a POPE file or the folder of coco_pope_*.json")
        self.image_dir = required(
            image_dir, "data.image_dir", "the folder of the COCO images POPE names"
        )
        self.prompt = prompt
        self.split = split
        self.files = sorted(self.path.glob("*_pope_*.json*")) if self.path.is_dir() else [self.path]
        if not self.files:
            raise ConfigError(f"data.path: no *_pope_*.json files in {self.path}")

    def inputs(self) -> list[Path]:
        return self.files

    def read(self, out_dir: Path) -> list[Sample]:
        out = []
        for f in self.files:
            m = _CATEGORY.search(f.name.split(".")[0])
            category = m.group(1) if m else f.stem
            data = read_json(
                f, "data.path", list, "JSON lines of {'question_id', 'image', 'text', 'label'}"
            )
            for i, q in records(data, f, "line", start=1):
                with reading(
                    f,
                    f"line {i + 1} (question_id {q.get('question_id')})",
                    "'question_id', 'image', 'text' and a 'label' yes or no",
                ):
                    label = text_field(q, "label").strip().lower()
                    if label not in LABELS:
                        raise DataError(
                            f"{f}: line {i + 1} (question_id {q.get('question_id')}): "
                            f"label {q['label']!r} is not one of {', '.join(LABELS)}"
                        )
                    text = text_field(q, "text")
                    question = f"{text}\n{self.prompt}" if self.prompt else text
                    qid = text_field(q, "question_id")
                    meta = {
                        "benchmark": "pope",
                        "label": label,
                        "category": category,
                        "qtype": category,
                        "question_id": q["question_id"],
                    }
                    out.append(
                        image_question(
                            f"{category}-{qid}",
                            self.image_dir / text_field(q, "image"),
                            question,
                            label,
                            meta,
                        )
                    )
        return out


COMPONENTS = {"dataset": {"pope": POPEDataset}}
