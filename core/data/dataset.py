"""Torch datasets over samples: recipe -> media inputs (or cached features) -> tokens, and the
collator that pads a batch."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from mmbridge.contracts.connector import Connector
from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.chat import IGNORE, ChatEncoder, to_messages
from mmbridge.data.feature_cache import FeatureTable
from mmbridge.errors import DataError

log = logging.getLogger(__name__)


class _ByModality(Protocol):
    def items(self) -> Iterable[tuple[str, Any]]: ...


class _HasBranches(Protocol):
    @property
    def branches(self) -> _ByModality: ...


#: Modality -> branch (``model.branches``, a dict). The assembled model itself is accepted too
#: (its ``branches`` are taken), for the call sites that still pass it.
Branches = _ByModality | _HasBranches


def _branches(branches: Branches) -> dict[str, Any]:
    source = branches.branches if hasattr(branches, "branches") else branches
    return dict(source.items())


class MediaReader:
    """Per modality: read a media file into the encoder's input, or its cached features.

    Args:
        branches: Modality -> branch (``model.branches``): its encoder
            (``load``/``preprocess``/``num_tokens``) and connector (``out_tokens``).
        tables: Modality -> cached features; modalities without a table are encoded live.
    """

    def __init__(
        self, branches: Branches, tables: Mapping[str, FeatureTable] | None = None
    ) -> None:
        self.branches = {m: (b.encoder, b.connector) for m, b in _branches(branches).items()}
        self.tables = dict(tables or {})

    @property
    def modalities(self) -> list[str]:
        return list(self.branches)

    def _branch(self, modality: str, path: str | None = None) -> tuple[ModalityEncoder, Connector]:
        if modality not in self.branches:
            where = f" ({path})" if path else ""
            raise DataError(
                f"media '{modality}'{where} but the model has no {modality} encoder; "
                f"modalities: {', '.join(self.branches)}"
            )
        return self.branches[modality]

    def read(self, modality: str, path: str) -> tuple[Any, int, int, bool]:
        """``(item, N, M, cached)``: the input or cached features ``[N, D]`` of one media file,
        its feature count and the number of slots its connector fills."""
        encoder, connector = self._branch(modality, path)
        table = self.tables.get(modality)
        if table is not None and path in table:
            feats = table.lookup(path)
            item, n, cached = feats, feats.shape[0], True
        else:
            item = encoder.preprocess(encoder.load(path))
            n, cached = encoder.num_tokens(item), False
        m = connector.out_tokens(n) if connector.in_sequence else 0
        return item, n, m, cached

    def slots(self, modality: str, path: str) -> int:
        """The number of slots one media file fills (``M`` of :meth:`read`). A cached file's
        feature count comes from the table's stored lengths: no feature row is read."""
        encoder, connector = self._branch(modality, path)
        table = self.tables.get(modality)
        if table is not None and path in table:
            n = table.length(path)
        else:
            n = encoder.num_tokens(encoder.preprocess(encoder.load(path)))
        return connector.out_tokens(n) if connector.in_sequence else 0

    def in_sequence(self, modality: str) -> bool:
        """Whether the modality's connector puts its tokens into the sequence (slots)."""
        return self._branch(modality)[1].in_sequence


