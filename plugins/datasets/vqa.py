"""``vqa``: VQAv2 (questions + annotations JSON) and TextVQA (one JSON with the answers), scored
by VQA accuracy over the ten human answers (:func:`mmbridge.evaluation.benchmarks.vqa_accuracy`)."""

from __future__ import annotations

import re
from pathlib import Path

from mmbridge.contracts.types import Sample
from mmbridge.errors import ConfigError, DataError, reading
from mmbridge.plugins.datasets._benchmark import (
    SHORT_ANSWER,
    BenchmarkSource,
    abspath,
    image_question,
    read_json,
    records,
    required,
    text_field,
)

_V2_QUESTIONS = re.compile(r"v2_OpenEnded_mscoco_(\w+?)_questions\.json$")


class VQADataset(BenchmarkSource):
    """VQAv2 or TextVQA files in their official layout.

    * VQAv2: ``path`` = ``v2_OpenEnded_mscoco_val2014_questions.json`` (``{"questions":
      [{"image_id", "question", "question_id"}], "data_subtype": "val2014", ...}``) and
      ``annotations`` = ``v2_mscoco_val2014_annotations.json`` (``{"annotations":
      [{"question_id", "answer_type", "multiple_choice_answer", "answers": [{"answer", ...} x
      10]}]}``; found next to the questions by its official name when unset); images
      ``COCO_val2014_000000000042.jpg`` in ``image_dir`` (default: the ``data_subtype`` folder
      beside the questions).
    * TextVQA: ``path`` = ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "question",
      "image_id", "answers": [10 strings]}]}``); images ``<image_id>.jpg`` in ``image_dir``
      (default: ``train_images`` beside it, where TextVQA keeps its val images).

    Args:
        path: The questions file (VQAv2) or the TextVQA file.
        annotations: VQAv2's annotations file.
        image_dir: Folder of the images.
        image_pattern: File name of an image, formatted with ``image_id`` and ``subtype``.
        prompt: Instruction after the question (LLaVA-1.5's short-answer line by default).
        split: The split name the questions get (``mmbridge eval split=``).
    """

    name = "vqa"

    def __init__(
        self,
        path: str,
        annotations: str | None = None,
        image_dir: str | None = None,
        image_pattern: str | None = None,
        prompt: str = SHORT_ANSWER,
        split: str = "test",
    ) -> None:
        self.path = required(path, "data.path", "a VQAv2 questions or TextVQA JSON file")
        ann = abspath(annotations)
        m = _V2_QUESTIONS.search(self.path.name)
        if ann is None and m:
            ann = self.path.parent / f"v2_mscoco_{m.group(1)}_annotations.json"
        self.annotations = ann
        self.image_dir = abspath(image_dir)
        self.image_pattern = image_pattern
        self.prompt = prompt
        self.split = split

    def inputs(self) -> list[Path]:
        return [self.path] + ([self.annotations] if self.annotations else [])

    def read(self, out_dir: Path) -> list[Sample]:
        data = read_json(self.path, "data.path", dict, _LAYOUT)
        if "questions" in data:
            return self._vqav2(data)
        if "data" in data:
            return self._textvqa(data["data"])
        raise DataError(
            f"data.path: {self.path} is neither VQAv2 questions (a 'questions' list) nor "
            f"TextVQA (a 'data' list)"
        )

    def _question(self, text: str) -> str:
        return f"{text}\n{self.prompt}" if self.prompt else text

    def _vqav2(self, data: dict) -> list[Sample]:
        if self.annotations is None or not self.annotations.is_file():
            raise ConfigError(
                f"data.annotations: the VQAv2 annotations file is needed to score "
                f"{self.path.name} (not found: {self.annotations}); test-dev has none "
                f"(it is scored on the EvalAI server)"
            )
        ann_data = read_json(
            self.annotations,
            "data.annotations",
            dict,
            "VQAv2 annotations: {'annotations': [{'question_id', 'answers', ...}]}",
        )
        anns = {}
        for i, a in records(
            _list(ann_data, "annotations", self.annotations), self.annotations, "annotation"
        ):
            with reading(self.annotations, f"annotation {i}", "'question_id' and 10 'answers'"):
                anns[a["question_id"]] = a
        subtype = str(data.get("data_subtype", "val2014"))
        image_dir = self.image_dir or self.path.parent / subtype
        pattern = self.image_pattern or "COCO_{subtype}_{image_id:012d}.jpg"
        out = []
        for i, q in records(_list(data, "questions", self.path), self.path, "question"):
            with reading(
                self.path,
                f"question {i} (question_id {q.get('question_id')})",
                "'question_id', 'image_id', 'question'",
            ):
                a = anns.get(q["question_id"])
            if a is None:
                raise DataError(
                    f"{self.annotations}: no annotation for question_id {q['question_id']}"
                )
            with reading(
                self.annotations,
                f"annotation of question_id {q['question_id']}",
                "'answers': a non-empty list of {'answer': text}",
            ):
                answers = [text_field(x, "answer") for x in a["answers"]]
                if not answers:
                    raise DataError(
                        f"{self.annotations}: question_id {q['question_id']}: 'answers' is empty"
                    )
                reference = str(a.get("multiple_choice_answer", answers[0]))
            with reading(
                self.path,
                f"question_id {q['question_id']}",
                f"'image_id' and 'question'; image_pattern {pattern!r}",
            ):
                image = image_dir / pattern.format(image_id=q["image_id"], subtype=subtype)
                meta = {
                    "benchmark": "vqa",
                    "answers": answers,
                    "qtype": str(a.get("answer_type", "all")),
                    "question_id": q["question_id"],
                }
                out.append(
                    image_question(
                        str(q["question_id"]),
                        image,
                        self._question(text_field(q, "question")),
                        reference,
                        meta,
                    )
                )
        return out

    def _textvqa(self, rows: list[dict]) -> list[Sample]:
        image_dir = self.image_dir or self.path.parent / "train_images"
        pattern = self.image_pattern or "{image_id}.jpg"
        out = []
        if not isinstance(rows, list):
            raise DataError(
                f"{self.path}: 'data' must be a list of questions, got {type(rows).__name__}"
            )
        for i, q in records(rows, self.path, "question"):
            with reading(
                self.path,
                f"question {i} (question_id {q.get('question_id')})",
                f"'question_id', 'question', 'image_id', 'answers'; image_pattern {pattern!r}",
            ):
                answers = [text_field({"answer": a}, "answer") for a in q.get("answers") or []]
                if not answers:
                    raise DataError(
                        f"{self.path}: question {q.get('question_id')} has no answers "
                        "(a test file?)"
                    )
                top = max(set(answers), key=lambda a: (answers.count(a), a))
                image = image_dir / pattern.format(image_id=q["image_id"], subtype=self.split)
                meta = {"benchmark": "vqa", "answers": answers, "question_id": q["question_id"]}
                out.append(
                    image_question(
                        str(q["question_id"]),
                        image,
                        self._question(text_field(q, "question")),
                        top,
                        meta,
                    )
                )
        return out


_LAYOUT = "VQAv2 questions {'questions': [...]} or TextVQA {'data': [...]}"


def _list(data: dict, key: str, path: Path | None) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise DataError(f"{path}: '{key}' must be a list, got {type(value).__name__}")
    return value


COMPONENTS = {"dataset": {"vqa": VQADataset}}
