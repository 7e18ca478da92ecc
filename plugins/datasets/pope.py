"""``pope``: POPE's object-hallucination questions (yes/no), scored by accuracy, precision,
recall, F1 and yes-ratio, overall and per category (random, popular, adversarial)."""

from __future__ import annotations

import re
from pathlib import Path

from mmbridge.errors import ConfigError
from mmbridge.plugins.datasets._benchmark import (
    SHORT_ANSWER,
    BenchmarkSource,
    image_question,
    read_json,
    required,
)
from mmbridge.types import Sample

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

    def __init__(self, path: str, image_dir: str = "???", prompt: str = SHORT_ANSWER, split: str = "test") -> None:
        self.path = required(path, "data.path", "a POPE file or the folder of coco_pope_*.json")
        self.image_dir = required(image_dir, "data.image_dir", "the folder of the COCO images POPE names")
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
            for q in read_json(f, "data.path"):
                question = f"{q['text']}\n{self.prompt}" if self.prompt else q["text"]
                meta = {"benchmark": "pope", "label": str(q["label"]).strip().lower(), "category": category,
                        "qtype": category, "question_id": q["question_id"]}
                out.append(image_question(f"{category}-{q['question_id']}", self.image_dir / q["image"],
                                          question, str(q["label"]).strip().lower(), meta))
        return out


COMPONENTS = {"dataset": {"pope": POPEDataset}}
