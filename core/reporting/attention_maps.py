"""Attention maps: which image patches a connector's queries (or the text, for gated
cross-attention) look at, drawn over the image.

Connectors that can record their attention (the Q-Former, the Perceiver Resampler and
Flamingo's gated cross-attention) have a ``record_attention`` switch and an
``attention_maps()`` method returning ``[B, queries, N]`` weights over the ``N`` features
(rows sum to 1). Recording is off by default; off, their forward does no extra work.

    with recording(model) as connector:
        model.generate(batch)
    maps = connector.attention_maps()[0]            # [queries, N]
    overlay(image, maps, feature_grid(model, maps.shape[-1])).save("attention.png")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmbridge.contracts.types import Sample
from mmbridge.errors import ConfigError
from mmbridge.model import MultimodalModel

#: Connectors that record their attention (their registered names, for error messages).
RECORDING_CONNECTORS = ("qformer", "resampler", "gated_xattn")
#: A perceptually ordered dark-to-bright colour ramp (anchors of matplotlib's "inferno").
_RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


@runtime_checkable
class RecordsAttention(Protocol):
    """A connector that can record where its queries attend."""

    record_attention: bool

    def attention_maps(self) -> torch.Tensor: ...


@contextmanager
def recording(model: MultimodalModel, modality: str = "image") -> Iterator[RecordsAttention]:
    """Switch on the attention recording of ``model``'s ``modality`` connector for the block.

    Raises:
        ConfigError: the model has no such branch, or its connector records no attention.
    """
    if modality not in model.branches:
        raise ConfigError(
            f"attention=...: the model has no {modality} branch; it has "
            f"{', '.join(model.branches) or 'none'}"
        )
    connector = model.branches[modality].connector
    if not isinstance(connector, RecordsAttention):
        raise ConfigError(
            f"attention=...: the {modality} connector "
            f"({type(connector).__name__}) records no attention; attention maps "
            f"exist for the connectors {', '.join(RECORDING_CONNECTORS)}"
        )
    connector.record_attention = True
    try:
        yield connector
    finally:
        connector.record_attention = False


def feature_grid(
    model: MultimodalModel | None, n: int, modality: str = "image"
) -> tuple[int, int, int]:
    """``(rows, cols, prefix)``: how the ``n`` features lie on the image. The encoder's own
    patch grid when it has one (``grid`` and ``prefix`` tokens such as CLS), else a square
    grid of ``n`` or of ``n - 1`` (a leading CLS token).

    Raises:
        ConfigError: ``n`` features make no grid (e.g. pooled to one vector).
    """
    encoder = model.branches[modality].encoder if model is not None else None
    grid = getattr(encoder, "grid", None)
    pool = getattr(encoder, "pool_to", None)
    if isinstance(pool, int) and pool * pool <= n:
        return pool, pool, n - pool * pool
    if isinstance(grid, int):
        grid = (grid, grid)
    if grid is not None and n >= grid[0] * grid[1]:
        return int(grid[0]), int(grid[1]), n - grid[0] * grid[1]
    for prefix in (0, 1):
        side = math.isqrt(n - prefix)
        if side > 0 and side * side == n - prefix:
            return side, side, prefix
    raise ConfigError(
        f"attention=...: the encoder gives {n} features, which lie on no square "
        f"patch grid (with or without one CLS token); no map can be drawn"
    )


def colorize(heat: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ``[H, W]`` -> RGB ``uint8 [H, W, 3]`` on the dark-to-bright ramp."""
    x = np.clip(heat, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return ((1 - t) * _RAMP[lo] + t * _RAMP[lo + 1]).astype(np.uint8)


def heat_panel(
    image: Image.Image,
    weights: torch.Tensor,
    grid: tuple[int, int, int],
    size: int,
    alpha: float = 0.6,
) -> Image.Image:
    """One ``size x size`` panel: ``image`` with one row of weights ``[N]`` over it (scaled from
    the row's smallest to its largest weight, nearest-neighbour upsampled to the image)."""
    rows, cols, prefix = grid
    w = weights.detach().float().cpu().numpy()[prefix : prefix + rows * cols].reshape(rows, cols)
    w = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)  # min-max: the contrast within a map
    heat = np.asarray(
        Image.fromarray((w * 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    )
    base = np.asarray(
        image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    mixed = (1 - alpha) * base + alpha * colorize(heat / 255.0).astype(np.float32)
    return Image.fromarray(mixed.astype(np.uint8))


def overlay(
    image: Image.Image,
    maps: torch.Tensor,
    grid: tuple[int, int, int],
    labels: Sequence[str] | None = None,
    size: int = 128,
    cols: int = 6,
    max_panels: int = 17,
) -> Image.Image:
    """A sheet of panels: the image, the mean over all rows of ``maps [Q, N]``, then each row
    (the first ``max_panels - 2``) with its label (default ``query i``).

    The sheet is ``cols * size`` wide (fewer columns when there are fewer panels) and
    ``(size + 16)`` tall per row of panels (16 px of caption).
    """
    if maps.dim() != 2:
        raise ValueError(f"maps must be [queries, features], got shape {tuple(maps.shape)}")
    labels = list(labels) if labels is not None else [f"query {i}" for i in range(len(maps))]
    panels = [
        ("image", image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)),
        (f"mean of {len(maps)}", heat_panel(image, maps.float().mean(0), grid, size)),
    ]
    panels += [
        (labels[i], heat_panel(image, maps[i], grid, size))
        for i in range(min(len(maps), max_panels - 2))
    ]
    cols = min(cols, len(panels))
    n_rows = -(-len(panels) // cols)
    sheet = Image.new("RGB", (cols * size, n_rows * (size + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (caption, panel) in enumerate(panels):
        x, y = (i % cols) * size, (i // cols) * (size + 16)
        sheet.paste(panel, (x, y + 16))
        draw.text((x + 3, y + 2), caption[: size // 6], fill="black")
    return sheet


def write_overlay(
    path: str | Path,
    image: Image.Image,
    maps: torch.Tensor,
    grid: tuple[int, int, int],
    labels: Sequence[str] | None = None,
) -> Path:
    """:func:`overlay` saved as a PNG at ``path`` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, maps, grid, labels).save(path, format="PNG")
    return path


def save_attention(
    model: MultimodalModel,
    connector: RecordsAttention,
    image: str | Path,
    path: str | Path,
    modality: str = "image",
) -> Path:
    """After a recorded forward of one sample: its maps over ``image`` written to ``path``.
    Rows are the connector's queries, or the text tokens for a connector whose output the
    text reads through cross-attention (Flamingo's gated blocks)."""
    maps = connector.attention_maps()[0]
    grid = feature_grid(model, maps.shape[-1], modality)
    word = "query" if getattr(connector, "in_sequence", True) else "token"
    with Image.open(image) as img:
        return write_overlay(path, img, maps, grid, [f"{word} {i}" for i in range(len(maps))])


def session_attention(
    session: Any, modality: str = "image"
) -> Callable[[str, str], Image.Image] | None:
    """For a run's session: a function drawing the attention sheet of ``(image, question)``
    (one greedy token generated under :func:`recording`), or None when the connector records
    no attention."""
    model: MultimodalModel = session.model
    if modality not in model.branches or not isinstance(
        model.branches[modality].connector, RecordsAttention
    ):
        return None

    def draw(image: str, question: str) -> Image.Image:
        sample = Sample(
            id="attention",
            media={modality: image},
            conversations=[{"from": "human", "value": question}],
        )
        batch = session.batcher(use_cache=False).batch([sample], generation=True)
        with torch.no_grad(), recording(model, modality) as connector:
            model.generate(batch, max_new_tokens=1)
        maps = connector.attention_maps()[0]
        word = "query" if getattr(connector, "in_sequence", True) else "token"
        with Image.open(image) as img:
            return overlay(
                img,
                maps,
                feature_grid(model, maps.shape[-1], modality),
                [f"{word} {i}" for i in range(len(maps))],
            )

    return draw
