"""What the model is fed: the first samples of a stage after its recipe and conversation format.

:func:`inspect` (``mmbridge.inspect``, ``mmbridge inspect``) gives, per sample, the text the
LLM sees (each media span shown as one marker with its slot count), the token ids, the labels
(``-100`` where nothing is supervised), where each media item's slots start, and optionally
the preprocessed images as PNGs. It is what LLaVA users check against "tokenization mismatch".

Cheap by design: the LLM is built on PyTorch's meta device from its ``config.json`` when its
directory holds a tokenizer (no weight is read); the encoders preprocess and count tokens only
(no forward pass), and no feature cache is read or written.
"""

from __future__ import annotations

import inspect as pyinspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmbridge.config import compose
from mmbridge.config.model_spec import ModelConfig, node_at, nodes_of
from mmbridge.config.validation import validate_config
from mmbridge.data.chat import IGNORE, ChatEncoder
from mmbridge.errors import ConfigError
from mmbridge.model import assemble
from mmbridge.registry import Registry, plugin_manager
from mmbridge.registry.assets import resolve_model_path
from mmbridge.runtime.config import RunConfig

#: Above this many samples in a stage's split, only the first ``4 n + 8`` go through the recipe.
WHOLE_SPLIT = 5000
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _front_end_llm(node: Mapping[str, Any], registry: Registry) -> Any:
    """The LLM of the ``llm`` node without its weights where it can be (meta device, tokenizer
    from its directory), else ``None`` (the caller builds it whole)."""
    cls = registry.get("llm", node["name"]).cls
    path = node.get("path")  # a node's own arguments: absent means the class's default
    if not hasattr(cls, "from_config") or not path or node.get("gguf_file"):
        return None
    local = Path(resolve_model_path(str(path), registry, key="llm.path"))
    if not (local / "config.json").is_file() or not any(
        (local / f).is_file() for f in _TOKENIZER_FILES
    ):
        return None
    accepted = pyinspect.signature(cls.from_config).parameters
    kwargs = {
        k: v
        for k, v in (("chat_template", node.get("chat_template")), ("dtype", "float32"))
        if k in accepted
    }
    with torch.device("meta"):
        llm = cls.from_config(local, **kwargs)
    return llm if getattr(llm, "tokenizer", None) is not None else None


def _float32_encoders(model: ModelConfig) -> ModelConfig:
    """``model`` with ``dtype: auto`` encoders in float32 (no hardware probe: nothing runs)."""
    auto = [
        n.key
        for n in nodes_of(model, "encoder")  # mmbridge.config.model_spec
        if (node := node_at(model, n.key)) is not None and node.get("dtype") == "auto"
    ]
    return model.with_dtypes(dict.fromkeys(auto, "float32"))


def _marker(kind: str, n: int) -> str:
    return f"<{kind} x{n}>"


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids``, special tokens decoded apart (a SentencePiece decoder would otherwise
    show the space it strips at a text's start after them: ``<s> A chat``)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: list[str] = []
    run: list[int] = []
    for t in ids:
        if t in special:
            if run:
                out.append(tokenizer.decode(run, skip_special_tokens=False))
            out.append(tokenizer.decode([t], skip_special_tokens=False))
            run = []
        else:
            run.append(t)
    if run:
        out.append(tokenizer.decode(run, skip_special_tokens=False))
    return "".join(out)


def describe(
    encoded: dict[str, Any],
    files: dict[str, list[str]],
    slots: dict[str, list[int]],
    tokenizer: Any,
) -> dict[str, Any]:
    """One encoded sample (:func:`mmbridge.data.dataset.encode_sample`) -> the inspect record:
    ``id``, ``text``, ``input_ids``, ``labels``, ``media`` (kind, file, first_slot, slots) and
    ``supervised`` (the supervised text, run by run).

    Args:
        encoded: The encoded sample.
        files: Modality -> the sample's files, in placeholder order.
        slots: Modality -> each file's slot count, in the same order.
        tokenizer: Decodes the text runs.
    """
    ids, labels, where = encoded["input_ids"], encoded["labels"], encoded["slot_modality"]
    text: list[str] = []
    media: list[dict[str, Any]] = []
    supervised: list[str] = []
    seen = dict.fromkeys(files, 0)
    i = 0
    while i < len(ids):
        j = i
        kind = where[i]
        while j < len(ids) and where[j] == kind:
            j += 1
        if kind and kind in files:
            start = i  # a run may hold several items back to back: split it by their counts
            while start < j and seen[kind] < len(files[kind]):
                count = slots[kind][seen[kind]]
                media.append(
                    {
                        "kind": kind,
                        "file": files[kind][seen[kind]],
                        "first_slot": start,
                        "slots": count,
                    }
                )
                text.append(_marker(kind, count))
                seen[kind] += 1
                start += count
        elif kind:
            text.append(_marker(kind, j - i))  # a sequence prefix (AlignGPT's level tokens)
        else:
            text.append(_decode(tokenizer, ids[i:j]))
            k = i
            while k < j:  # the supervised runs inside this text run
                if labels[k] == IGNORE:
                    k += 1
                    continue
                e = k
                while e < j and labels[e] != IGNORE:
                    e += 1
                supervised.append(_decode(tokenizer, ids[k:e]))
                k = e
        i = j
    return {
        "id": encoded["id"],
        "text": "".join(text),
        "input_ids": list(ids),
        "labels": list(labels),
        "media": media,
        "supervised": supervised,
    }


def _write_images(encoded: dict[str, Any], model: Any, folder: Path) -> list[str]:
    """The preprocessed image tensors of one sample as PNGs (mean / std undone); their paths."""
    out = []
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(encoded["id"]))
    for modality, items in encoded["media"].items():
        enc = model.branches[modality].encoder
        for k, (item, _, _cached) in enumerate(items):
            if not isinstance(item, torch.Tensor) or item.dim() != 3 or item.shape[0] != 3:
                continue
            mean = torch.tensor(getattr(enc, "mean", (0.0, 0.0, 0.0))).view(3, 1, 1)
            std = torch.tensor(getattr(enc, "std", (1.0, 1.0, 1.0))).view(3, 1, 1)
            x = ((item.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
            path = folder / f"{safe}_{modality}{k}.png"
            Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy())).save(path)
            out.append(str(path))
    return out


