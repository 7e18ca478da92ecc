"""``mmbridge plan``: the presets' real models built from their shipped configs on the meta
device; every printed figure checked against a hand computation from the published
architecture numbers."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mmbridge.commands import plan as plan_command
from mmbridge.errors import ConfigError
from mmbridge.plugins.encoders.hf_vision import HFVisionEncoder
from mmbridge.plugins.llms.hf_causal import HFCausalLM
from mmbridge.runtime.plan import HEADROOM, GiB, config_dir, shipped_configs
from mmbridge.testing.tiny import build_tiny_dinov2, build_tiny_llama

BOTH = "schedule=[align,instruct]"


# -- hand computations from the published architecture numbers ---------------------------------
def linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def vit(
    d: int,
    inter: int,
    blocks: int,
    patch: int,
    positions: int,
    cls: bool,
    conv_bias: bool,
    pre_norm: bool,
) -> int:
    """A CLIP / SigLIP vision tower's parameters, ``blocks`` encoder blocks kept (no head)."""
    emb = 3 * patch * patch * d + (d if conv_bias else 0) + positions * d + (d if cls else 0)
    block = 4 * linear(d, d) + linear(d, inter) + linear(inter, d) + 2 * 2 * d
    return emb + (2 * d if pre_norm else 0) + blocks * block


def llama(
    d: int,
    inter: int,
    layers: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    tied: bool,
    qkv_bias: bool,
) -> int:
    head = d // heads
    attn = linear(d, d, qkv_bias) + 2 * linear(d, kv_heads * head, qkv_bias) + linear(d, d, False)
    block = attn + 3 * d * inter + 2 * d
    return vocab * d * (1 if tied else 2) + layers * block + d


MLP_1024_4096 = linear(1024, 4096) + linear(4096, 4096)
#: CLIP ViT-L/14-336: 24 blocks of 1024, (336 / 14)^2 = 576 patches + CLS; LLaVA reads the
#: penultimate layer, so block 24 and the final norm are never used (and not counted).
CLIP_L336 = vit(1024, 4096, 23, 14, 577, cls=True, conv_bias=False, pre_norm=True)
#: SigLIP so400m/14-384: 27 blocks of 1152, 27 x 27 = 729 patches, no CLS; penultimate layer.
SIGLIP = vit(1152, 4304, 26, 14, 729, cls=False, conv_bias=True, pre_norm=False)
#: SigLIP's pooling head (MAP: probe, attention, norm, MLP) and final norm: unused by the patch
#: features, kept as frozen buffers (on the GPU, never trained)
SIGLIP_HEAD = (
    1152
    + 3 * linear(1152, 1152)
    + linear(1152, 1152)
    + 2 * 1152
    + linear(1152, 4304)
    + linear(4304, 1152)
)
SIGLIP_UNUSED = SIGLIP_HEAD + 2 * 1152
VICUNA_7B = llama(4096, 11008, 32, 32000, 32, 32, tied=False, qkv_bias=False)
QWEN25_05B = llama(896, 4864, 24, 151936, 14, 2, tied=True, qkv_bias=True)


def qformer(d: int, enc: int, layers: int, freq: int, queries: int, out: int) -> int:
    """BLIP-2's Q-Former: self-attention + FFN in every layer, cross-attention every freq-th."""
    self_attn = 4 * linear(d, d) + 2 * d
    cross = 2 * linear(d, d) + 2 * linear(enc, d) + 2 * d
    ffn = linear(d, 4 * d) + linear(4 * d, d) + 2 * d
    n_cross = len(range(0, layers, freq))
    return 2 * d + layers * (self_attn + ffn) + n_cross * cross + queries * d + linear(d, out)


def block_values(d: int, d_kv: int, inter: int) -> int:
    return 5 * d + 2 * d_kv + 4 * inter


def test_hand_computations_are_the_published_sizes():
    assert MLP_1024_4096 == 20_979_712  # "the MLP's 21M parameters"
    assert VICUNA_7B == 6_738_415_616  # Vicuna-7B / Llama-2-7B: 6.74B
    assert QWEN25_05B == 494_032_768  # Qwen2.5-0.5B: 0.49B
    # the full towers, with their last block, final norm (and SigLIP's MAP head)
    assert vit(1024, 4096, 24, 14, 577, True, False, True) + 2 * 1024 == 303_507_456  # CLIP-L/336
    assert vit(1152, 4304, 27, 14, 729, False, True, False) + SIGLIP_UNUSED == 428_225_600  # so400m


# -- the printed plan --------------------------------------------------------------------------
def run_plan(capsys, *args: str) -> tuple[str, dict]:
    assert plan_command.main([*args]) == 0
    text = capsys.readouterr().out
    assert plan_command.main([*args, "--json"]) == 0
    return text, json.loads(capsys.readouterr().out)


