"""Shared parts of the image encoders: loading, deterministic preprocessing with PIL + torch,
token-grid pooling, example media, weight fingerprints and pruning of unused parameters."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from mmbridge.errors import ConfigError
from mmbridge.utils.media_io import (  # noqa: F401 - the encoders' (and their tests') names
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    load_rgb,
    max_image_pixels,
    open_image,
)

#: PIL resampling filters by the integer codes HF image processors store.
RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``image_aspect_ratio`` options: ``square`` = the encoder's own resize / crop; ``pad`` = first
#: padded to a square with the mean colour (LLaVA-1.5's ``--image_aspect_ratio pad``).
ASPECT_RATIOS = ("square", "pad")


def pads_to_square(image_aspect_ratio: str, key: str = "encoder.image_aspect_ratio") -> bool:
    """Whether ``image_aspect_ratio`` asks for padding; a :class:`ConfigError` for other values."""
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise ConfigError(
            f"{key}: {image_aspect_ratio!r} is not an option; valid: {', '.join(ASPECT_RATIOS)}"
        )
    return image_aspect_ratio == "pad"


def expand_to_square(img: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: a non-square image centred on a square canvas of side
    ``max(w, h)`` filled with the normalisation mean as a colour (``int(m * 255)`` per channel;
    the pad is then ~0 after normalisation), the short side centred (offset rounded down).
    A square image is returned as is."""
    w, h = img.size
    if w == h:
        return img
    canvas = Image.new(img.mode, (max(w, h),) * 2, tuple(int(m * 255) for m in mean))
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def image_to_tensor(
    img: Image.Image,
    size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resample: int = 3,
    resize_shortest: int | None = None,
) -> torch.Tensor:
    """Resize, (centre-crop,) scale to [0, 1] and normalise.

    Args:
        img: An RGB image.
        size: Output ``(H, W)``.
        mean, std: Per-channel normalisation.
        resample: PIL filter code (3 = bicubic).
        resize_shortest: Resize the shortest side to this (keeping the aspect ratio), then crop
            the centre ``size``; ``None`` resizes straight to ``size``.

    Returns:
        ``[3, H, W]`` float32.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    h, w = size
    filt = RESAMPLE.get(int(resample), Image.Resampling.BICUBIC)
    if resize_shortest:
        # Rounded down, like HF's image processors (their output must be reproduced exactly).
        short, long = sorted((img.width, img.height))
        side = (resize_shortest, int(resize_shortest * long / short))
        new = side if img.width <= img.height else side[::-1]
        if new != img.size:
            img = img.resize(new, filt)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
    elif img.size != (w, h):
        img = img.resize((w, h), filt)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def check_pool_to(pool_to: int | None, grid: int, key: str) -> None:
    if pool_to is not None and not 1 <= pool_to <= grid:
        raise ConfigError(
            f"{key}: {pool_to} must be between 1 and the patch grid size {grid} "
            f"(or null for no pooling)"
        )


def pool_grid(tokens: torch.Tensor, pool_to: int) -> torch.Tensor:
    """Adaptive average pooling of a square patch grid: ``[B, g*g, D]`` -> ``[B, p*p, D]``."""
    b, n, d = tokens.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"pooling needs a square patch grid, got {n} tokens")
    grid = tokens.transpose(1, 2).reshape(b, d, g, g)
    return F.adaptive_avg_pool2d(grid, pool_to).flatten(2).transpose(1, 2)


def example_png(tmp_dir: Path, index: int = 0, size: int = 48) -> str:
    """Write a small PNG (a few coloured shapes that differ by ``index``) and return its path."""
    colours = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (240, 210, 30)]
    img = Image.new("RGB", (size + 8 * (index % 2), size), (120, 120, 120))
    draw = ImageDraw.Draw(img)
    for k in range(1 + index % 3):
        c = colours[(index + k) % len(colours)]
        x0, y0 = (7 * index + 13 * k) % (size // 2), (5 * index + 17 * k) % (size // 2)
        box = (x0, y0, x0 + size // 3, y0 + size // 3)
        (draw.ellipse if (index + k) % 2 else draw.rectangle)(box, fill=c)
    path = Path(tmp_dir) / f"example-{index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return str(path)


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of all weights: every tensor's name, shape, dtype and two float64 sums
    (one pass over the weights; cheap even for large towers)."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t64 = t.detach().double() if t.is_floating_point() else t.detach().to(torch.float64)
            h.update(
                f"{name}:{tuple(t.shape)}:{t.dtype}:{t64.sum().item():.10e}:"
                f"{t64.abs().sum().item():.10e};".encode()
            )
    return h.hexdigest()[:16]


def demote_unused_parameters(module: nn.Module, run: Callable[[], torch.Tensor]) -> list[str]:
    """Turn the parameters that ``run()`` (a forward pass producing the features) does not
    depend on into buffers, so they never train, never count as trainable, and DDP does not
    see unused parameters (e.g. a pooler head or DINOv2's mask token). The state dict keeps
    its keys. Returns the names moved."""
    was_training = module.training
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    module.eval()
    module.requires_grad_(True)
    try:
        with torch.enable_grad():
            run().float().sum().backward()
        unused = [n for n, p in module.named_parameters() if p.grad is None]
        for p in module.parameters():
            p.grad = None
    finally:
        module.train(was_training)
        for n, p in module.named_parameters():
            p.requires_grad_(flags[n])
    for name in unused:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = getattr(owner, attr).detach()
        delattr(owner, attr)
        owner.register_buffer(attr, value)
    return unused
