"""``format=bundle``: one self-contained directory that rebuilds any mmbridge model.

Layout::

    mmbridge.json         what this is: format, mmbridge version, the plugin package and version
                          of each component, the stages, the copied files
    config.yaml           the composed config; model paths point into files/ (relative)
    weights.safetensors   every tensor of the model (frozen parts included), with the
                          checkpoint metadata (config, stages, components)
    files/<config key>/   each model file or directory the config named (asset, local path or
                          cached hub snapshot): weights, configs, tokenizer, preprocessor
    README.md             the model card

Loading it (:func:`open_bundle`) needs mmbridge and the plugins that built the components, but
neither the asset cache nor the data: the config's model paths are pointed at ``files/``
before anything is built, and every weight is then overwritten from ``weights.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub import snapshot_download
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_model

from mmbridge import __version__
from mmbridge.config import merge_overrides
from mmbridge.config.model_spec import model_nodes, node_at
from mmbridge.config.validation import validate_config
from mmbridge.errors import AssetError, CheckpointError, IntegrityError, reading
from mmbridge.registry import Registry
from mmbridge.registry.assets import resolve_model_path
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.runtime.session import open_session
from mmbridge.training.checkpoint import (
    FORMAT,
    FORMAT_PREFIX,
    WEIGHTS,
    check_components,
    component_origins,
)
from mmbridge.training.stages import configure_trainable

log = logging.getLogger(__name__)

MANIFEST = "mmbridge.json"
#: The bundle layout this version writes and reads.
BUNDLE_VERSION = 1
FILES = "files"


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The ``mmbridge.json`` of an export directory, ``None`` when there is none."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"'{file}' is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(
            f"'{file}': expected a JSON object (an export's manifest), "
            f"got {type(manifest).__name__}"
        )
    return manifest


def _model_leaves(model: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(config key, value)`` of every string leaf of the model's component nodes."""

    def walk(node: Any, key: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k != "name":
                    yield from walk(v, f"{key}.{k}")
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                yield from walk(v, f"{key}.{i}")
        elif isinstance(node, str):
            yield key, node

    # the model's nodes: mmbridge.config.model_spec
    for root in [n.key for n in model_nodes(model)]:
        yield from walk(node_at(model, root), root)


def _local_source(value: str, key: str, registry: Registry) -> Path | None:
    """The local file or directory a config value names (an offline asset, an existing path, or
    an ``org/name`` hub id in the local Hugging Face cache), else ``None`` (not a path)."""
    if ("asset", value) in registry:
        return Path(resolve_model_path(value, registry, key=key))
    p = Path(value).expanduser()
    if p.exists() and (p.is_dir() or p.is_file()) and ("/" in value or p.suffix):
        return p
    if value.count("/") == 1 and not value.startswith((".", "/", "~")) and " " not in value:
        try:
            return Path(snapshot_download(value, local_files_only=True))
        except Exception:  # not a hub id, or not cached: a plain string option
            return None
    return None


def model_files(model: Mapping[str, Any], registry: Registry) -> dict[str, Path]:
    """Config key -> the local file or directory it names, for every model file of the model's
    component nodes (``RunConfig.model``)."""
    return {
        k: src
        for k, v in _model_leaves(model)
        if (src := _local_source(v, k, registry)) is not None
    }


def write_bundle(session: Any, meta: dict[str, str], out: Path) -> dict[str, Any]:
    """Write the bundle of an opened model into the (empty, temporary) directory ``out``.

    Args:
        session: The :class:`~mmbridge.runtime.session.Session` of the model to export.
        meta: Its checkpoint metadata (stages, components, lora).
        out: The directory to fill.

    Returns:
        The manifest written to ``mmbridge.json``.
    """
    # the config as composed: the bundle stores it (config.yaml) with its model paths made
    # relative to the bundle
    cfg, registry = session.cfg, session.registry
    files: dict[str, str] = {}
    rel_cfg = cfg.copy()
    for key, src in model_files(session.run.model, registry).items():
        rel = f"{FILES}/{key}"
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        # copies the targets of links (a hub snapshot is links into its blob store)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock", ".*"))
        else:
            shutil.copy2(src, dst)
        files[key] = rel
        OmegaConf.update(rel_cfg, key, rel, merge=False)
    origins = component_origins(cfg, registry) or json.loads(meta.get("components", "{}"))
    cfg_yaml = OmegaConf.to_yaml(rel_cfg, resolve=True)
    weights_meta = {
        "config": cfg_yaml,
        "stages": meta.get("stages", "[]"),
        "lora": meta.get("lora", "false"),
        "format": f"{FORMAT_PREFIX}{FORMAT}",
        "components": json.dumps(origins),
        "bundle": "all",
    }
    model = session.model
    device = next(model.parameters()).device
    model.to("cpu")
    try:
        save_model(model, str(out / WEIGHTS), metadata=weights_meta, force_contiguous=True)
    finally:
        model.to(device)
    (out / "config.yaml").write_text(cfg_yaml)
    manifest = {
        "format": "bundle",
        "bundle_version": BUNDLE_VERSION,
        "mmbridge": __version__,
        "stages": json.loads(meta.get("stages", "[]")),
        "components": origins,
        "files": files,
        "weights": WEIGHTS,
        "tensors": len(model.state_dict()),
        "checksums": checksums(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksums(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file of a bundle that loading reads (all but the
    manifest and the model card)."""
    return {
        p.relative_to(root).as_posix(): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, "README.md")
    }


def verify_checksums(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists has the sha256 recorded when the bundle was written.

    A bundle written before checksums were recorded (no ``checksums`` key) loads with one
    warning.

    Raises:
        IntegrityError: naming each missing or changed file.
    """
    recorded = manifest.get("checksums")
    if recorded is None:
        log.warning(
            "bundle '%s': no checksums in %s (written by an older mmbridge); its files are "
            "not verified",
            path,
            MANIFEST,
        )
        return
    if not isinstance(recorded, dict):
        raise IntegrityError(f"bundle '{path}': {MANIFEST} 'checksums' must map file -> sha256")
    problems = []
    for rel, digest in recorded.items():
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
        elif _sha256(file) != digest:
            problems.append(f"{rel} has changed since the bundle was written (sha256 differs)")
    if problems:
        raise IntegrityError(
            f"bundle '{path}' is damaged: {'; '.join(problems[:8])}"
            f"{' ...' if len(problems) > 8 else ''}; export it again from its checkpoint"
        )


def bundle_config(
    path: Path, manifest: dict[str, Any], registry: Registry
) -> tuple[DictConfig, dict[str, str]]:
    """The bundle's config with its model paths made absolute, and the weights' metadata.

    Checks the layout version and that every component the bundle records is registered
    (a missing one names the package to install).
    """
    if manifest.get("format") != "bundle":
        raise CheckpointError(
            f"'{path}' is a format={manifest.get('format')} export, not a bundle; "
            f"mmbridge.load takes a checkpoint or a format=bundle directory"
        )
    version = int(manifest.get("bundle_version", 0))
    if not 1 <= version <= BUNDLE_VERSION:
        raise CheckpointError(
            f"bundle '{path}' has layout version {version}; this mmbridge reads "
            f"1 to {BUNDLE_VERSION} (upgrade: pip install -U mmbridge)"
        )
    weights = path / manifest.get("weights", WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"bundle '{path}': {weights.name} is missing")
    with safe_open(str(weights), "pt") as f:
        meta: dict[str, str] = dict(f.metadata() or {})
    check_components(
        {"components": json.dumps(manifest.get("components", {}))}, registry, str(path)
    )
    cfg = cast(
        DictConfig, OmegaConf.create(meta["config"])
    )  # the stored config is a run config: a mapping
    for key, rel in manifest.get("files", {}).items():
        target = path / rel
        if not target.exists():
            raise CheckpointError(f"bundle '{path}': {rel} (config key {key}) is missing")
        OmegaConf.update(cfg, key, str(target.resolve()), merge=False)
    return cfg, meta


def load_all_weights(model: torch.nn.Module, file: Path) -> None:
    """Load every tensor of ``model`` from ``file`` (written by ``save_model``, which keeps one
    name of tied tensors); one error lists what is missing, unexpected or mis-shaped."""
    weights = load_file(str(file))
    own = model.state_dict()
    ptr: dict[int, list[str]] = {}
    for k, v in own.items():
        ptr.setdefault(v.data_ptr(), []).append(k)
    tied = {k for names in ptr.values() if any(n in weights for n in names) for k in names}
    missing = sorted(k for k in own if k not in weights and k not in tied)
    unexpected = sorted(k for k in weights if k not in own)
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and own[k].shape != v.shape
    )
    problems = [
        f"{what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        for what, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", shapes),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"bundle weights '{file}' do not fit the model built from its config:\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(weights, strict=False)


def open_bundle(
    path: str | Path,
    overrides: list[str] | None = None,
    registry: Registry | None = None,
    device: str | torch.device | None = None,
    with_data: bool = False,
) -> tuple[Any, dict[str, str]]:
    """Rebuild a bundle's model on ``device`` (as :func:`session_from_checkpoint` does for a
    checkpoint): ``(session, metadata)``. Needs no asset cache and, unless ``with_data`` (read
    the config's data splits, for evaluation), no data."""
    p = Path(path).expanduser()
    manifest = read_manifest(p)
    if manifest is None:
        raise CheckpointError(f"'{path}': no {MANIFEST} there (not an mmbridge export)")
    verify_checksums(p, manifest)
    registry = registry or load_registry()
    # one boundary: whatever a damaged file breaks inside (safetensors, tokenizers, transformers,
    # OmegaConf raise their own types) is one CheckpointError naming the bundle
    with reading(
        p,
        expected=f"a bundle written by `mmbridge export format=bundle` ({MANIFEST}, "
        f"config.yaml, {WEIGHTS}, files/)",
        also=(Exception,),
        error=CheckpointError,
    ):
        cfg, meta = bundle_config(p, manifest, registry)
        if overrides:
            cfg = merge_overrides(cfg, overrides, registry)
        validate_config(cfg, registry)
        try:
            session = open_session(
                cfg, registry, with_data=with_data, device=device, stage_data=False
            )
        except AssetError as exc:
            raise CheckpointError(f"bundle '{path}': {exc}") from exc
        for stage in json.loads(meta.get("stages", "[]")):
            # re-creates LoRA layers
            configure_trainable(session.model, session.run.stages[stage])
        load_all_weights(session.model, p / manifest.get("weights", WEIGHTS))
    session.model.eval()
    return session, meta
