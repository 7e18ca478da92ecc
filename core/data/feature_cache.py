"""The frozen-encoder feature cache.

Features are computed once per (encoder identity, media set) and reused by every later run.
The key hashes the encoder's :meth:`~mmbridge.ModalityEncoder.cache_identity` (class,
arguments, preprocessing, weights fingerprint) and the sorted list of media files with their
sizes and modification times, so any change of either makes a new entry. Entries are written
to a temporary file and renamed into place under a file lock: two runs filling the same entry
at once compute it once, and a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from mmbridge.encoder import ModalityEncoder

FORMAT_VERSION = 1


def _media_fingerprint(paths: Sequence[str]) -> list[list]:
    out = []
    for p in sorted(set(paths)):
        st = os.stat(p)
        out.append([p, st.st_size, int(st.st_mtime)])
    return out


def cache_key(encoder: ModalityEncoder, paths: Sequence[str], autocast: str | None = None) -> str:
    payload = {"v": FORMAT_VERSION, "encoder": encoder.cache_identity(), "media": _media_fingerprint(paths),
               "autocast": autocast}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class FeatureTable:
    """Cached features of a set of media files: ``lookup(path) -> (features [N, D], N)``."""

    def __init__(self, features: torch.Tensor, lengths: torch.Tensor, index: dict[str, int]) -> None:
        self.features = features  # [S, N_max, D] (float16)
        self.lengths = lengths  # [S]
        self.index = index

    def lookup(self, path: str) -> torch.Tensor:
        row = self.index[path]
        return self.features[row, : int(self.lengths[row])]

    def __contains__(self, path: str) -> bool:
        return path in self.index


def _compute(encoder: ModalityEncoder, paths: list[str], batch_size: int, desc: str,
             autocast: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from rich.progress import Progress

    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    chunks, lengths = [], []
    was_training = encoder.training
    encoder.eval()
    amp = torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()
    with Progress(transient=True) as progress, torch.inference_mode(), amp:
        task = progress.add_task(desc, total=len(paths))
        for i in range(0, len(paths), batch_size):
            batch_paths = paths[i : i + batch_size]
            items = [encoder.preprocess(encoder.load(p)) for p in batch_paths]
            feats, mask = encoder(_to_device(encoder.collate(items), device))
            for f, m in zip(feats, mask):
                n = int(m.sum())
                chunks.append(f[:n].float().cpu())
                lengths.append(n)
            progress.advance(task, len(batch_paths))
    encoder.train(was_training)
    n_max, dim = max(lengths), chunks[0].shape[-1]
    table = torch.zeros(len(chunks), n_max, dim, dtype=torch.float16)
    for k, c in enumerate(chunks):
        table[k, : c.shape[0]] = c.to(torch.float16)
    return table, torch.tensor(lengths, dtype=torch.int64)


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def load_or_compute(encoder: ModalityEncoder, paths: Sequence[str], cache_dir: Path,
                    batch_size: int = 32, autocast: str | None = None) -> tuple[FeatureTable, dict]:
    """The features of ``paths`` from the cache, computing and storing them if missing.

    ``autocast`` (e.g. ``"bfloat16"``) runs the encoder under autocast, as training would under
    ``bf16-mixed``; it is part of the key.

    Returns the table and a stats dict (``hit``, ``seconds``, ``key``, ``path``).
    """
    unique = sorted(set(paths))
    key = cache_key(encoder, unique, autocast)
    entry = Path(cache_dir) / f"{encoder.modality}-{key}.safetensors"
    t0 = time.perf_counter()
    hit = entry.is_file()
    if not hit:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            hit = entry.is_file()  # another run may have filled it while we waited
            if not hit:
                table, lengths = _compute(encoder, unique, batch_size, f"caching {encoder.modality} features",
                                          autocast)
                tmp = entry.with_suffix(f".tmp{os.getpid()}")
                save_file({"features": table, "lengths": lengths}, str(tmp),
                          metadata={"paths": json.dumps(unique), "identity": json.dumps(encoder.cache_identity(), default=str)})
                os.replace(tmp, entry)
    tensors = load_file(str(entry))
    from safetensors import safe_open

    with safe_open(str(entry), "pt") as f:
        stored = json.loads(f.metadata()["paths"])
    table = FeatureTable(tensors["features"], tensors["lengths"], {p: k for k, p in enumerate(stored)})
    return table, {"hit": hit, "seconds": time.perf_counter() - t0, "key": key, "path": str(entry)}
