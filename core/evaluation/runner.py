"""The parts of one evaluation that ``evaluation.*`` configures: the validation questions a
stage asks at each validation (:class:`ValQuestions`), the tools built once per evaluation
(:class:`EvalTools`) and every figure of one set of questions (:func:`evaluate_items`).

They take collaborators (the model, a batcher, the ``evaluation`` section), not a run:
:func:`mmbridge.runtime.evaluate.evaluate_session` puts them together for a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmbridge.config.build import build
from mmbridge.config.schema import Evaluation
from mmbridge.contracts.tools import Tool, ToolCaller
from mmbridge.contracts.types import Sample
from mmbridge.data.batcher import Batcher
from mmbridge.evaluation import qa
from mmbridge.evaluation.tools import build_caller, caller_exact_match
from mmbridge.model import MultimodalModel
from mmbridge.registry import Registry


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

    def __init__(
        self,
        samples: Sequence[Sample],
        batcher: Batcher,
        n: int,
        max_new_tokens: int,
        batch_size: int,
    ) -> None:
        self.items = qa.qa_items(samples)[:n]
        self.batcher = batcher
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, model: MultimodalModel) -> dict[str, float]:
        if not self.items:
            return {}
        res = qa.exact_match(
            model,
            self.items,
            self.batcher,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            progress=False,
        )
        return {"exact_match": res["exact_match"]}


@dataclass
class EvalTools:
    """The tools one evaluation builds once and uses on every data set it evaluates."""

    #: ``evaluation.tool_callers``: entry name -> its caller, its tools built.
    callers: dict[str, ToolCaller] = field(default_factory=dict)
    #: The tool ``evaluation.reference_asr_tool`` on the checkpoint ``evaluation.reference_asr``
    #: (with ``evaluation.wer_qtypes`` only).
    asr: Tool | None = None

    @classmethod
    def build(cls, registry: Registry, ev: Evaluation) -> EvalTools:
        """The tools of the ``evaluation`` section ``ev``, built from ``registry``."""
        callers = {}
        for cname, node in ev.tool_callers.items():
            key = f"evaluation.tool_callers.{cname}"
            callers[str(cname)] = build_caller(registry, node, key)
        asr = None
        if ev.reference_asr and ev.wer_qtypes:
            node = {"name": ev.reference_asr_tool, "checkpoint": ev.reference_asr}
            asr = build(registry, "tool", node, "evaluation.reference_asr")
        return cls(callers, asr)


def evaluate_items(
    model: MultimodalModel,
    ev: Evaluation,
    items: list[qa.QAItem],
    batcher: Batcher,
    tools: EvalTools,
    prefix: str = "",
    records: list[dict] | None = None,
    train: Sequence[Sample] | None = None,
) -> dict[str, Any]:
    """Every figure of ``items``: exact match (word error rate for ``evaluation.wer_qtypes``),
    the no-media and chance (from ``train``) baselines with ``evaluation.baselines``, the
    answers through each tool caller and the reference recogniser; keys prefixed with
    ``prefix``, each answer appended to ``records``."""
    kw: dict[str, Any] = {
        "max_new_tokens": ev.max_new_tokens,
        "batch_size": ev.batch_size,
        "wer_qtypes": list(ev.wer_qtypes),
    }
    out: dict[str, Any] = qa.exact_match(
        model, items, batcher, prefix=prefix, records=records, **kw
    )
    if ev.baselines:
        out.update(
            qa.exact_match(
                model,
                items,
                batcher,
                prefix=f"{prefix}no_media/",
                without_media=True,
                records=records,
                **kw,
            )
        )
        if train:
            out.update(qa.chance(qa.qa_items(train), items, prefix=f"{prefix}chance/"))
    for cname, caller in tools.callers.items():
        out.update(
            caller_exact_match(
                model,
                batcher,
                items,
                caller,
                prefix=f"{prefix}{cname}/",
                records=records,
                max_new_tokens=ev.tool_max_new_tokens,
            )
        )
    if tools.asr is not None:
        out.update(
            qa.reference_asr(
                items, tools.asr, kw["wer_qtypes"], prefix=f"{prefix}asr/", records=records
            )
        )
    return out
