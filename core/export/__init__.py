"""Trained models leave mmbridge: ``export(checkpoint, out, format)``.

* ``bundle`` - any model, one self-contained directory (:mod:`mmbridge.export.bundle`), loaded
  by :func:`mmbridge.load`;
* ``peft`` - the LLM's LoRA adapters in PEFT's format plus the connector weights
  (:mod:`mmbridge.export.peft_format`);
* ``hf`` - a ``transformers`` ``LlavaForConditionalGeneration`` with its processor, for the
  models Llava represents exactly (:mod:`mmbridge.export.hf`).

Every export holds ``mmbridge.json`` (what it is) and a model card ``README.md``. It is written
into a temporary directory beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mmbridge.config.model_spec import weight_nodes
from mmbridge.errors import ConfigError
from mmbridge.export.bundle import MANIFEST, bundle_config, model_files, read_manifest, write_bundle
from mmbridge.export.card import model_card
from mmbridge.export.source import open_model, run_directory
from mmbridge.registry import Registry
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.training.checkpoint import component_origins, read_checkpoint
from mmbridge.utils.io import check_free_space
from mmbridge.utils.run_lock import refuse_clobbering

FORMATS = ("hf", "peft", "bundle")


def _writer(fmt: str) -> Callable[[Any, dict[str, str], Path], dict[str, Any]]:
    # peft_format and hf import PEFT and transformers' Llava (a second): `mmbridge.load` and
    # `mmbridge eval` import this package (for .source) and need neither
    if fmt == "bundle":
        return write_bundle
    if fmt == "peft":
        from mmbridge.export.peft_format import write_peft

        return write_peft
    from mmbridge.export.hf import write_hf

    return write_hf


def _umask_permissions(root: Path) -> None:
    """Give ``root`` and everything in it the permissions a plain ``mkdir`` / ``open(.., "w")``
    would (``0o777`` / ``0o666`` less the umask): ``mkdtemp`` makes the directory ``0o700`` and
    safetensors writes its files ``0o600``, which would keep an export from anyone else."""
    mask = os.umask(0)
    os.umask(mask)
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else (path.stat().st_mode | 0o666) & 0o777) & ~mask)


def float32_overrides(checkpoint: str | Path, registry: Registry) -> list[str]:
    """``KEY.dtype=float32`` for every component node of the stored config that has a dtype
    (``llm``, ``encoder``, ``branches.*.encoder``: :func:`mmbridge.config.model_spec.weight_nodes`).

    ``format=hf`` rebuilds the model in float32 before writing it: Llava holds one dtype, where
    mmbridge runs a bf16 LLM (``dtype: auto`` on a CPU with native bf16) beside a float32
    connector and LoRA; merging the LoRA into bf16 weights would round it. The float32 export
    is the model exactly; load it with ``dtype=torch.bfloat16`` for speed.
    """
    p = Path(checkpoint).expanduser()
    manifest = read_manifest(p) if p.is_dir() else None
    cfg = (
        bundle_config(p, manifest, registry)[0]
        if manifest is not None
        else read_checkpoint(p, registry)[0]
    )
    return [
        f"{n.key}.dtype=float32"
        for n in weight_nodes(cfg)
        if OmegaConf.select(cfg, f"{n.key}.dtype") is not None
    ]


def export(
    checkpoint: str | Path,
    out: str | Path,
    format: str = "bundle",
    overwrite: bool = False,
    registry: Registry | None = None,
    device: str | torch.device | None = "cpu",
) -> Path:
    """Export a checkpoint (or a bundle) as ``format`` into the directory ``out``.

    Args:
        checkpoint: A run's ``checkpoints/final`` (or its weights file), or a bundle.
        out: The export directory (must not exist unless ``overwrite``).
        format: ``hf`` | ``peft`` | ``bundle``.
        overwrite: Replace an existing ``out``.
        registry: The component registry (default: built-ins and installed plugins).
        device: Where the model is rebuilt (``cpu`` by default; the export is on the CPU).

    Returns:
        ``out``.

    Raises:
        ConfigError: an unknown format, an existing ``out``, or (``hf``) a part Llava cannot
            represent exactly, named, with ``format=bundle`` as the way out.
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format}: unknown export format; valid: {', '.join(FORMATS)}")
    dst = Path(out).expanduser()
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(
            f"out={out}: exists and is not empty (choose another directory, or overwrite=true)"
        )
    refuse_clobbering(dst, _sources(checkpoint, run_directory(checkpoint)))  # overwrite=true too
    registry = registry or load_registry()
    overrides = float32_overrides(checkpoint, registry) if format == "hf" else None
    session, meta = open_model(checkpoint, overrides, registry=registry, device=device)
    if format == "hf":
        from mmbridge.export.hf import check_representable

        check_representable(session)  # before anything is written
    dst.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(dst.parent, _size_estimate(session, format), f"the {format} export")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        manifest = _writer(format)(session, meta, tmp)
        origins = component_origins(session.cfg, registry)
        (tmp / "README.md").write_text(
            model_card(
                session.run,
                origins,
                format,
                dst.resolve(),
                run_directory(checkpoint),
                manifest.pop("card", None),
            )
        )
        (tmp / MANIFEST).write_text(
            json.dumps({**manifest, "source": str(Path(checkpoint).resolve())}, indent=2) + "\n"
        )
        _umask_permissions(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _size_estimate(session: Any, fmt: str) -> int:
    """Bytes an export writes, about: the tensors (float32 for ``hf``, the trained ones alone
    for ``peft``) plus, for a bundle, the model files it copies."""
    model = session.model
    tensors = model.trainable_state_dict() if fmt == "peft" else model.state_dict()
    unique = {t.data_ptr(): t for t in tensors.values()}.values()  # tied weights once
    size = sum(t.numel() * (4 if fmt == "hf" else t.element_size()) for t in unique)
    if fmt == "bundle":
        for src in model_files(session.run.model, session.registry).values():
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            size += sum(p.stat().st_size for p in files)
    return size


def _sources(checkpoint: str | Path, run: Path | None) -> list[Path]:
    """What an export reads: the checkpoint (or bundle) and the run directory holding it."""
    p = Path(checkpoint).expanduser().resolve()
    found = [p, *([run] if run else [])]
    found += [d.parent for d in [p, *p.parents][:4] if d.name == "checkpoints"]
    return found


__all__ = ["FORMATS", "export", "float32_overrides"]
