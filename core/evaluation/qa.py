"""Generation-based evaluation: exact match on question answering, per question type, with
the baselines measured in the same run (the LLM without the media, and chance)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.batcher import Batcher
from mmbridge.data.dataset import strip_media
from mmbridge.evaluation import benchmarks
from mmbridge.model import MultimodalModel
from mmbridge.utils.metrics import normalize_text, word_error_rate
from mmbridge.utils.progress import Progress


def normalize(text: str) -> str:
    """The answer normalisation of exact match (:func:`mmbridge.utils.metrics.normalize_text`)."""
    return normalize_text(text)


@dataclass
class QAItem:
    """One question with its reference answer, as a single-turn prompt."""

    sample: Sample  # single-turn: [user with placeholders, assistant answer]
    answer: str
    qtype: str


def qa_items(samples: Sequence[Sample]) -> list[QAItem]:
    """Split every conversation into single-turn questions (media placeholders in front)."""
    items = []
    for s in samples:
        qtypes = list(s.meta.get("qtypes") or [])
        turns = s.conversations
        k = 0
        for i in range(len(turns) - 1):
            if turns[i]["from"] not in ("human", "user") or turns[i + 1]["from"] not in (
                "gpt",
                "assistant",
            ):
                continue
            q = turns[i]["value"]
            for m in s.media:
                q = q.replace(placeholder(m) + "\n", "").replace(placeholder(m), "")
            prefix = "".join(placeholder(m) + "\n" for m in s.media)
            qtype = qtypes[k] if k < len(qtypes) else s.meta.get("qtype", "all")
            conv = [
                {"from": "human", "value": prefix + q.strip()},
                {"from": "gpt", "value": turns[i + 1]["value"]},
            ]
            items.append(
                QAItem(
                    s.replace(id=f"{s.id}#{k}", conversations=conv),
                    turns[i + 1]["value"],
                    str(qtype),
                )
            )
            k += 1
    return items


def summarise(correct: dict[str, list[bool]], prefix: str) -> dict[str, float]:
    allv = [c for v in correct.values() for c in v]
    out = {f"{prefix}exact_match": sum(allv) / max(1, len(allv))}
    for qtype, v in sorted(correct.items()):
        out[f"{prefix}exact_match/{qtype}"] = sum(v) / max(1, len(v))
    return out


def wer_by_type(
    items: Sequence[QAItem], preds: Sequence[str], qtypes: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    """Corpus word error rate (:func:`mmbridge.utils.metrics.word_error_rate`) of the questions of
    each type in ``qtypes`` (those present), as ``{prefix}wer/<qtype>``."""
    out = {}
    for qtype in qtypes:
        pairs = [(p, it.answer) for it, p in zip(items, preds) if it.qtype == qtype]
        if pairs:
            out[f"{prefix}wer/{qtype}"] = word_error_rate(
                [p for p, _ in pairs], [r for _, r in pairs]
            )
    return out


@torch.no_grad()
def answer(
    model: MultimodalModel,
    items: Sequence[QAItem],
    batcher: Batcher,
    batch_size: int = 16,
    max_new_tokens: int = 12,
    without_media: bool = False,
    progress: bool = True,
    infos: list[dict[str, Any] | None] | None = None,
) -> list[str]:
    """Greedy answers for the questions (optionally with the media removed), each question a
    generation prompt through ``batcher`` (left padded, on the model's device). With ``infos``,
    what the model's sequence prefix decided for each question (``SequencePrefix.last_info``,
    e.g. AlignGPT's gate weights; None without one) is appended to it."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs: list[str] = []
    tok = batcher.chat.tokenizer
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(
            "evaluating" + (" (no media)" if without_media else ""), total=len(items)
        )
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            prompts = []
            for it in chunk:
                s = strip_media(it.sample) if without_media else it.sample
                prompts.append(s.replace(conversations=s.conversations[:-1]))
            batch = batcher.batch(prompts, device=device, generation=True)
            if model.prefix is not None:
                model.prefix.last_info = None
            new = model.generate(batch, max_new_tokens=max_new_tokens)
            outs += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
            if infos is not None:
                got = model.prefix.last_info if model.prefix is not None else None
                infos += got if got is not None and len(got) == len(chunk) else [None] * len(chunk)
            bar.advance(task, len(chunk))
    model.train(was_training)
    return outs


def exact_match(
    model: MultimodalModel,
    items: Sequence[QAItem],
    batcher: Batcher,
    prefix: str = "",
    records: list[dict] | None = None,
    wer_qtypes: Sequence[str] = (),
    **kwargs,
) -> dict[str, float]:
    """Exact match (after :func:`normalize`) overall and per question type, the word error
    rate of the types in ``wer_qtypes`` (transcriptions), and the official metric of the
    questions whose ``meta["benchmark"]`` names one (:func:`mmbridge.evaluation.benchmarks.score`:
    VQA accuracy, GQA, POPE, multiple choice; their per-question ``score`` goes into the
    records); with ``records``, one dict per
    question is appended to it (id, type, question, reference, prediction, and what the
    sequence prefix decided, e.g. AlignGPT's gate weights). A gated prefix adds
    ``gate/entropy`` (mean entropy of the gate weights over log(N-1): 1 = uniform, 0 = one
    level) and ``gate/max_weight``."""
    infos: list[dict[str, Any] | None] = []
    preds = answer(model, items, batcher, infos=infos, **kwargs)
    bench, scores = benchmarks.score(
        [it.sample.meta for it in items],
        [it.answer for it in items],
        preds,
        [it.qtype for it in items],
        prefix,
    )
    correct: dict[str, list[bool]] = defaultdict(list)
    for it, p, info, sc in zip(items, preds, infos, scores):
        ok = normalize(p) == normalize(it.answer)
        correct[it.qtype].append(ok)
        if records is not None:
            shown = strip_media(it.sample) if kwargs.get("without_media") else it.sample
            rec = {
                "id": it.sample.id,
                "qtype": it.qtype,
                "mode": prefix.rstrip("/") or "media",
                "question": shown.conversations[0]["value"],
                "answer": it.answer,
                "prediction": p,
                "correct": ok,
                "media": dict(shown.media),
            }
            if info is not None:
                rec["prefix"] = info
            if sc is not None:
                rec["score"] = sc
            records.append(rec)
    return {
        **summarise(correct, prefix),
        **wer_by_type(items, preds, wer_qtypes, prefix),
        **gate_summary(infos, prefix),
        **bench,
    }


def gate_summary(infos: Sequence[dict[str, Any] | None], prefix: str = "") -> dict[str, float]:
    """``gate/entropy`` and ``gate/max_weight`` over the questions that went through a gate."""
    weights = [info["gate"] for info in infos if info and info.get("gate")]
    if not weights or len(weights[0]) < 2:
        return {}
    w = torch.tensor(weights, dtype=torch.float64).clamp(min=1e-12)
    entropy = -(w * w.log()).sum(-1) / math.log(w.shape[-1])
    return {
        f"{prefix}gate/entropy": float(entropy.mean()),
        f"{prefix}gate/max_weight": float(w.max(-1).values.mean()),
    }


def reference_asr(
    items: Sequence[QAItem],
    tool,
    qtypes: Sequence[str],
    prefix: str = "asr/",
    records: list[dict] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """The word error rate of a speech recogniser (the ``asr`` tool: Whisper's own decoder) on
    the audio of the transcription questions: the reference beside the trained model."""
    chosen = [it for it in items if it.qtype in qtypes and "audio" in it.sample.media]
    preds = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("reference ASR", total=len(chosen))
        for it in chosen:
            preds.append(str(tool(audio=it.sample.single_media()["audio"])))
            bar.advance(task)
    if records is not None:
        for it, p in zip(chosen, preds):
            records.append(
                {
                    "id": it.sample.id,
                    "qtype": it.qtype,
                    "mode": prefix.rstrip("/"),
                    "question": it.sample.conversations[0]["value"],
                    "answer": it.answer,
                    "prediction": p,
                    "correct": normalize(p) == normalize(it.answer),
                }
            )
    return wer_by_type(chosen, preds, qtypes, prefix)


def chance(
    train: Sequence[QAItem], test: Sequence[QAItem], prefix: str = "chance/"
) -> dict[str, float]:
    """Majority-answer baseline: per question type, always give the train split's most
    common answer."""
    majority = {}
    by_type: dict[str, Counter] = defaultdict(Counter)
    for it in train:
        by_type[it.qtype][normalize(it.answer)] += 1
    for qtype, counts in by_type.items():
        majority[qtype] = min(counts, key=lambda a: (-counts[a], a))  # ties: alphabetical
    correct: dict[str, list[bool]] = defaultdict(list)
    for it in test:
        correct[it.qtype].append(majority.get(it.qtype) == normalize(it.answer))
    return summarise(correct, prefix)
