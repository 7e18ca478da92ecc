"""One evaluation of a run's model: every part ``evaluation.*`` configures, in one call that
``mmbridge train`` (after the last stage) and ``mmbridge eval`` share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmbridge.build import build
from mmbridge.data.batcher import Batcher
from mmbridge.errors import ConfigError
from mmbridge.evaluation import qa
from mmbridge.evaluation.tools import build_caller, caller_exact_match
from mmbridge.io import atomic_write_text
from mmbridge.tools import Tool, ToolCaller
from mmbridge.training.session import Session, check_media, read_source
from mmbridge.types import Sample


class ValQuestions:
    """Exact match on the validation split's questions (the first ``n``), the ``evaluator`` a
    :class:`~mmbridge.training.module.BridgeModule` runs at each validation.

    Args:
        samples: The validation split.
        batcher: Its samples -> batch pipeline (the run's feature cache included).
        n: How many questions.
        max_new_tokens: Longest answer.
        batch_size: Questions per generation batch.
    """

    def __init__(self, samples: Sequence[Sample], batcher: Batcher, n: int, max_new_tokens: int,
                 batch_size: int) -> None:
        self.items = qa.qa_items(samples)[:n]
        self.batcher = batcher
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, model) -> dict[str, float]:
        if not self.items:
            return {}
        res = qa.exact_match(model, self.items, self.batcher, max_new_tokens=self.max_new_tokens,
                             batch_size=self.batch_size, progress=False)
        return {"exact_match": res["exact_match"]}


@dataclass
class EvalTools:
    """The tools one evaluation builds once and uses on every data set it evaluates."""

    #: ``evaluation.tool_callers``: entry name -> its caller, its tools built.
    callers: dict[str, ToolCaller] = field(default_factory=dict)
    #: The ``asr`` tool on ``evaluation.reference_asr`` (with ``evaluation.wer_qtypes`` only).
    asr: Tool | None = None

    @classmethod
    def build(cls, session: Session, ev_cfg: DictConfig) -> EvalTools:
        callers = {}
        for cname, node in (ev_cfg.get("tool_callers") or {}).items():
            key = f"evaluation.tool_callers.{cname}"
            callers[str(cname)] = build_caller(session.registry, node, key)
        ref = ev_cfg.get("reference_asr")
        asr = None
        if ref and ev_cfg.get("wer_qtypes"):
            node = OmegaConf.create({"name": "asr", "checkpoint": str(ref)})
            asr = build(session.registry, "tool", node, "evaluation.reference_asr")
        return cls(callers, asr)


def evaluate_session(session: Session, split: str | None = None, max_samples: int | None = None,
                     predictions: Path | None = None) -> dict[str, Any]:
    """Exact match on the split's questions (word error rate for ``evaluation.wer_qtypes``),
    with the no-media and chance baselines, the answers through the Tool Learning callers
    (``evaluation.tool_callers``, :mod:`mmbridge.evaluation.tools`), the reference recogniser
    (``evaluation.reference_asr``) and the extra evaluation sets (``evaluation.extra_data``,
    keys prefixed with their name); every answer is written to ``predictions`` (JSON lines,
    atomically) when given."""
    ev_cfg = session.cfg.evaluation
    split = split or ev_cfg.split
    if split not in session.splits:
        return {}
    records: list[dict] = []
    limit = int(max_samples or ev_cfg.max_samples)
    items = qa.qa_items(session.splits[split])[:limit]
    tools = EvalTools.build(session, ev_cfg)
    out = _evaluate_items(session, ev_cfg, items, "", records, session.batcher(), tools,
                          train=session.splits.get("train"))
    out["n"] = len(items)
    for name, data_cfg in (ev_cfg.get("extra_data") or {}).items():
        samples = _extra_split(session, name, data_cfg, split)
        items = qa.qa_items(samples)[:limit]
        extra = _evaluate_items(session, ev_cfg, items, f"{name}/", records,
                                session.batcher(use_cache=False), tools, train=None)
        extra[f"{name}/n"] = len(items)
        out.update(extra)
    if predictions is not None:
        atomic_write_text(predictions, "".join(json.dumps(r) + "\n" for r in records))
    return out


def _evaluate_items(session: Session, ev_cfg: DictConfig, items: list, prefix: str,
                    records: list[dict], batcher: Batcher, tools: EvalTools, train) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": int(ev_cfg.max_new_tokens), "batch_size": int(ev_cfg.batch_size),
          "wer_qtypes": list(ev_cfg.get("wer_qtypes") or [])}
    out: dict[str, Any] = qa.exact_match(session.model, items, batcher, prefix=prefix, records=records, **kw)
    if ev_cfg.get("baselines", True):
        out.update(qa.exact_match(session.model, items, batcher, prefix=f"{prefix}no_media/",
                                  without_media=True, records=records, **kw))
        if train:
            out.update(qa.chance(qa.qa_items(train), items, prefix=f"{prefix}chance/"))
    for cname, caller in tools.callers.items():
        out.update(caller_exact_match(session.model, batcher, items, caller,
                                      prefix=f"{prefix}{cname}/", records=records,
                                      max_new_tokens=int(ev_cfg.get("tool_max_new_tokens", 64))))
    if tools.asr is not None:
        out.update(qa.reference_asr(items, tools.asr, kw["wer_qtypes"], prefix=f"{prefix}asr/", records=records))
    return out


def _extra_split(session: Session, name: str, data_cfg: DictConfig, split: str) -> list:
    """The ``split`` (else ``test``, else the only split) of the extra evaluation set ``name``."""
    splits = read_source(session.cfg, session.registry, data_cfg, f"evaluation.extra_data.{name}")
    chosen = split if split in splits else ("test" if "test" in splits else None)
    if chosen is None:
        if len(splits) != 1:
            raise ConfigError(f"evaluation.extra_data.{name}: no '{split}' or 'test' split; "
                              f"splits: {', '.join(splits)}")
        chosen = next(iter(splits))
    check_media({f"{name}:{chosen}": splits[chosen]}, session.model)
    return splits[chosen]
