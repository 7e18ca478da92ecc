"""``format=hf`` of a model that runs in bf16 (``dtype: auto`` on a CPU with native bf16, or
``bfloat16`` set): the export rebuilds it in float32 before merging the LoRA and writing Llava, so
transformers in float32 gives mmbridge's float32 logits, not a bf16-rounded merge. Exports
are readable as a plain directory is (the umask's permissions)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import shared_registry, stage_of
from safetensors import safe_open

import mmbridge
from mmbridge.config import compose
from mmbridge.export import export, float32_overrides
from mmbridge.model import assemble
from mmbridge.plugins.encoders._image import example_png
from mmbridge.testing.tiny import build_tiny_dinov2
from mmbridge.training.checkpoint import save_checkpoint
from mmbridge.training.stages import configure_trainable

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "What colour is the shape?"
TINY = [
    "experiment=tiny",
    "encoder.image_size=32",
    "stages.instruct.train.llm=lora",
    "stages.instruct.lora.dropout=0.0",
]
#: experiment=tiny with a tiny DINOv2 Llava can represent, its weights in bf16
BF16_HF = [
    "encoder=dinov2_small",
    "encoder.pool_to=null",
    "encoder.image_size=null",
    "encoder.feature_layer=[1,0]",
    "connector=mlp",
    "encoder.dtype=bfloat16",
    "llm.dtype=bfloat16",
]


def make_checkpoint(out: Path, overrides: list[str]) -> Path:
    """An align + instruct checkpoint as a run writes it, its trained tensors (MLP, LoRA)
    seeded random so that each changes the answer."""
    registry = shared_registry()
    cfg = compose([*overrides, "schedule=[align,instruct]"], registry)
    torch.manual_seed(0)
    model = assemble(cfg, registry)
    for stage in ("align", "instruct"):
        configure_trainable(model, stage_of(cfg, stage))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in model.ever_trained:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    save_checkpoint(model, cfg, out, ["align", "instruct"], registry)
    return out


def test_a_bf16_model_exports_as_float32_llava_with_mmbridges_float32_logits(tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    build_tiny_dinov2(tmp_path / "dinov2")
    image = example_png(tmp_path, 1)
    ckpt = make_checkpoint(
        tmp_path / "final", [*TINY, *BF16_HF, f"encoder.path={tmp_path / 'dinov2'}"]
    )
    assert float32_overrides(ckpt, shared_registry()) == [
        "llm.dtype=float32",
        "encoder.dtype=float32",
    ]
    out = export(ckpt, tmp_path / "hf", format="hf", registry=shared_registry())
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert dtypes == {"F32"}

    m = mmbridge.load(
        ckpt,
        device="cpu",
        overrides=["llm.dtype=float32", "encoder.dtype=float32"],
        registry=shared_registry(),
    )
    bf16 = mmbridge.load(ckpt, device="cpu", registry=shared_registry())
    assert next(bf16.session.model.llm.parameters()).dtype == torch.bfloat16  # the model as trained
    llava = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(out), backend="pil")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{PROMPT}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    want, _ = m.logits(PROMPT, image=image)
    with torch.no_grad():
        got = llava(**inputs).logits[..., : want.shape[-1]]
    assert (got - want).abs().max().item() <= 1e-4
    new = llava.generate(**inputs, max_new_tokens=8, do_sample=False)[
        0, inputs["input_ids"].shape[1] :
    ]
    assert processor.decode(new, skip_special_tokens=True).strip() == m.generate(
        PROMPT, image=image, max_new_tokens=8
    )


def test_float32_overrides_name_the_nodes_that_have_a_dtype_and_exports_are_readable(
    tmp_path: Path,
):
    # experiment=tiny: its timm encoder has no dtype option, its hf_causal LLM has one
    ckpt = make_checkpoint(tmp_path / "final", TINY)
    registry = shared_registry()
    assert float32_overrides(ckpt, registry) == ["llm.dtype=float32"]
    bundle = export(ckpt, tmp_path / "bundle", format="bundle", registry=registry)
    assert float32_overrides(bundle, registry) == ["llm.dtype=float32"]
    # the permissions of mkdir / open(.., "w"), not mkdtemp's 0o700 nor safetensors' 0o600
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((bundle / "weights.safetensors").stat().st_mode) == 0o666 & ~mask