def inspect(
    overrides: Sequence[str] = (),
    stage: str | None = None,
    n: int = 2,
    images: str | Path | None = None,
    registry: Registry | None = None,
) -> list[dict[str, Any]]:
    """The first ``n`` samples of ``stage`` as the model sees them.

    Args:
        overrides: Hydra overrides, as for ``mmbridge train`` (``experiment=tiny``, ...).
        stage: A key of ``stages`` (default: the schedule's first).
        n: How many samples (from the start of the stage's split, after its recipe).
        images: A folder to write each sample's preprocessed images to (PNG, named
            ``{id}_{modality}{k}.png``; their paths under ``images`` in each record).
        registry: The component registry (default: built with the installed plugins).

    Returns:
        One dict per sample: ``id``, ``text`` (media spans as ``<image xN>``), ``input_ids``,
        ``labels`` (``-100`` = not supervised), ``media`` (``kind``, ``file``, ``first_slot``,
        ``slots``), ``supervised`` (the supervised text, run by run), ``conversation`` (the
        format and the key it came from), ``stage``.

    Raises:
        ConfigError: an unknown stage, ``n < 1``, or an invalid config.
    """
    # the run layer (torch, lightning, transformers) on demand: `import mmbridge` stays light
    from mmbridge.runtime.session import Session, load_splits, load_stage_splits
    from mmbridge.runtime.stage import prepare_stage

    if n < 1:
        raise ConfigError(f"n={n}: expected a number of samples >= 1")
    registry = registry or plugin_manager.load_registry()
    cfg = compose(list(overrides), registry)
    validate_config(cfg, registry)
    run = RunConfig.parse(cfg)
    name = str(stage if stage is not None else run.schedule[0])
    if name not in run.stages:
        raise ConfigError(f"stage={name}: not a key of stages; stages: {', '.join(run.stages)}")
    model_cfg = _float32_encoders(run.model)
    model = assemble(model_cfg, registry, llm=_front_end_llm(model_cfg["llm"], registry))
    tokenizer = model.llm.tokenizer
    prefix = model.prefix
    chat = ChatEncoder(
        tokenizer,
        list(model.branches),
        max_length=run.loader.max_text_tokens,
        prefix_tokens=prefix.n_tokens if prefix is not None else 0,
        meta_keys=prefix.meta_keys if prefix is not None else (),
        conversation=run.conversation_of()[0],
    )  # the run's, as open_session's
    # only the data the stage reads: its own stages.<name>.data, else the run's
    own = run.stages[name].data is not None
    session = Session(
        cfg,
        registry,
        model,
        chat,
        {} if own else load_splits(run, registry),
        stage_splits=load_stage_splits(run, registry, stages=[name]) if own else {},
    )
    session.run = run
    data = session.data_of(name)
    split = run.stages[name].split
    if split not in data:
        raise ConfigError(
            f"stages.{name}.split: '{split}' is not a split of the stage's data; "
            f"splits: {', '.join(data)}"
        )
    raw = data[split]
    head = raw if len(raw) <= WHOLE_SPLIT else raw[: 4 * n + 8]
    stage_data = prepare_stage(session, name, samples=head, check=False)
    spec, key = run.conversation_of(name)
    folder = Path(images) if images is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(min(n, len(stage_data.train_ds))):
        sample = stage_data.train_ds.samples[k]
        encoded = stage_data.train_ds[k]
        files = {m: sample.paths(m) for m in sample.media}
        slots = {m: [stage_data.batcher.reader.slots(m, f) for f in fs] for m, fs in files.items()}
        record = describe(encoded, files, slots, tokenizer)
        record["stage"], record["conversation"] = name, {"name": spec.name, "key": key}
        if folder is not None:
            record["images"] = _write_images(encoded, model, folder)
        out.append(record)
    return out


def format_records(records: Sequence[dict[str, Any]]) -> str:
    """The human-readable form of :func:`inspect`'s records."""
    lines = []
    for r in records:
        sup = sum(label != IGNORE for label in r["labels"])
        lines += [
            f"== sample {r['id']} (stage {r['stage']}, conversation {r['conversation']['name']} "
            f"from {r['conversation']['key']}): {len(r['input_ids'])} tokens, {sup} supervised",
            r["text"],
            "-- supervised:",
        ]
        lines += [f"   {s!r}" for s in r["supervised"]] or ["   (none)"]
        for m in r["media"]:
            lines.append(
                f"-- {m['kind']} {m['file']}: slots "
                f"{m['first_slot']}..{m['first_slot'] + m['slots'] - 1}"
                f" ({m['slots']})"
            )
        lines += [f"-- image written: {p}" for p in r.get("images", [])]
        lines.append("-- input_ids: " + " ".join(map(str, r["input_ids"])))
        lines.append("")
    return "\n".join(lines)


__all__ = ["describe", "format_records", "inspect"]
