"""User-facing checkpoints: trainable weights (safetensors) + the composed config.

A checkpoint directory holds ``weights.safetensors`` (only the parameters that trained, with
the config and the stages run in its metadata) and ``config.yaml``; both are written to
temporary files and renamed into place, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmbridge.errors import CheckpointError
from mmbridge.model import MultimodalModel

WEIGHTS = "weights.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(model: MultimodalModel, cfg: DictConfig, out_dir: Path, stages_done: list[str]) -> Path:
    """Write the trainable weights and the config into ``out_dir``; returns the weights file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_params = any("lora_" in n for n, _ in model.named_parameters())
    state = {k: v.contiguous().cpu() for k, v in _weights_to_save(model).items()}
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    meta = {"config": cfg_yaml, "stages": json.dumps(stages_done), "lora": json.dumps(lora_params),
            "format": "mmbridge-1"}
    tmp = out_dir / f".{WEIGHTS}.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, out_dir / WEIGHTS)
    _atomic_write_text(out_dir / "config.yaml", cfg_yaml)
    return out_dir / WEIGHTS


def _weights_to_save(model: MultimodalModel) -> dict[str, torch.Tensor]:
    """Every parameter that trained in some stage so far (frozen ones come from the config)."""
    state = model.trainable_state_dict()
    for n, p in model.named_parameters():
        if n in model.ever_trained:
            state.setdefault(n, p.detach())
    return state


def read_checkpoint(path: str | Path) -> tuple[DictConfig, dict[str, torch.Tensor], dict[str, str]]:
    """``(config, weights, metadata)`` of a checkpoint directory or weights file."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{path}': no {WEIGHTS} there (pass a run's "
                              f"checkpoints/final directory or a {WEIGHTS} file)")
    try:
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
        weights = load_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{p}' is unreadable: {exc}") from exc
    if "config" not in meta:
        raise CheckpointError(f"checkpoint '{p}' has no config in its metadata (not an mmbridge checkpoint)")
    return OmegaConf.create(meta["config"]), weights, meta


def load_weights(model: MultimodalModel, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load checkpoint weights into an assembled model; every stored key must fit."""
    own = dict(model.named_parameters())
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise CheckpointError(f"checkpoint '{where}' holds weights the model does not have: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    with torch.no_grad():
        for k, v in weights.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"checkpoint '{where}': {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(v)
