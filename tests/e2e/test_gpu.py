"""On a CUDA device: the tiny run in bf16 trains, evaluates and generates on the GPU, and
gradient checkpointing gives the same gradients there. Marked ``gpu``; skipped without CUDA
(``scripts/gpu_check.sh`` runs the larger check: quickstart, eval and generate, with timings)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from helpers import mmbridge_exe, stage_of
from PIL import Image

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():  # one line in the summary for the whole module
    pytest.skip("gpu tests: no CUDA device", allow_module_level=True)


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [mmbridge_exe(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900
    )


def test_tiny_run_trains_evaluates_and_generates_in_bf16_on_cuda(tmp_path):
    run = tmp_path / "run"
    out = cli(
        "train",
        "experiment=tiny",
        "trainer=gpu",
        "device=cuda",
        "encoder.image_size=32",
        "stages.align.max_steps=20",
        "stages.align.val_every=20",
        "stages.instruct.max_steps=20",
        "stages.instruct.val_every=20",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"]["trainer"] == "bf16-mixed"
    assert metrics["precision"]["device"].startswith("cuda")
    assert all(s["step_time_s"] > 0 for s in metrics["stages"].values())
    assert metrics["peak_memory_mb"] > 0
    ckpt = run / "checkpoints" / "final"
    out = cli(
        "eval",
        f"checkpoint={ckpt}",
        "device=cuda",
        "max_samples=16",
        f"out={tmp_path / 'eval.json'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())
    image = tmp_path / "red.png"
    Image.fromarray(np.full((64, 64, 3), (220, 20, 20), np.uint8)).save(image)
    out = cli(
        "generate",
        f"checkpoint={ckpt}",
        f"image={image}",
        "prompt=What colour?",
        "max_new_tokens=3",
        "device=cuda",
        cwd=tmp_path,
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]


def test_gradient_checkpointing_on_cuda_gives_the_same_gradients(tmp_path):
    from mmbridge.plugins.llms.hf_causal import HFCausalLM

    plain = HFCausalLM.for_testing(tmp_path / "a").cuda().train()
    ckpt = HFCausalLM.for_testing(tmp_path / "b", gradient_checkpointing=True).cuda().train()
    ckpt.model.load_state_dict(plain.model.state_dict())
    embeds = torch.randn(2, 9, plain.hidden_size, device="cuda")
    mask = torch.ones(2, 9, dtype=torch.long, device="cuda")
    grads = []
    for llm in (plain, ckpt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = llm.logits(llm.hidden(embeds, mask)).float().logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad for n, p in llm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=2e-2, atol=1e-4, msg=n)


def test_tiny_two_stage_run_under_lightning_fsdp_gathers_its_checkpoints_on_rank_0(tmp_path):
    """Lightning's FSDPStrategy (one unit per decoder / encoder block) on up to two GPUs: each
    stage's checkpoint holds the whole trained tensors (gathered, not one rank's shards), the
    second stage (LoRA) starts from a plain copy, and rank 0's final evaluation of the whole
    test split is what one process's ``mmbridge eval`` of the checkpoint reports."""
    from safetensors.torch import load_file

    from mmbridge.config import compose
    from mmbridge.model import assemble
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.training.checkpoint import _weights_to_save
    from mmbridge.training.stages import configure_trainable

    gpus = min(torch.cuda.device_count(), 2)
    run = tmp_path / "run"
    overrides = [
        "experiment=tiny",
        "encoder.image_size=32",
        "stages.instruct.train.llm=lora",
        "data.n_test=16",
        "evaluation.max_samples=16",
    ]
    out = cli(
        "train",
        *overrides,
        "trainer=fsdp",
        f"trainer.devices={gpus}",
        "trainer.enable_progress_bar=false",
        "stages.align.max_steps=8",
        "stages.align.val_every=8",
        "stages.instruct.max_steps=8",
        "stages.instruct.val_every=8",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    registry = load_registry(autoload=False)
    cfg = compose(overrides, registry)
    plain = assemble(cfg, registry)
    for export, stages in (("align_final", ["align"]), ("final", ["align", "instruct"])):
        for stage in stages:
            configure_trainable(plain, stage_of(cfg, stage))
        expected = {k: v.shape for k, v in _weights_to_save(plain).items()}
        saved = load_file(str(run / "checkpoints" / export / "weights.safetensors"))
        assert {k: v.shape for k, v in saved.items()} == expected, export  # whole, clean names
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] == 16
    out = cli(
        "eval",
        f"checkpoint={run / 'checkpoints' / 'final'}",
        "device=cuda",
        "max_samples=16",
        f"out={tmp_path / 'eval.json'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["n"] == 16
    assert (
        abs(ev["exact_match"] - metrics["test"]["exact_match"]) <= 1 / 16
    )  # CUDA kernels may flip one
