"""Held-out evaluation through the Tool Learning callers (2311.07594 §3.3).

The trained model answers each question via a :class:`~mmbridge.contracts.tools.ToolCaller`:
``pipeline`` (the tools' results are written into the prompt first) or ``llm`` (the model calls
tools while it answers and reads their results). Configured under ``evaluation.tool_callers``,
one entry per caller, its metrics prefixed by the entry's name::

    evaluation:
      tool_callers:
        pipeline_ocr: {name: pipeline, tools: [ocr]}
        llm_caller: {name: llm, tools: [ocr, calculator], max_calls: 3}

``tools`` is a list of registered tool names or a mapping name -> tool config (arguments);
the other keys are the caller's own arguments (``conf/tool_caller/*.yaml``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmbridge.config import to_container
from mmbridge.config.build import build
from mmbridge.contracts.tools import GenerateFn, Tool, ToolCaller
from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.batcher import Batcher
from mmbridge.errors import ConfigError
from mmbridge.evaluation.qa import QAItem, normalize, summarise
from mmbridge.model import MultimodalModel
from mmbridge.registry import Registry
from mmbridge.utils.progress import Progress


def model_generate_fn(
    model: MultimodalModel,
    batcher: Batcher,
    media: Mapping[str, str | list[str]],
    max_new_tokens: int,
) -> GenerateFn:
    """``generate(messages) -> str`` for a caller: the messages (roles user / assistant /
    system / tool) through the chat template, the sample's media in the slots of the
    placeholders the messages hold, greedy decoding. ``generate.tokenizer`` lets the ``llm``
    caller choose its format (tagged ``<tool_call>`` JSON: mmbridge's chat encoder renders no
    ``tools=`` list)."""
    device = next(model.parameters()).device
    tok = batcher.chat.tokenizer

    def generate(messages: list[dict[str, Any]]) -> str:
        convs = [{"from": m["role"], "value": str(m.get("content") or "")} for m in messages]
        text = "".join(c["value"] for c in convs)
        present = {k: v for k, v in media.items() if placeholder(k) in text}
        sample = Sample(id="tool-eval", media=present, conversations=convs, meta={})
        batch = batcher.batch([sample], device=device, generation=True)
        new = model.generate(batch, max_new_tokens=max_new_tokens)
        return tok.decode(new[0], skip_special_tokens=True).strip()

    generate.tokenizer = tok  # type: ignore[attr-defined]
    return generate


def build_caller(registry: Registry, node: Mapping[str, Any], key: str) -> ToolCaller:
    """The caller of ``node`` with its ``tools`` built (names or name -> config)."""
    data = to_container(node)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{key}: expected a mapping with `name` (pipeline | llm) and `tools`, got {data!r}"
        )
    spec = data.pop("tools", None)
    if not spec:
        raise ConfigError(
            f"{key}.tools: give the tools the caller may use, e.g. [ocr] or "
            f"{{ocr: {{backend: tesseract}}}}; registered: {', '.join(registry.names('tool'))}"
        )
    if isinstance(spec, str):
        spec = [spec]
    items = spec.items() if isinstance(spec, dict) else ((n, {}) for n in spec)
    tools: dict[str, Tool] = {}
    for name, args in items:
        args = dict(args or {})
        args.setdefault("name", name)
        tool = build(registry, "tool", args, f"{key}.tools.{name}")
        tool.name = str(args["name"])
        tools[str(name)] = tool
    return build(registry, "tool_caller", data, key, tools=tools)


@torch.no_grad()
def caller_exact_match(
    model: MultimodalModel,
    batcher: Batcher,
    items: Sequence[QAItem],
    caller: ToolCaller,
    prefix: str,
    max_new_tokens: int = 64,
    records: list[dict] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Exact match of the answers the model gives through ``caller``, per question type, with
    the calls made per question and the share of calls that failed (``{prefix}...``)."""
    was_training = model.training
    model.eval()
    correct: dict[str, list[bool]] = defaultdict(list)
    n_calls = n_failed = 0
    try:
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"evaluating ({prefix.rstrip('/')})", total=len(items))
            for it in items:
                question = it.sample.conversations[0]["value"]
                media = it.sample.single_media()  # a tool caller reads one file per modality
                gen = model_generate_fn(model, batcher, media, max_new_tokens)
                run = caller.run(question, media, gen)
                ok = normalize(run.answer) == normalize(it.answer)
                correct[it.qtype].append(ok)
                n_calls += len(run.calls)
                n_failed += sum(not c.ok for c in run.calls)
                if records is not None:
                    records.append(
                        {
                            "id": it.sample.id,
                            "qtype": it.qtype,
                            "mode": prefix.rstrip("/"),
                            "question": run.prompt or question,
                            "answer": it.answer,
                            "prediction": run.answer,
                            "correct": ok,
                            "calls": [
                                {
                                    "name": c.name,
                                    "arguments": c.arguments,
                                    "ok": c.ok,
                                    "result": c.result[:200],
                                }
                                for c in run.calls
                            ],
                        }
                    )
                bar.advance(task)
    finally:
        model.train(was_training)
    out = summarise(correct, prefix)
    out[f"{prefix}tool_calls_per_question"] = n_calls / max(1, len(items))
    out[f"{prefix}tool_call_failures"] = n_failed / max(1, n_calls)
    return out
