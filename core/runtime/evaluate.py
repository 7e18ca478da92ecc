"""One evaluation of a run's model: every part ``evaluation.*`` configures, in one call that
``mmbridge train`` (after the last stage) and ``mmbridge eval`` share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmbridge.contracts.types import Sample
from mmbridge.data.sources import check_media, read_data
from mmbridge.errors import ConfigError
from mmbridge.evaluation import qa
from mmbridge.evaluation.runner import EvalTools, evaluate_items
from mmbridge.runtime.session import Session
from mmbridge.utils.io import atomic_write_text


def evaluate_session(
    session: Session,
    split: str | None = None,
    max_samples: int | None = None,
    predictions: Path | None = None,
) -> dict[str, Any]:
    """Exact match on the split's questions (word error rate for ``evaluation.wer_qtypes``),
    with the no-media and chance baselines, the answers through the Tool Learning callers
    (``evaluation.tool_callers``, :mod:`mmbridge.evaluation.tools`), the reference recogniser
    (``evaluation.reference_asr``) and the extra evaluation sets (``evaluation.extra_data``,
    keys prefixed with their name); every answer is written to ``predictions`` (JSON lines,
    atomically) when given."""
    ev = session.run.evaluation
    split = split or ev.split
    if split not in session.splits:
        return {}
    records: list[dict] = []
    limit = int(max_samples or ev.max_samples)
    items = qa.qa_items(session.splits[split])[:limit]
    tools = EvalTools.build(session.registry, ev)
    out = evaluate_items(
        session.model,
        ev,
        items,
        session.batcher(),
        tools,
        "",
        records,
        train=session.splits.get("train"),
    )
    out["n"] = len(items)
    for name, data_cfg in ev.extra_data.items():
        samples = _extra_split(session, str(name), data_cfg, split)
        items = qa.qa_items(samples)[:limit]
        extra = evaluate_items(
            session.model,
            ev,
            items,
            session.batcher(use_cache=False),
            tools,
            f"{name}/",
            records,
            train=None,
        )
        extra[f"{name}/n"] = len(items)
        out.update(extra)
    if predictions is not None:
        atomic_write_text(predictions, "".join(json.dumps(r) + "\n" for r in records))
    return out


def _extra_split(
    session: Session, name: str, data_cfg: Mapping[str, Any], split: str
) -> list[Sample]:
    """The ``split`` (else ``test``, else the only split) of the extra evaluation set ``name``."""
    run = session.run
    key = f"evaluation.extra_data.{name}"
    splits = read_data(session.registry, data_cfg, key, Path(run.paths.data_dir), run.seed)
    chosen = split if split in splits else ("test" if "test" in splits else None)
    if chosen is None:
        if len(splits) != 1:
            raise ConfigError(f"{key}: no '{split}' or 'test' split; splits: {', '.join(splits)}")
        chosen = next(iter(splits))
    check_media({f"{name}:{chosen}": splits[chosen]}, list(session.model.branches))
    return splits[chosen]
