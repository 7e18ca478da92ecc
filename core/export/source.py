"""Open what an export or :func:`mmbridge.load` is given: a checkpoint or a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmbridge.errors import CheckpointError
from mmbridge.export.bundle import open_bundle, read_manifest
from mmbridge.registry import Registry
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.runtime.session import session_from_checkpoint


def open_model(
    path: str | Path,
    overrides: list[str] | None = None,
    registry: Registry | None = None,
    device: str | torch.device | None = None,
    with_data: bool = False,
) -> tuple[Any, dict[str, str]]:
    """``(session, metadata)`` of an mmbridge checkpoint (``checkpoints/final`` or its weights
    file) or of a ``format=bundle`` export, with the model on ``device`` in eval mode.

    ``with_data`` also reads the stored config's data (with ``overrides``: ``data=...``,
    ``data.path=...``) into ``session.splits``, as ``mmbridge eval`` needs; a bundle carries no
    data, so its data must be available where it is loaded.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"'{path}' does not exist (pass a run's checkpoints/final directory "
            f"or a format=bundle export)"
        )
    registry = registry or load_registry()
    manifest = read_manifest(p) if p.is_dir() else None
    if manifest is not None:
        return open_bundle(p, overrides, registry=registry, device=device, with_data=with_data)
    return session_from_checkpoint(
        str(p), overrides, with_data=with_data, registry=registry, device=device
    )


def run_directory(path: str | Path) -> Path | None:
    """The run directory a checkpoint belongs to (the one holding ``metrics.json``), if any."""
    p = Path(path).expanduser().resolve()
    return next((d for d in [p, *p.parents][:4] if (d / "metrics.json").is_file()), None)