class ConversationDataset(Dataset):
    """Samples -> (recipe) -> tokenized conversations with media, for training and validation.

    The recipe runs once per sample here, when the data set is built, with the same per-sample
    seeded rng as ever (``seed:index:id``): a sample it maps to ``None`` is dropped
    (:class:`~mmbridge.contracts.recipe.DataRecipe`'s contract), so that the indices a sampler
    draws stay dense. The dropped ids are kept in :attr:`dropped` and counted in one log line.

    Args:
        samples: The split's samples (already annotated by the recipe).
        recipe: The stage's recipe.
        reader: Media inputs / cached features.
        chat: The tokenizer front end.
        seed: Seeds each sample's recipe rng together with its index.
        split: Names the split in the log line and in errors.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        recipe: DataRecipe,
        reader: MediaReader,
        chat: ChatEncoder,
        seed: int = 0,
        split: str = "",
    ) -> None:
        self.recipe = recipe
        self.reader = reader
        self.chat = chat
        self.seed = seed
        self.split = split
        self.samples: list[Sample] = []
        self.dropped: list[str] = []
        for i, raw in enumerate(samples):
            out = recipe(raw, random.Random(f"{seed}:{i}:{raw.id}"))
            if out is None:
                self.dropped.append(raw.id)
            else:
                self.samples.append(out)
        if self.dropped:
            log.info(
                "recipe %s dropped %d of %d samples of split '%s' (first: %s)",
                type(recipe).__name__,
                len(self.dropped),
                len(samples),
                split or "?",
                ", ".join(self.dropped[:3]),
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return encode_sample(self.samples[i], self.reader, self.chat)


@dataclass
class TruncationReport:
    """How ``loader.max_text_tokens`` cut one split's answers (see :func:`truncation_report`)."""

    split: str
    samples: int
    truncated: int  # samples that lost answer tokens
    supervised: int  # answer tokens kept
    cut: int  # answer tokens cut away
    dropped: int = 0  # samples the recipe dropped
    truncated_ids: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Share of the split's samples that lost answer tokens."""
        return self.truncated / self.samples if self.samples else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "samples": self.samples,
            "truncated": self.truncated,
            "share": self.share,
            "supervised_tokens": self.supervised,
            "cut_tokens": self.cut,
            "dropped_by_recipe": self.dropped,
            "truncated_ids": self.truncated_ids[:20],
        }

    def summary(self) -> str:
        return (
            f"split '{self.split}': {self.truncated} of {self.samples} samples "
            f"({self.share:.1%}) lose answer tokens to loader.max_text_tokens "
            f"({self.cut} cut, {self.supervised} kept)"
        )


def truncation_report(dataset: ConversationDataset) -> TruncationReport:
    """Encode every sample of ``dataset`` once (text, with each media item's slot count) and
    count what ``loader.max_text_tokens`` cuts from the answers.

    Slot counts come through the data set's reader: a cached file's from the feature table's
    stored lengths (no feature row is read), a live one by decoding the file once here.
    """
    truncated, supervised, cut = [], 0, 0
    for sample in dataset.samples:
        slots = {m: [dataset.reader.slots(m, p) for p in sample.paths(m)] for m in sample.media}
        enc = dataset.chat.encode(to_messages(sample.conversations), slots, sample_id=sample.id)
        supervised += enc.supervised
        cut += enc.cut_labels
        if enc.cut_labels:
            truncated.append(sample.id)
    return TruncationReport(
        dataset.split,
        len(dataset),
        len(truncated),
        supervised,
        cut,
        len(dataset.dropped),
        truncated,
    )


def check_truncation(
    reports: Sequence[TruncationReport], max_share: float = 0.05, stage: str = ""
) -> None:
    """Log one line per split that loses answer tokens; raise when a split keeps no supervised
    token at all, or when more than ``max_share`` of its samples lose answer tokens.

    Raises:
        DataError: naming the split, the stage, ``loader.max_text_tokens`` and
            ``loader.max_truncated_share``.
    """
    where = f"stages.{stage}: " if stage else ""
    for r in reports:
        if r.truncated:
            log.warning("%s%s", where, r.summary())
        if r.samples == 0:
            if r.split == "val":
                continue
            key = f"stages.{stage}.recipe" if stage else "the stage's recipe"
            raise DataError(
                f"{where}split '{r.split}' has no sample to train on"
                + (
                    f" (the recipe dropped all {r.dropped}; see {key})"
                    if r.dropped
                    else f": the data set's '{r.split}' split is empty "
                    f"(see data.{r.split}=FILE for "
                    f"a file data set, data.n_{r.split} for a generated one"
                    + (f", stages.{stage}.split" if stage else "")
                    + ")"
                )
            )
        if r.supervised == 0:
            raise DataError(
                f"{where}split '{r.split}' has no supervised (answer) token left: "
                f"{r.summary()}; raise loader.max_text_tokens"
            )
        if r.share > max_share:
            raise DataError(
                f"{where}{r.summary()}, above loader.max_truncated_share={max_share}; "
                f"raise loader.max_text_tokens (or loader.max_truncated_share to accept it)"
            )


