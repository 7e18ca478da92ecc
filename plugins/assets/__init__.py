"""Offline model catalogue: real pretrained weights from locally installed packages.

Each asset converts a weight package (installed by ``scripts/setup_assets.sh``) once into a
standard format in mmbridge's cache; see :mod:`mmbridge.registry.assets`. The asset modules import
their heavy libraries (transformers, onnx, whisper, gguf) only when converting, so
registering them is cheap.
"""

from __future__ import annotations

import mmbridge
from mmbridge.registry import Registrar, register_package


@mmbridge.hookimpl
def register_components(registry: Registrar) -> None:
    """Register the built-in assets: the ``COMPONENTS`` table of each module of this package."""
    register_package(registry, __name__)
