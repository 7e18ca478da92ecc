"""``gqa``: GQA's balanced questions JSON, scored by exact match after the VQA answer
normalisation, overall and per structural type (verify, query, choose, logical, compare)."""

from __future__ import annotations

from pathlib import Path

from mmbridge.plugins.datasets._benchmark import (
    SHORT_ANSWER,
    BenchmarkSource,
    abspath,
    image_question,
    read_json,
    required,
)
from mmbridge.types import Sample


class GQADataset(BenchmarkSource):
    """GQA in its official layout: ``path`` = ``testdev_balanced_questions.json``
    (``{question_id: {"imageId", "question", "answer", "fullAnswer", "types": {"structural",
    "semantic", "detailed"}, ...}}``), images ``<imageId>.jpg`` in ``image_dir`` (default:
    ``images`` beside the questions).

    Args:
        path: The questions file.
        image_dir: Folder of the images.
        prompt: Instruction after the question.
        split: The split name the questions get.
    """

    name = "gqa"

    def __init__(self, path: str, image_dir: str | None = None, prompt: str = SHORT_ANSWER,
                 split: str = "test") -> None:
        self.path = required(path, "data.path", "a GQA questions JSON file")
        self.image_dir = abspath(image_dir) or self.path.parent / "images"
        self.prompt = prompt
        self.split = split

    def inputs(self) -> list[Path]:
        return [self.path]

    def read(self, out_dir: Path) -> list[Sample]:
        out = []
        for qid, q in read_json(self.path, "data.path").items():
            question = f"{q['question']}\n{self.prompt}" if self.prompt else q["question"]
            meta = {"benchmark": "gqa", "qtype": (q.get("types") or {}).get("structural", "all"),
                    "question_id": qid}
            out.append(image_question(str(qid), self.image_dir / f"{q['imageId']}.jpg", question, q["answer"], meta))
        return out


COMPONENTS = {"dataset": {"gqa": GQADataset}}
