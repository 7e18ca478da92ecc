"""A checkpoint in the layout mmbridge wrote before the orchestration refactor (commit 2faaf33:
metadata ``config`` / ``format`` / ``lora`` / ``stages``, no ``components``; a config without
the keys added since) still loads, into the same model, the keys added since at their defaults.

``data/tiny_config_2faaf33.yaml`` is the ``config.yaml`` of an ``experiment=tiny`` run of that
commit (cache paths replaced by ``@CACHE@``). ``scripts/check_old_checkpoint.sh 2faaf33`` repeats
the whole comparison: train with the old code, evaluate with this one, same figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import shared_registry
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mmbridge.model import assemble
from mmbridge.runtime.session import session_from_checkpoint
from mmbridge.training.checkpoint import WEIGHTS, read_checkpoint

OLD_CONFIG = Path(__file__).parent / "data" / "tiny_config_2faaf33.yaml"


def _old_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An mmbridge checkpoint written as 2faaf33 wrote one: the trained connector and LLM."""
    text = OLD_CONFIG.read_text().replace("@CACHE@", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = assemble(OmegaConf.create(text), shared_registry())
    with torch.no_grad():  # weights unlike a fresh build's, so that loading them is visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    weights = {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if k.startswith(("branches.image.connector.", "llm.model."))
    }
    out = tmp_path / "final"
    out.mkdir()
    save_file(
        weights,
        str(out / WEIGHTS),
        metadata={
            "config": text,
            "stages": json.dumps(["align", "instruct"]),
            "lora": json.dumps(False),
            "format": "mmbridge-1",
        },
    )
    (out / "config.yaml").write_text(text)
    return out, weights


def test_a_2faaf33_checkpoint_loads_into_the_same_model(tmp_path):
    ckpt, weights = _old_checkpoint(tmp_path)
    cfg, _, meta = read_checkpoint(ckpt, registry=shared_registry())
    assert "components" not in meta and meta["format"] == "mmbridge-1"
    assert "reuse_prefix_kv" not in cfg.llm  # added after 2faaf33: its default applies

    session, _ = session_from_checkpoint(
        str(ckpt), with_data=False, registry=shared_registry(), device="cpu"
    )
    state = session.model.state_dict()
    assert len(weights) == 25
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