def encode_sample(
    sample: Sample, reader: MediaReader, chat: ChatEncoder, add_generation_prompt: bool = False
) -> dict[str, Any]:
    """One sample -> ids, labels, slot positions and media items.

    ``media[modality]`` is a list of ``(item, N, cached)``, one per file of the modality in
    placeholder order: the k-th file's connector tokens fill the k-th placeholder's slots.

    Raises:
        DataError: a placeholder / media count mismatch, or several files of a modality whose
            connector is not in the sequence (cross-attention reads one media item per sample).
    """
    media, slots = {}, {}
    for modality in sample.media:
        paths = sample.paths(modality)
        if len(paths) > 1 and not reader.in_sequence(modality):
            raise DataError(
                f"sample {sample.id}: {len(paths)} {modality} files, but the {modality} "
                f"connector is not in the sequence (cross-attention context holds one "
                f"{modality} item per sample); use one {modality} per record or an "
                f"in-sequence connector"
            )
        reads = [reader.read(modality, p) for p in paths]
        media[modality] = [(item, n, cached) for item, n, _, cached in reads]
        slots[modality] = [m for _, _, m, _ in reads]
    try:
        messages = to_messages(sample.conversations)
    except DataError as exc:
        raise DataError(f"sample {sample.id}: {exc}") from None
    enc = chat.encode(
        messages, slots, add_generation_prompt=add_generation_prompt, sample_id=sample.id
    )
    meta = {k: sample.meta.get(k, -1) for k in chat.meta_keys}
    return {
        "id": sample.id,
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "slot_modality": enc.slot_modality,
        "media": media,
        "meta": meta,
    }


def strip_media(sample: Sample) -> Sample:
    """The same sample without media and placeholders (the LLM-alone baseline)."""
    convs = []
    for t in sample.conversations:
        v = t["value"]
        for m in sample.media:
            v = v.replace(placeholder(m) + "\n", "").replace(placeholder(m), "")
        convs.append({**t, "value": v.strip()})
    return sample.replace(media={}, conversations=convs)


class Collator:
    """Pads a list of encoded samples into a batch (right padding for training, left for
    generation) and groups media per modality.

    Batch keys: ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B, T]``,
    ``slots[modality] [B, T]`` (bool), ``media[modality]`` = ``features [B', N, D]`` +
    ``feature_mask [B', N]`` (cached) or ``inputs`` (collated by the encoder), ``ids``.
    ``B'`` counts the modality's media items: row by row, each row's files in placeholder
    order (a text-only row adds none, a two-image row two), the order in which the slots
    appear in ``slots[modality]`` read row-major.

    Args:
        pad_id: The padding token id.
        branches: Modality -> branch (``model.branches``) or modality -> encoder; only the
            encoders' ``collate`` is used.
        left_pad: Pad on the left (generation) instead of the right (training).
    """

    def __init__(self, pad_id: int, branches: Branches, left_pad: bool = False) -> None:
        self.pad_id = pad_id
        self.encoders = {m: getattr(b, "encoder", b) for m, b in _branches(branches).items()}
        self.left_pad = left_pad

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        t = max(len(x["input_ids"]) for x in items)
        b = len(items)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        attn = torch.zeros((b, t), dtype=torch.long)
        modalities = sorted({m for x in items for m in x["media"]})
        slot_names = sorted({w for x in items for w in x["slot_modality"] if w} | set(modalities))
        slots = {m: torch.zeros((b, t), dtype=torch.bool) for m in slot_names}
        for r, x in enumerate(items):
            n = len(x["input_ids"])
            sl = slice(t - n, t) if self.left_pad else slice(0, n)
            ids[r, sl] = torch.tensor(x["input_ids"])
            labels[r, sl] = torch.tensor(x["labels"])
            attn[r, sl] = 1
            for m in slot_names:
                slots[m][r, sl] = torch.tensor([w == m for w in x["slot_modality"]])
        media = {}
        for m in modalities:
            # samples without this modality have no slots for it and no row here; a sample with
            # several files of it has one row per file, in placeholder order
            group = [g for x in items for g in x["media"].get(m, ())]
            if all(g[2] for g in group):
                n_max = max(g[1] for g in group)
                feats = torch.zeros(len(group), n_max, group[0][0].shape[-1])
                fmask = torch.zeros(len(group), n_max, dtype=torch.bool)
                for k, (f, n, _) in enumerate(group):
                    feats[k, :n] = f
                    fmask[k, :n] = True
                media[m] = {"features": feats, "feature_mask": fmask}
            elif not any(g[2] for g in group):
                media[m] = {"inputs": self.encoders[m].collate([g[0] for g in group])}
            else:
                raise DataError(
                    f"batch mixes cached and live {m} inputs; the feature cache "
                    f"must cover every {m} file of the split"
                )
        meta_keys = sorted({k for x in items for k in x.get("meta", {})})
        meta = {k: torch.tensor([int(x["meta"].get(k, -1)) for x in items]) for k in meta_keys}
        return {
            "input_ids": ids,
            "attention_mask": attn,
            "labels": labels,
            "slots": slots,
            "media": media,
            "meta": meta,
            "ids": [x["id"] for x in items],
        }
