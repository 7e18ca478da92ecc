"""``gqa``: GQA's balanced questions JSON, scored by exact match after the VQA answer
normalisation, overall and per structural type (verify, query, choose, logical, compare)."""

from __future__ import annotations

from pathlib import Path

from mmbridge.contracts.types import Sample
from mmbridge.errors import reading
from mmbridge.plugins.datasets._benchmark import (
    SHORT_ANSWER,
    BenchmarkSource,
    abspath,
    image_question,
    read_json,
    required,
    text_field,
)


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

    def __init__(
        self,
        path: str,
        image_dir: str | None = None,
        prompt: str = SHORT_ANSWER,
        split: str = "test",
    ) -> None:
        self.path = required(path, "data.path", "a GQA questions JSON file")
        self.image_dir = abspath(image_dir) or self.path.parent / "images"
        self.prompt = prompt
        self.split = split

    def inputs(self) -> list[Path]:
        return [self.path]

    def read(self, out_dir: Path) -> list[Sample]:
        out = []
        data = read_json(
            self.path,
            "data.path",
            dict,
            "GQA questions: {question_id: {'imageId', 'question', 'answer', ...}}",
        )
        for qid, q in data.items():
            with reading(
                self.path, f"question {qid}", "an object with 'imageId', 'question', 'answer'"
            ):
                question = text_field(q, "question")
                question = f"{question}\n{self.prompt}" if self.prompt else question
                types = q.get("types") or {}
                meta = {
                    "benchmark": "gqa",
                    "qtype": str(types.get("structural", "all")),
                    "question_id": qid,
                }
                image = self.image_dir / f"{text_field(q, 'imageId')}.jpg"
                out.append(image_question(str(qid), image, question, text_field(q, "answer"), meta))
        return out


COMPONENTS = {"dataset": {"gqa": GQADataset}}
