"""The accelerator everywhere ([M] item 2): the feature-cache fill, the evaluation after
training, ``mmbridge eval`` and ``mmbridge generate`` run where ``device=`` says (CPU here, and
CUDA too where a GPU is present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.commands import generate as generate_cmd
from mmbridge.config import compose
from mmbridge.model import MultimodalModel
from mmbridge.plugins.encoders.timm_encoder import TimmEncoder
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.runtime.evaluate import evaluate_session
from mmbridge.runtime.session import open_session, session_from_checkpoint
from mmbridge.training.checkpoint import save_checkpoint

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = [
    "experiment=tiny",
    "data.n_train=8",
    "data.n_val=4",
    "data.n_test=4",
    "evaluation.max_samples=4",
    "evaluation.batch_size=4",
    "evaluation.baselines=false",
]


@pytest.fixture
def seen(monkeypatch):
    """Where the encoder and the model's generation really computed: ``{path: {device types}}``."""
    where: dict[str, set[str]] = {"encoder": set(), "generate": set()}
    encoder_forward, model_generate = TimmEncoder.forward, MultimodalModel.generate

    def enc(self, batch):
        where["encoder"] |= {batch.device.type, next(self.parameters()).device.type}
        return encoder_forward(self, batch)

    def gen(self, batch, *a, **k):
        where["generate"] |= {next(self.parameters()).device.type}
        where["generate"] |= {v.device.type for v in batch.values() if isinstance(v, torch.Tensor)}
        return model_generate(self, batch, *a, **k)

    monkeypatch.setattr(TimmEncoder, "forward", enc)
    monkeypatch.setattr(MultimodalModel, "generate", gen)
    return where


@pytest.mark.parametrize("device", DEVICES)
def test_cache_fill_evaluation_eval_and_generate_run_on_the_device(device, seen, tmp_path, capsys):
    registry = load_registry()
    cfg = compose([*SMALL, f"paths.cache_dir={tmp_path / 'cache'}", f"device={device}"], registry)
    session = open_session(cfg, registry)  # fills the feature cache (a fresh cache dir)
    assert session.device.type == device
    assert seen["encoder"] == {device}
    assert {p.device.type for p in session.model.parameters()} == {device}
    metrics = evaluate_session(session)  # the evaluation after training
    assert metrics["n"] == 4 and seen["generate"] == {device}

    ckpt = tmp_path / "ckpt"
    save_checkpoint(session.model, cfg, ckpt, [])
    for key in seen:
        seen[key].clear()
    again, _ = session_from_checkpoint(str(ckpt), device=device)  # `mmbridge eval`'s path
    assert {p.device.type for p in again.model.parameters()} == {device}
    evaluate_session(again)
    assert seen["generate"] == {device}

    seen["generate"].clear()
    image = tmp_path / "red.png"
    Image.fromarray(np.full((64, 64, 3), (220, 20, 20), np.uint8)).save(image)
    assert (
        generate_cmd.main(
            [
                f"checkpoint={ckpt}",
                f"image={image}",
                "prompt=What colour?",
                "max_new_tokens=3",
                f"device={device}",
            ]
        )
        == 0
    )
    assert seen["generate"] == {device} and seen["encoder"] == {device}  # live image: encoded there
    capsys.readouterr()
