"""LoRA as PEFT writes it ([F] issue 25 item 6): a stage's ``lora`` passes through to
``peft.LoraConfig`` (``all-linear``, DoRA, ``layers_to_transform``, ...), unknown keys are named
with what is valid, the encoder trains as ``frozen | lora | last_n | full``, the LLM's LoRA state
is a contract property, and QLoRA is refused in one line without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import shared_registry, stage_of

from mmbridge.config import compose
from mmbridge.config.validation import config_errors
from mmbridge.errors import ConfigError
from mmbridge.export.peft_format import peft_llm
from mmbridge.model import assemble
from mmbridge.model.lora import linear_names, peft_config
from mmbridge.plugins.llms.hf_causal import HFCausalLM
from mmbridge.testing.tiny import build_tiny_llama
from mmbridge.training.stages import configure_trainable

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["experiment=tiny", "encoder.image_size=32"]
LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def dora_model():
    """The tiny model after an instruct stage with DoRA on every linear layer of block 1."""
    cfg = compose(
        [
            *BASE,
            "stages.instruct.train.llm=lora",
            "stages.instruct.lora.target_modules=all-linear",
            "stages.instruct.lora.use_dora=true",
            "stages.instruct.lora.r=4",
            "stages.instruct.lora.alpha=8",
            "++stages.instruct.lora.layers_to_transform=[1]",
        ],
        shared_registry(),
    )
    assert config_errors(cfg, shared_registry()) == []  # a LoraConfig key passes validation
    torch.manual_seed(0)
    model = assemble(cfg, shared_registry())
    configure_trainable(model, stage_of(cfg, "instruct"))
    return model, cfg


def test_the_whole_lora_config_passes_through(dora_model):
    model, _ = dora_model
    settings = model.llm.lora_config
    assert settings["target_modules"] == "all-linear" and settings["use_dora"] is True
    assert settings["layers_to_transform"] == [1] and settings["r"] == 4
    trained = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    # A, B and DoRA's magnitude vector on the 7 linear layers of block 1 only; none on lm_head
    adapted = sorted({n.split(".")[-4] for n in trained if "lora_A" in n})
    assert adapted == LLAMA_LINEAR and all(".layers.1." in n for n in trained)
    assert sum("lora_magnitude_vector" in n for n in trained) == 7 and len(trained) == 21
    layer = model.llm.model.model.layers[1].self_attn.q_proj
    assert layer.scaling["default"] == 8 / 4 and layer.lora_A["default"].weight.shape == (4, 128)
    assert linear_names(model.llm.model) == LLAMA_LINEAR  # all-linear leaves the head out


def test_the_peft_export_rebuilds_the_same_adapters(dora_model):
    """PEFT's own get_peft_model with the exported settings holds the trained tensors and gives
    the same logits as mmbridge's LLM."""
    model, _ = dora_model
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    wrapped = peft_llm(model.llm)
    model.eval()  # LoRA dropout off, as in PEFT's eval()
    ids = torch.tensor([[3, 17, 42, 5, 9]])
    with torch.no_grad():
        ours = model.llm.model(input_ids=ids).logits
        theirs = wrapped(input_ids=ids).logits
        with wrapped.disable_adapter():
            base = wrapped(input_ids=ids).logits
    assert (theirs - base).abs().max() > 1e-3  # the adapters change the output ...
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)  # ... exactly as in training


