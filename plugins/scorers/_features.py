"""Frozen features of image-text pairs for scorers: the text of a pair, the media side pooled
from the run's encoder (cached features when the run has them), and the text side from a frozen
HF text encoder, mean-pooled and cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmbridge.contracts.types import Sample
from mmbridge.errors import ConfigError, DataError

if TYPE_CHECKING:
    from mmbridge.contracts.recipe import RecipeContext


def pair_text(sample: Sample) -> str:
    """The text side of a sample's pair: its caption (``meta["caption"]``, else its first
    answer). A sample without one is an error naming it."""
    text = sample.caption()
    if text is None:
        raise DataError(f"sample {sample.id}: no caption (meta.caption) and no answer to score")
    return text


def media_paths(samples: Sequence[Sample], modality: str) -> list[str]:
    out = []
    for s in samples:
        if modality not in s.media:
            raise DataError(
                f"sample {s.id}: no {modality} to score (media: {', '.join(s.media) or 'none'})"
            )
        out.append(s.single_media()[modality])
    return out


@torch.no_grad()
def pooled_media_features(
    context: RecipeContext, samples: Sequence[Sample], modality: str, batch_size: int = 64
) -> torch.Tensor:
    """The run's encoder features of each sample's media, mean-pooled over tokens: ``[S, D]``.

    Read from the run's feature cache (``context.tables``) when it covers every file, else
    computed with ``context.model.branches[modality].encoder``.
    """
    paths = media_paths(samples, modality)
    table = context.tables.get(modality)
    if table is not None and all(p in table for p in paths):
        return torch.stack([table.lookup(p).float().mean(0) for p in paths])
    if modality not in context.model.branches:
        raise ConfigError(
            f"scorer: the model has no {modality} encoder; modalities: "
            f"{', '.join(context.model.branches)}"
        )
    encoder = context.model.branches[modality].encoder
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, len(paths), batch_size):
            items = [encoder.preprocess(encoder.load(p)) for p in paths[i : i + batch_size]]
            batch = encoder.collate(items)
            batch = (
                batch.to(device)
                if isinstance(batch, torch.Tensor)
                else {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                }
            )
            feats, mask = encoder(batch)  # [B, N, D], [B, N]
            m = mask.unsqueeze(-1).to(feats.dtype)
            out.append(((feats * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


class TextEncoder:
    """A frozen HF text encoder (``AutoModel``), token states mean-pooled over the attention
    mask (sentence-transformers' pooling of all-MiniLM-L6-v2): ``[S, E]``.

    Args:
        path: An HF model directory (or an asset name resolved by the caller).
        cache_dir: Where embeddings are kept, keyed by the model's files and the texts
            (``None``: no disk cache).
        batch_size: Texts per forward pass.
    """

    def __init__(self, path: str, cache_dir: Path | None = None, batch_size: int = 256) -> None:
        self.path = path
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            self._model = AutoModel.from_pretrained(self.path).eval()

    def _key(self, texts: Sequence[str]) -> str:
        root = Path(self.path)
        files = (
            sorted(
                (str(p.relative_to(root)), p.stat().st_size, int(p.stat().st_mtime))
                for p in root.rglob("*")
                if p.is_file()
            )
            if root.is_dir()
            else [self.path]
        )
        blob = json.dumps(
            {
                "model": [str(root.resolve()) if root.exists() else self.path, files],
                "texts": list(texts),
            }
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        entry = (
            self.cache_dir / f"text-{self._key(texts)}.pt" if self.cache_dir is not None else None
        )
        if entry is not None and entry.is_file():
            return torch.load(entry, weights_only=True)
        self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            # ids and mask only: every encoder takes them (token types default to zeros)
            tokens = self._model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state  # [B, T, E]
            m = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            out.append((tokens * m).sum(1) / m.sum(1).clamp(min=1))
        emb = torch.cat(out).float()
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".tmp{os.getpid()}")
            torch.save(emb, tmp)
            os.replace(tmp, entry)
        return emb