def printed_count(text: str, label: str) -> int:
    return int(re.search(rf"^  {label}\s+([\d,]+)", text, re.M).group(1).replace(",", ""))


def printed_gib(text: str, stage: str, part: str) -> float:
    block = text.split(f"stage {stage}:")[1]
    return float(re.search(rf"{part} ([\d.]+) GiB", block).group(1))


PRESETS = {
    # experiment: (encoder, connector, llm, encoder tokens, visual tokens, text tokens,
    #              steps, global batches, batch per GPU, LLM (d, d_kv, inter, layers, vocab))
    "llava15_7b": (
        CLIP_L336,
        MLP_1024_4096,
        VICUNA_7B,
        576,
        576,
        1472,
        (2181, 5198),
        (256, 128),
        (32, 16),
        (4096, 4096, 11008, 32, 32000),
    ),
    "tinyllava_05b": (
        SIGLIP,
        linear(1152, 896) + linear(896, 896),
        QWEN25_05B,
        729,
        729,
        1319,
        (2181, 5198),
        (256, 128),
        (32, 16),
        (896, 128, 4864, 24, 151936),
    ),
    "blip2_style": (
        CLIP_L336,
        qformer(768, 1024, 12, 2, 32, 4096),
        VICUNA_7B,
        577,
        32,
        512,
        (2181, 3466),
        (256, 192),
        (32, 24),
        (4096, 4096, 11008, 32, 32000),
    ),
}


@pytest.mark.parametrize("experiment", list(PRESETS))
def test_plan_figures_match_the_hand_computation(capsys, experiment):
    enc, con, llm, enc_tokens, visual, text_tokens, steps, global_batch, per_gpu, shape = PRESETS[
        experiment
    ]
    text, data = run_plan(capsys, f"experiment={experiment}", BOTH, "gpu_memory_gb=80")
    assert printed_count(text, "encoder") == enc == data["params"]["encoder"]
    assert printed_count(text, "connector") == con == data["params"]["connector"]
    assert printed_count(text, "llm") == llm == data["params"]["llm"]
    seq = visual + text_tokens
    assert (
        f"{enc_tokens} encoder features -> {visual} visual tokens; sequence length {seq} " in text
    )
    assert (
        data["gpus"] == 8 and data["precision"] == "bf16-mixed" and data["gradient_checkpointing"]
    )
    d, d_kv, inter, layers, vocab = shape
    align, instruct = data["stages"]
    for s, n_steps, gb, b in zip((align, instruct), steps, global_batch, per_gpu):
        assert (s["steps"], s["global_batch"], s["batch_size"]) == (n_steps, gb, b)
        assert f"stage {s['name']}: {n_steps:,} steps x global batch {gb} ({b} per GPU)" in text
        # checkpointed activations: each block's input + one block's full set, bf16
        acts = b * seq * 2 * (layers * d + block_values(d, d_kv, inter))
        assert s["memory"]["activations"] == acts
        assert printed_gib(text, s["name"], "activations") == pytest.approx(acts / GiB, abs=0.006)
        assert s["memory"]["lm_head"] == b * text_tokens * vocab * (2 + 8)  # text positions only
        assert s["fits"] == (s["total_bytes"] <= (1 - HEADROOM) * 80 * GiB)
    # stage 1: only the connector trains (fp32 weights: 4 bytes, AdamW: 2 states)
    assert align["trainable"] == {"encoder": 0, "connector": con, "llm": 0}
    sharded = data["strategy"] == "fsdp"
    n = 8 if sharded else 1
    assert align["memory"]["gradients"] == pytest.approx(con * 4 / n)
    assert align["memory"]["optimizer"] == pytest.approx(2 * con * 4 / n)
    if experiment == "blip2_style":  # the LLM stays frozen
        assert instruct["trainable"] == {"encoder": 0, "connector": con, "llm": 0}
    else:  # stage 2: connector + the whole LLM, fp32 master weights under bf16-mixed
        assert instruct["trainable"] == {"encoder": 0, "connector": con, "llm": llm}
        assert instruct["memory"]["gradients"] == pytest.approx((con + llm) * 4 / n)
        assert instruct["memory"]["optimizer"] == pytest.approx(2 * (con + llm) * 4 / n)
        assert instruct["dtypes"]["llm"] == "float32 (trains)"
        assert "llm float32 (trains)" in text.split("stage instruct:")[1]
    unused = SIGLIP_UNUSED if experiment == "tinyllava_05b" else 2 * 1024  # CLIP's final norm
    if sharded:  # FSDP: every weight an fp32 shard (MixedPrecision casts to bf16 for compute)
        assert align["memory"]["weights"] == pytest.approx(
            (enc + unused + con + llm) * 4 / n, rel=1e-4
        )
    else:  # DDP: frozen towers bf16 (unused parts kept as buffers); the LLM trains in stage 2: fp32
        assert align["dtypes"] == {
            "encoder": "bfloat16",
            "connector": "float32 (trains)",
            "llm": "float32",
        }
        assert align["memory"]["weights"] == pytest.approx(
            (enc + unused) * 2 + con * 4 + llm * 4, rel=1e-4
        )


