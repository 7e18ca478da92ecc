"""Generation-based evaluation: exact match on question answering, per question type, with
the baselines measured in the same run (the LLM without the media, and chance)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.progress import Progress

from mmbridge.data.chat import ChatEncoder
from mmbridge.data.dataset import Collator, MediaReader, encode_sample, strip_media
from mmbridge.model import MultimodalModel
from mmbridge.types import Sample, placeholder


def normalize(text: str) -> str:
    from mmbridge.metrics import normalize_text

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
            if turns[i]["from"] not in ("human", "user") or turns[i + 1]["from"] not in ("gpt", "assistant"):
                continue
            q = turns[i]["value"]
            for m in s.media:
                q = q.replace(placeholder(m) + "\n", "").replace(placeholder(m), "")
            prefix = "".join(placeholder(m) + "\n" for m in s.media)
            qtype = qtypes[k] if k < len(qtypes) else s.meta.get("qtype", "all")
            conv = [{"from": "human", "value": prefix + q.strip()}, {"from": "gpt", "value": turns[i + 1]["value"]}]
            items.append(QAItem(s.replace(id=f"{s.id}#{k}", conversations=conv), turns[i + 1]["value"], str(qtype)))
            k += 1
    return items


def _summarise(correct: dict[str, list[bool]], prefix: str) -> dict[str, float]:
    allv = [c for v in correct.values() for c in v]
    out = {f"{prefix}exact_match": sum(allv) / max(1, len(allv))}
    for qtype, v in sorted(correct.items()):
        out[f"{prefix}exact_match/{qtype}"] = sum(v) / max(1, len(v))
    return out


@torch.no_grad()
def answer(model: MultimodalModel, items: Sequence[QAItem], reader: MediaReader, chat: ChatEncoder,
           batch_size: int = 16, max_new_tokens: int = 12, without_media: bool = False,
           progress: bool = True) -> list[str]:
    """Greedy answers for the questions (optionally with the media removed)."""
    collate = Collator(chat.pad_id, model, left_pad=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs: list[str] = []
    tok = chat.tokenizer
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("evaluating" + (" (no media)" if without_media else ""), total=len(items))
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            encoded = []
            for it in chunk:
                s = strip_media(it.sample) if without_media else it.sample
                s = s.replace(conversations=s.conversations[:-1])
                encoded.append(encode_sample(s, reader, chat, add_generation_prompt=True))
            batch = _to(collate(encoded), device)
            new = model.generate(batch, max_new_tokens=max_new_tokens)
            outs += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
            bar.advance(task, len(chunk))
    model.train(was_training)
    return outs


def exact_match(model: MultimodalModel, items: Sequence[QAItem], reader: MediaReader,
                chat: ChatEncoder, prefix: str = "", **kwargs) -> dict[str, float]:
    preds = answer(model, items, reader, chat, **kwargs)
    correct: dict[str, list[bool]] = defaultdict(list)
    for it, p in zip(items, preds):
        correct[it.qtype].append(normalize(p) == normalize(it.answer))
    return _summarise(correct, prefix)


def chance(train: Sequence[QAItem], test: Sequence[QAItem]) -> dict[str, float]:
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
    return _summarise(correct, "chance/")


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch
