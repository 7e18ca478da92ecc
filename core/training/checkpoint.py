"""Checkpoints: the user-facing mmbridge checkpoint, and the Lightning checkpoints a run resumes
from.

An mmbridge checkpoint directory holds ``weights.safetensors`` (only the parameters that trained,
with the config, the stages run and the components' plugins in its metadata) and
``config.yaml``; both are written to temporary files and renamed into place, so a crash never
leaves a half checkpoint. Loading it checks everything it can before a model is built (format,
components registered) and that its tensors fit the model exactly.

Lightning's training checkpoints (``checkpoints/<stage>/*.ckpt``) are read with
``torch.load(weights_only=True)`` only (:class:`SafeCheckpointIO`): a crafted file cannot run
code, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says. The last two are kept
(:func:`checkpoint_callback`), so a damaged ``last.ckpt`` falls back to an older one
(:func:`resumable_checkpoint`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save

from mmbridge.config.model_spec import model_nodes
from mmbridge.errors import CheckpointError, StorageError
from mmbridge.model import MultimodalModel
from mmbridge.utils.io import atomic_write_bytes, atomic_write_text, check_free_space

if TYPE_CHECKING:
    from mmbridge.registry import Registry

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
#: The checkpoint format this version writes and the newest it reads.
FORMAT = 1
FORMAT_PREFIX = "mmbridge-"
#: Lightning's name for the newest training checkpoint of a stage.
LAST = "last.ckpt"
#: Globals a project checkpoint needs beyond torch's weights-only defaults. None so far: Lightning
#: stores loops, callbacks, optimiser and LR-scheduler states as plain containers and tensors,
#: and ``BridgeModule.on_save_checkpoint`` adds only floats and lists (a test loads a real one).
SAFE_GLOBALS: list[Any] = []

# --------------------------------------------------------------------------------------------
# mmbridge checkpoints (weights.safetensors + config.yaml)
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    model: MultimodalModel,
    cfg: DictConfig,  # the config as composed: stored as config.yaml and in the metadata
    out_dir: Path,
    stages_done: list[str],
    registry: Registry | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the trainable weights and the config into ``out_dir``; returns the weights file.

    With ``registry``, the plugin, package and version of each built component are recorded,
    so that loading on a machine without the plugin names the package to install.
    ``weights`` are the tensors to write when the model's own are shards (FSDP, ZeRO-3): what
    :func:`mmbridge.training.distributed.gather_weights` returned on rank 0; by default the
    model's trained parameters.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_params = any("lora_" in n for n, _ in model.named_parameters())
    state = {
        k: v.contiguous().cpu()
        for k, v in (_weights_to_save(model) if weights is None else weights).items()
    }
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    meta = {
        "config": cfg_yaml,
        "stages": json.dumps(stages_done),
        "lora": json.dumps(lora_params),
        "format": f"{FORMAT_PREFIX}{FORMAT}",
    }
    if registry is not None:
        meta["components"] = json.dumps(component_origins(cfg, registry))
    data = save(state, metadata=meta)
    check_free_space(out_dir, len(data) + len(cfg_yaml), f"the checkpoint {out_dir.name}")
    atomic_write_bytes(out_dir / WEIGHTS, data)
    atomic_write_text(out_dir / "config.yaml", cfg_yaml)
    return out_dir / WEIGHTS


def _weights_to_save(model: MultimodalModel) -> dict[str, torch.Tensor]:
    """Every parameter that trained in some stage so far (frozen ones come from the config)."""
    state = model.trainable_state_dict()
    for n, p in model.named_parameters():
        if n in model.ever_trained:
            state.setdefault(n, p.detach())
    return state


def _component_nodes(cfg: DictConfig) -> Iterator[tuple[str, str, str]]:
    """``(config key, registry kind, name)`` of each component a checkpoint's model and data
    need."""
    nodes = [(n.key, n.kind) for n in model_nodes(cfg)] + [("data", "dataset")]
    for key, kind in nodes:
        node = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig) and node.get("name") is not None:
            yield key, kind, str(node.name)


def component_origins(cfg: DictConfig, registry: Registry) -> dict[str, dict[str, str]]:
    """Config key -> kind, name and the plugin / package / version that registered it."""
    out = {}
    for key, kind, name in _component_nodes(cfg):
        if (kind, name) not in registry:
            continue  # the build itself reports it
        o = registry.get(kind, name).origin
        out[key] = {
            "kind": kind,
            "name": name,
            "plugin": o.plugin,
            "package": o.package,
            "version": o.version,
        }
    return out


def check_components(meta: dict[str, str], registry: Registry, where: str) -> None:
    """Every component recorded in a checkpoint's metadata is registered; else one error that
    names, per missing component, the package that registered it when the checkpoint was written.
    """
    recorded = json.loads(meta.get("components", "{}"))
    missing = []
    for key, c in recorded.items():
        if (c["kind"], c["name"]) in registry:
            now = registry.get(c["kind"], c["name"]).origin
            if now.package != c["package"]:
                log.warning(
                    "checkpoint '%s': %s '%s' was registered by package %s %s, here by %s %s",
                    where,
                    c["kind"],
                    c["name"],
                    c["package"],
                    c["version"],
                    now.package,
                    now.version,
                )
            continue
        package = c["package"]
        if package.startswith("("):  # registered in-process (a test or notebook), no package
            fix = f"register plugin '{c['plugin']}' before loading"
        elif package == "mmbridge":
            fix = (
                f"it is built into mmbridge {c['version']}: pip install 'mmbridge>={c['version']}'"
            )
        else:
            fix = (
                f"pip install {package} (version {c['version']} wrote it), or unset "
                f"MMBRIDGE_DISABLE_PLUGINS if it is installed"
            )
        missing.append(
            f"{key}: {c['kind']} '{c['name']}' of plugin '{c['plugin']}' is not registered; {fix}"
        )
    if missing:
        raise CheckpointError(
            f"checkpoint '{where}' needs components that are not installed:\n  "
            + "\n  ".join(missing)
        )


def _sniff(path: Path) -> str:
    """``"torch"`` for a ``torch.save`` file (zip, or a legacy pickle), else ``""``. Reads 9 bytes.

    A safetensors file starts with its header's length (8 bytes, little-endian) and then ``{``;
    the length's first byte can be 0x80 like a pickle's, the ``{`` tells them apart.
    """
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return ""
    pickle_start = head[:1] == b"\x80" and head[8:9] != b"{"
    return "torch" if head.startswith(b"PK\x03\x04") or pickle_start else ""


def _not_an_mmbridge_checkpoint(path: str | Path, p: Path) -> CheckpointError:
    """The error for a path that holds no weights.safetensors, pointing to the run's final one."""
    lightning = (
        p.suffix == ".ckpt"
        or (p.is_file() and _sniff(p) == "torch")
        or (p.is_dir() and any(p.glob("*.ckpt")))
    )
    run = next(
        (d for d in [p, *p.parents] if (d / "checkpoints" / "final" / WEIGHTS).is_file()), None
    )
    final = run / "checkpoints" / "final" if run else None
    if lightning:
        hint = f"pass {final}" if final else "pass the run's checkpoints/final directory"
        return CheckpointError(
            f"checkpoint '{path}' is a Lightning training checkpoint (for `resume=RUN_DIR`), "
            f"not an mmbridge checkpoint; {hint} (or a {WEIGHTS} file)"
        )
    if final is not None:
        return CheckpointError(f"checkpoint '{path}': no {WEIGHTS} there; pass {final}")
    return CheckpointError(
        f"checkpoint '{path}': no {WEIGHTS} there (pass a run's "
        f"checkpoints/final directory or a {WEIGHTS} file)"
    )


def _check_format(meta: dict[str, str], where: Path) -> None:
    fmt = meta.get("format", f"{FORMAT_PREFIX}1")
    version = fmt.removeprefix(FORMAT_PREFIX)
    if not fmt.startswith(FORMAT_PREFIX) or not version.isdigit():
        raise CheckpointError(
            f"checkpoint '{where}': unknown format '{fmt}' (this mmbridge reads "
            f"{FORMAT_PREFIX}1 to {FORMAT_PREFIX}{FORMAT})"
        )
    if int(version) > FORMAT:
        raise CheckpointError(
            f"checkpoint '{where}' has format {fmt}, newer than this mmbridge reads "
            f"({FORMAT_PREFIX}1 to {FORMAT_PREFIX}{FORMAT}); upgrade: pip install -U mmbridge"
        )


def read_checkpoint(
    path: str | Path,
    registry: Registry | None = None,
) -> tuple[DictConfig, dict[str, torch.Tensor], dict[str, str]]:
    """``(config, weights, metadata)`` of a checkpoint directory or weights file.

    Checks, before anything is built: that it is an mmbridge checkpoint (a Lightning ``.ckpt``
    is pointed to the run's ``checkpoints/final``), its format version, and with ``registry``
    that every component it records is registered (:func:`check_components`).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS
    if not p.is_file() or _sniff(p) == "torch":
        raise _not_an_mmbridge_checkpoint(path, p.parent if p.name == WEIGHTS else p)
    try:
        with safe_open(str(p), "pt") as f:
            meta: dict[str, str] = dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{p}' is unreadable: {exc}") from exc
    if "config" not in meta:
        raise CheckpointError(
            f"checkpoint '{p}' has no config in its metadata (not an mmbridge checkpoint)"
        )
    if meta.get("bundle"):  # a bundle's weights: its config names files/ relative to mmbridge.json
        raise CheckpointError(
            f"'{p}' is the weights file of a format=bundle export whose mmbridge.json "
            f"is missing: restore it, or export the bundle again from its checkpoint"
        )
    _check_format(meta, p)
    for key, kind in (("stages", list), ("components", dict), ("lora", bool)):
        try:
            ok = key not in meta or isinstance(json.loads(meta[key]), kind)
        except ValueError:
            ok = False
        if not ok:
            raise CheckpointError(
                f"checkpoint '{p}': its metadata '{key}' is not a JSON {kind.__name__} "
                f"(a damaged or hand-made file?)"
            )
    if registry is not None:
        check_components(meta, registry, str(p))
    try:
        weights = load_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{p}' is unreadable: {exc}") from exc
    try:
        cfg = OmegaConf.create(meta["config"])
    except Exception as exc:  # OmegaConf / YAML raise their own types
        raise CheckpointError(
            f"checkpoint '{p}': the config in its metadata is unreadable "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from exc
    if not isinstance(cfg, DictConfig):
        raise CheckpointError(f"checkpoint '{p}': the config in its metadata is not a mapping")
    return cfg, weights, meta


def _listed(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names) - n} more)" if len(names) > n else "")


def load_weights(model: MultimodalModel, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load checkpoint weights into an assembled model, which must already be configured for
    the stages the checkpoint records (``configure_trainable`` per stage, as at training).

    The weights must be exactly what the model would save (:func:`save_checkpoint`): every
    parameter that trained in those stages, each with the model's shape, and nothing else.
    Otherwise nothing is loaded and one error lists the missing, unexpected and mis-shaped
    tensors (a changed architecture such as ``connector.depth=3``, or a partial file).
    """
    own = dict(model.named_parameters())
    expected = set(_weights_to_save(model))
    missing = sorted(expected - set(weights))
    unexpected = sorted(k for k in weights if k not in expected)
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in expected and own[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) the model trains: {_listed(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected tensor(s) (not trained by this model): "
            f"{_listed(unexpected)}"
        )
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes)}")
    if problems:
        raise CheckpointError(
            f"checkpoint '{where}' does not fit the model built from its config (an architecture "
            f"override, or a partial file?):\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)


# --------------------------------------------------------------------------------------------
# Lightning training checkpoints (resume)
# --------------------------------------------------------------------------------------------


def torch_load_safe(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; an unreadable or unsafe file is a CheckpointError.

    ``weights_only=True`` is passed explicitly: torch lets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
    override only a call that did not set it (``torch.serialization.load``). ``mmap`` maps the
    tensors instead of reading them (the pickle, and so every check, is still read whole).
    """
    if SAFE_GLOBALS:
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next(
            (line for line in first if "GLOBAL" in line or "Unsupported" in line),
            first[0] if first else "",
        )
        raise CheckpointError(
            f"checkpoint '{path}' refused: it holds objects that a weights-only load does not "
            f"allow ({detail.strip()}); mmbridge never unpickles code from a checkpoint"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is unreadable ({type(exc).__name__}: {exc})"
        ) from exc


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`TorchCheckpointIO` that only ever loads weights-only.

    Pass it as ``L.Trainer(plugins=[SafeCheckpointIO()])``: ``fit(ckpt_path=...)`` then loads
    through :func:`torch_load_safe`, whatever ``weights_only`` Lightning asks for.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Serialise in memory, check the free space, then write a temporary file in the
        target directory and rename it: a full disk or a kill mid-write leaves no file under
        the checkpoint's name, and the previous checkpoints resume (:func:`resumable_checkpoint`).

        Raises:
            StorageError: naming the path, the bytes needed and free, and the newest complete
                checkpoint of the directory.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        data = buf.getbuffer().tobytes()
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_free_space(path.parent, len(data), f"the training checkpoint {path.name}")
            atomic_write_bytes(path, data)
        except (StorageError, OSError) as exc:
            raise StorageError(f"{exc}; {_last_good(path.parent)}") from exc

    def load_checkpoint(
        self, path: Any, map_location: Callable | Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).exists():
            raise CheckpointError(f"checkpoint '{path}' does not exist")
        return torch_load_safe(
            path, map_location=map_location if map_location is not None else "cpu"
        )


def _last_good(ckpt_dir: Path) -> str:
    """Where a run stands after a failed checkpoint write, for the error message."""
    done = sorted(
        (p for p in ckpt_dir.glob("*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime_ns
    )
    if not done:
        return (
            "no earlier checkpoint of this stage: after freeing space, mmbridge train "
            "resume=RUN_DIR keeps the finished stages and starts this one again"
        )
    return (
        f"the last complete checkpoint, {done[-1]}, still resumes (mmbridge train resume=RUN_DIR)"
    )


def checkpoint_callback(
    ckpt_dir: Path, every_n_train_steps: int, cls: type[ModelCheckpoint] | None = None
) -> ModelCheckpoint:
    """Lightning's checkpointing for one stage (``cls``, default ``ModelCheckpoint``): the two
    newest ``step=N.ckpt`` and a copy of the newest as ``last.ckpt``.

    A damaged ``last.ckpt`` then leaves two older files for :func:`resumable_checkpoint`
    (usually one of the same step). ``last.ckpt`` is a copy, not a link (``save_last="link"``):
    a save of ``last.ckpt`` alone (on a signal) must write the current step, where a link would
    point back at the last periodic one. A step saved again after a resume overwrites its file
    instead of adding ``-v1`` copies.
    """
    return (cls or ModelCheckpoint)(
        dirpath=ckpt_dir,
        filename="{step}",
        save_last=True,
        save_top_k=2,
        monitor="step",
        mode="max",
        every_n_train_steps=every_n_train_steps,
        enable_version_counter=False,
    )


def resumable_checkpoint(ckpt_dir: Path) -> Path | None:
    """The training checkpoint to resume a stage from: ``last.ckpt`` if it loads, else the newest
    other ``*.ckpt`` of ``ckpt_dir`` that loads (one warning line); ``None`` if none is usable.

    Each candidate is loaded weights-only, its tensors memory-mapped: a truncated zip has no
    central directory and fails at once, and torch checks no checksum of tensor data on a full
    read either, so mapping loses nothing and saves reading the file twice. One that holds
    disallowed objects is not skipped but refused (:class:`CheckpointError`): a tampered file
    should stop the run, not be worked around.
    """
    last = ckpt_dir / LAST
    others = sorted(
        (p for p in ckpt_dir.glob("*.ckpt") if p.name != LAST and p.exists()),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    target = last.resolve() if last.is_symlink() else None
    candidates = ([last] if last.is_symlink() or last.exists() else []) + [
        p for p in others if p.resolve() != target
    ]
    if (
        last.exists()
        and not last.is_symlink()
        and others
        and others[0].stat().st_mtime_ns > last.stat().st_mtime_ns
    ):
        # the write of last.ckpt failed after the newer step=N.ckpt (a full disk): resume from that
        try:
            torch_load_safe(others[0], mmap=True)
        except CheckpointError as exc:
            if "refused" in str(exc):
                raise
        else:
            log.warning(
                "%s: %s is newer than last.ckpt (whose write failed); resuming from it",
                ckpt_dir,
                others[0].name,
            )
            return others[0]
    reasons: list[str] = []
    for path in candidates:
        name = f"{path.name} (-> {os.readlink(path)})" if path.is_symlink() else path.name
        if not path.exists():
            reasons.append(f"{name} is a broken link")
            continue
        try:
            torch_load_safe(path, mmap=True)
        except CheckpointError as exc:
            if "refused" in str(exc):
                raise
            # torch's messages run on for lines; the first sentence says what broke
            reasons.append(f"{name} is unreadable ({str(exc.__cause__ or exc).split('. ')[0]})")
            continue
        if reasons:
            log.warning("%s: %s; resuming from %s", ckpt_dir, "; ".join(reasons), path.name)
        return path
    if reasons:
        log.warning(
            "%s: %s; no usable checkpoint, the stage starts again", ckpt_dir, "; ".join(reasons)
        )
    return None