def test_plan_says_when_it_does_not_fit(capsys):
    text, data = run_plan(
        capsys,
        "experiment=llava15_7b",
        BOTH,
        "gpu_memory_gb=24",
        "llm.gradient_checkpointing=false",
    )
    align, instruct = data["stages"]
    assert not data["gradient_checkpointing"]
    # without checkpointing every block keeps its full set of values
    assert align["memory"]["activations"] == 32 * 2048 * 2 * 32 * block_values(4096, 4096, 11008)
    assert not align["fits"] and "total" in text and "does NOT fit in 24 GiB" in text
    # DDP replicates the 7B model, fp32 masters and AdamW states: 6.74B x (4 + 4 + 8) bytes
    _, ddp = run_plan(capsys, "experiment=llava15_7b", BOTH, "trainer.strategy=ddp", "gpus=8")
    assert ddp["stages"][1]["memory"]["optimizer"] == pytest.approx(
        2 * (MLP_1024_4096 + VICUNA_7B) * 4
    )
    assert ddp["stages"][1]["memory"]["weights"] > VICUNA_7B * 4


def test_deepspeed_counts_fp32_master_weights(capsys):
    _, data = run_plan(
        capsys, "experiment=llava15_7b", BOTH, "trainer=deepspeed_zero3", "trainer.devices=8"
    )
    trained = MLP_1024_4096 + VICUNA_7B
    assert data["strategy"] == "deepspeed_stage_3"
    assert data["stages"][1]["memory"]["optimizer"] == pytest.approx(12 * trained / 8)


def test_from_config_on_meta_matches_the_loaded_model(tmp_path):
    """The meta path builds the architecture the weight-loading path loads."""
    build_tiny_llama(tmp_path / "llm", hidden=32, layers=2, heads=2, intermediate=64)
    build_tiny_dinov2(tmp_path / "enc")
    real_llm = HFCausalLM(path=str(tmp_path / "llm"))
    real_enc = HFVisionEncoder(path=str(tmp_path / "enc"), feature_layer=-2)
    with torch.device("meta"):
        meta_llm = HFCausalLM.from_config(tmp_path / "llm")
        meta_enc = HFVisionEncoder.from_config(tmp_path / "enc", feature_layer=-2)
    assert next(meta_llm.parameters()).is_meta and next(meta_enc.parameters()).is_meta
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(meta_llm) == shapes(real_llm)
    assert shapes(meta_enc) == shapes(real_enc)
    assert (
        meta_enc.num_tokens(None) == real_enc.num_tokens(None)
        and meta_enc.out_dim == real_enc.out_dim
    )
    assert meta_llm.tokenizer is not None  # the directory has one


def test_unknown_model_config_is_a_clear_error():
    assert "lmsys/vicuna-7b-v1.5" in shipped_configs()
    with pytest.raises(
        ConfigError, match=r"llm.path: no config.json for 'org/missing'.*lmsys/vicuna-7b-v1.5"
    ):
        config_dir("org/missing", "llm.path")
    with pytest.raises(ConfigError, match="gpu_memory_gb=-1: must be > 0"):
        plan_command.split_options(["gpu_memory_gb=-1"])


def test_offline_model_names_plan_from_their_converted_copy(capsys, tmp_path, monkeypatch):
    """``llm.path: tiny-llama`` (an offline model, as the quickstart's presets name theirs) is
    planned from its converted copy in the cache, and refused with the conversion command
    before it is converted: plan converts nothing."""
    from mmbridge.registry.plugin_manager import load_registry

    monkeypatch.setenv("MMBRIDGE_CACHE", str(tmp_path / "cache"))
    registry = load_registry()
    with pytest.raises(
        ConfigError,
        match=r"llm.path: offline model 'tiny-llama' is not converted.*"
        r"mmbridge assets --convert tiny-llama",
    ):
        config_dir("tiny-llama", "llm.path", registry)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))
    location = registry.get("asset", "tiny-llama").create().ensure()
    assert config_dir("tiny-llama", "llm.path", registry) == location
    build_tiny_dinov2(tmp_path / "enc")
    _, data = run_plan(
        capsys,
        "experiment=tiny",
        "llm.path=tiny-llama",
        "encoder=dinov2_small",
        f"encoder.path={tmp_path / 'enc'}",
    )
    llm = HFCausalLM(path=str(location))
    assert data["params"]["llm"] == sum(p.numel() for p in llm.parameters())
