"""Multimodal Converter family (2311.07594 §3.1): token-wise projections."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in converters."""
    from mmbridge.plugins.converters.abstractor import Abstractor
    from mmbridge.plugins.converters.linear import LinearConverter
    from mmbridge.plugins.converters.mlp import MLPConverter

    registry.add_connector("linear", LinearConverter)
    registry.add_connector("mlp", MLPConverter)
    registry.add_connector("abstractor", Abstractor)
    from mmbridge.plugins.converters.pool_mlp import PoolMLP

    registry.add_connector("pool_mlp", PoolMLP)
