"""Offline model catalogue: real pretrained weights from locally installed packages.

Each asset converts a weight package (installed by ``scripts/setup_assets.sh``) once into a
standard format in mmbridge's cache; see :mod:`mmbridge.assets`. The asset modules import
their heavy libraries (transformers, onnx, whisper, gguf) only when converting, so
registering them is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mmbridge

from .dinov2 import Dinov2SmallAsset
from .minilm import MiniLML6Asset
from .smollm2 import SmolLM2Asset
from .whisper_tiny import WhisperTinyEnAsset

if TYPE_CHECKING:
    from mmbridge.registry import Registrar

#: name -> asset class, in the order ``mmbridge assets`` lists them.
ASSETS = {
    "smollm2-135m-instruct": SmolLM2Asset,
    "dinov2-small": Dinov2SmallAsset,
    "whisper-tiny.en": WhisperTinyEnAsset,
    "minilm-l6": MiniLML6Asset,
}


@mmbridge.hookimpl
def register_components(registry: Registrar) -> None:
    """Register the built-in assets."""
    for name, cls in ASSETS.items():
        registry.add_asset(name, cls)