def test_unknown_lora_keys_are_named_with_what_is_valid():
    cfg = compose([*BASE, "++stages.instruct.lora.use_dorra=true"], shared_registry())
    errors = config_errors(cfg, shared_registry())
    assert len(errors) == 1 and errors[0].startswith(
        "stages.instruct.lora.use_dorra=True: not a key of stages.instruct.lora "
        "(did you mean 'use_dora'?)"
    )
    assert "or a key of peft.LoraConfig" in errors[0]
    with pytest.raises(
        ConfigError,
        match=r"lora: lora_alpha \(written alpha here\): not a key of peft.LoraConfig here; "
        r"valid: .*alpha",
    ):
        peft_config({"r": 4, "lora_alpha": 8}, "lora")
    with pytest.raises(
        ConfigError, match=r"lora.target_modules: \['query'\] match no linear layer"
    ):
        peft_config(
            {"target_modules": ["query"]}, "lora", torch.nn.Sequential(torch.nn.Linear(2, 2))
        )


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("lora", []),
        ("last_n", ["stages.align.train.encoder_last_n=1"]),
        ("full", []),
        ("frozen", []),
    ],
)
def test_encoder_trains_as_frozen_lora_last_n_or_full(mode, extra):
    cfg = compose([*BASE, f"stages.align.train.encoder={mode}", *extra], shared_registry())
    assert config_errors(cfg, shared_registry()) == []
    model = assemble(cfg, shared_registry())
    configure_trainable(model, stage_of(cfg, "align"))
    encoder = model.branches["image"].encoder
    trained = {n for n, p in encoder.named_parameters() if p.requires_grad}
    total = {n for n, _ in encoder.named_parameters()}
    if mode == "lora":  # every linear layer of the timm ViT's blocks (qkv, proj, fc1, fc2)
        assert trained and all("lora_" in n for n in trained)
        assert {n.split(".")[-4] for n in trained} == {"qkv", "proj", "fc1", "fc2"}
        assert {p.dtype for n, p in encoder.named_parameters() if n in trained} == {torch.float32}
    elif mode == "last_n":  # the last of the two blocks only
        assert trained and all(".blocks.1." in n for n in trained)
        assert {n for n in total if ".blocks.1." in n} == trained
    elif mode == "full":
        assert trained == total
    else:
        assert trained == set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the gpu test runs QLoRA")
def test_qlora_is_refused_without_cuda_in_one_line(tmp_path):
    build_tiny_llama(tmp_path, hidden=32, layers=2, heads=2, intermediate=64)
    with pytest.raises(ConfigError) as err:
        HFCausalLM(path=str(tmp_path), quantization={"bits": 4})
    message = str(err.value)
    assert "\n" not in message and message.startswith("llm.quantization: 4-bit base weights (QLoRA")
    assert "need a CUDA GPU" in message
    with pytest.raises(ConfigError, match=r"llm.quantization: unknown key\(s\) bitz; valid: bits"):
        HFCausalLM(path=str(tmp_path), quantization={"bitz": 4})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_trains_adapters_over_4bit_weights_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes")
    build_tiny_llama(tmp_path, hidden=64, layers=2, heads=2, intermediate=128)
    llm = HFCausalLM(path=str(tmp_path), dtype="bfloat16", quantization={"bits": 4})
    assert any("4bit" in type(m).__name__ for m in llm.model.modules())
    llm.apply_lora(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    trained = [p for p in llm.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    opt = torch.optim.AdamW(trained, lr=1e-2)
    ids = torch.tensor([[3, 17, 42, 5, 9]], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = llm.model(input_ids=ids, labels=ids).loss
    loss.backward()
    before = [p.detach().clone() for p in trained]
    opt.step()
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(trained, before))


def test_init_from_carries_the_encoders_adapters(tmp_path):
    """A run starting from a stage that trained the encoder with LoRA gets its adapters, with
    the source's settings, holding the source's tensors."""
    from mmbridge.runtime.config import RunConfig
    from mmbridge.training.checkpoint import save_checkpoint
    from mmbridge.training.init_from import load_init_weights

    cfg = compose(
        [*BASE, "stages.align.train.encoder=lora", "stages.align.encoder_lora.r=2"],
        shared_registry(),
    )
    source = assemble(cfg, shared_registry())
    configure_trainable(source, stage_of(cfg, "align"))
    with torch.no_grad():
        for n, p in source.named_parameters():
            if "lora_B" in n:
                p.normal_()
    run = tmp_path / "run"
    save_checkpoint(
        source, cfg, run / "checkpoints" / "align_final", ["align"], registry=shared_registry()
    )
    target_cfg = compose(
        [*BASE, f"init_from={run}:align", "cache_features=false"], shared_registry()
    )
    target = assemble(target_cfg, shared_registry())
    run_cfg = RunConfig.parse(target_cfg)
    names = load_init_weights(target, run_cfg.root, run_cfg.scheduled, shared_registry())
    lora = [n for n in names if "lora_B" in n and ".encoder." in n]
    # r = 2, the source's; the linear layers only (not patch_embed.proj, a convolution)
    assert len(lora) == 8 and all(
        target.state_dict()[n].shape == (target.state_dict()[n].shape[0], 2) for n in lora
    )
    for n in lora:
        torch.testing.assert_close(target.state_dict()[n], source.state_dict()[n])
