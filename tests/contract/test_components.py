"""Values and behaviour of the built-in converters, image encoders, the HF causal LM wrapper and
the tiny-llama asset, all on tiny real models saved to and loaded from temporary directories."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import shared_registry
from torch import nn

from mmbridge.config import builtin_conf_dir
from mmbridge.config.build import build
from mmbridge.errors import ConfigError
from mmbridge.plugins.converters.linear import LinearConverter
from mmbridge.plugins.converters.mlp import MLPConverter
from mmbridge.plugins.encoders.hf_vision import HFVisionEncoder
from mmbridge.plugins.encoders.timm_encoder import TimmEncoder
from mmbridge.plugins.llms.hf_causal import HFCausalLM
from mmbridge.testing import tiny
from mmbridge.testing.contracts import check_encoder


def _conf(group: str, option: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(builtin_conf_dir() / group / f"{option}.yaml")


# -- converters --------------------------------------------------------------------------------
def test_linear_is_one_affine_map_per_token():
    torch.manual_seed(0)
    conv = LinearConverter(in_dim=6, out_dim=4)
    x, mask = (
        torch.randn(2, 5, 6),
        torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool),
    )
    out, out_mask = conv(x, mask)
    torch.testing.assert_close(out, x @ conv.proj.weight.T + conv.proj.bias)
    assert torch.equal(out_mask, mask) and conv.out_tokens(7) == 7


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_depth_and_values(depth):
    torch.manual_seed(0)
    conv = MLPConverter(in_dim=6, out_dim=4, depth=depth, hidden_dim=8 if depth > 1 else None)
    linears = [m for m in conv.net if isinstance(m, nn.Linear)]
    assert len(linears) == depth and sum(isinstance(m, nn.GELU) for m in conv.net) == depth - 1
    assert linears[0].in_features == 6 and linears[-1].out_features == 4
    x = torch.randn(2, 3, 6)
    want = x
    for k, lin in enumerate(linears):
        want = lin(F.gelu(want) if k else want)
    torch.testing.assert_close(conv(x, torch.ones(2, 3, dtype=torch.bool))[0], want)


def test_mlp_defaults_to_llava15_shape_and_checks_args():
    conv = MLPConverter(in_dim=6, out_dim=4)
    assert [m.out_features for m in conv.net if isinstance(m, nn.Linear)] == [4, 4]
    with pytest.raises(ConfigError, match="connector.depth"):
        MLPConverter(in_dim=6, out_dim=4, depth=0)


# -- timm --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("timm")
    TimmEncoder.for_testing(d)  # writes d/tiny_vit.safetensors
    return d


def _vit(vit_dir, **kwargs):
    return TimmEncoder.for_testing(vit_dir, **kwargs)


def test_timm_loads_the_checkpoint(vit_dir):
    from safetensors.torch import load_file

    enc = _vit(vit_dir)
    saved = load_file(str(vit_dir / "tiny_vit.safetensors"))
    for name, value in enc.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    random = TimmEncoder(**{k: v for k, v in enc.args.items() if k != "pretrained_path"})
    assert random.cache_identity()["weights"] != enc.cache_identity()["weights"]
    assert TimmEncoder(**enc.args).cache_identity() == enc.cache_identity()


@pytest.mark.parametrize(
    ("kwargs", "n"),
    [
        ({}, 16),
        ({"drop_cls": False}, 17),
        ({"pool_to": 2}, 4),
        ({"pool_to": 1, "drop_cls": False}, 2),
        ({"feature_layer": 0}, 16),
    ],
)
def test_timm_token_count(vit_dir, kwargs, n):
    enc = _vit(vit_dir, **kwargs)
    x = enc.preprocess(enc.load(enc.example_media(vit_dir, 0)))
    feats, mask = enc(x[None])
    assert feats.shape == (1, n, 32) and enc.num_tokens(x) == n and mask.all()


def test_timm_feature_layer_and_pooling_values(vit_dir):
    full = _vit(vit_dir, drop_cls=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        block0 = full.model.blocks[0](
            full.model.norm_pre(full.model._pos_embed(full.model.patch_embed(x)))
        )
        last = full(x)[0]
        first = _vit(vit_dir, feature_layer=0, drop_cls=False)
        torch.testing.assert_close(first(x)[0], block0)
        assert len(first.model.blocks) == 1  # later blocks are cut
        pooled = _vit(vit_dir, pool_to=2)(x)[0]
    grid = last[:, 1:].reshape(2, 4, 4, 32)
    want = grid.reshape(2, 2, 2, 2, 2, 32).mean(dim=(2, 4)).reshape(2, 4, 32)
    torch.testing.assert_close(pooled, want)


def test_tiny_vit_config_builds():
    enc = build(shared_registry(), "encoder", _conf("encoder", "tiny_vit"), "encoder")
    x = torch.zeros(3, 64, 64)
    assert isinstance(enc, TimmEncoder) and enc.out_dim == 192 and enc.num_tokens(x) == 64
    assert enc(x[None])[0].shape == (1, 64, 192)
    again = build(shared_registry(), "encoder", _conf("encoder", "tiny_vit"), "encoder")
    assert again.cache_identity() == enc.cache_identity()  # seeded random weights: same cache key


def test_timm_preprocess_and_errors(vit_dir, tmp_path):
    from PIL import Image

    enc = _vit(vit_dir)
    x = enc.preprocess(Image.new("RGB", (50, 20), (255, 0, 127)))
    assert x.shape == (3, 32, 32)  # whole image resized, mean/std 0.5 from timm's data config
    torch.testing.assert_close(x[:, 5, 5], torch.tensor([1.0, -1.0, 127 / 255 * 2 - 1]))
    with pytest.raises(ConfigError, match="pool_to"):
        _vit(vit_dir, pool_to=5)
    with pytest.raises(ConfigError, match="did you mean 'vit_tiny_patch16_224'"):
        TimmEncoder("vit_tiny_patch16_22", image_size=32)
    with pytest.raises(ConfigError, match="pretrained_path"):
        TimmEncoder("vit_tiny_patch16_224", pretrained_path=str(tmp_path / "none.pth"))


# -- hf_vision ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_vision")
    return {
        "dino": (d / "dino", tiny.build_tiny_dinov2(d / "dino")),
        "clip": (d / "clip", tiny.build_tiny_clip_vision(d / "clip")),
    }


@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_hf_vision_layers_match_the_model(vision_dirs, kind, tmp_path):
    path, model = vision_dirs[kind]
    enc = HFVisionEncoder(path=str(path), feature_layer=[-1, -2])
    x = enc.preprocess(enc.load(enc.example_media(tmp_path, 1)))
    feats, mask = enc(x[None])
    ref = model(pixel_values=x[None], output_hidden_states=True)
    assert feats.shape == (1, 16, 64) and enc.out_dim == 64 and mask.all()  # [-1, -2] doubles D
    torch.testing.assert_close(feats[..., :32], ref.last_hidden_state[:, 1:])
    torch.testing.assert_close(feats[..., 32:], ref.hidden_states[-2][:, 1:])
    single = HFVisionEncoder(path=str(path), feature_layer=1, drop_cls=False)
    torch.testing.assert_close(single(x[None])[0], ref.hidden_states[1])
    assert single.num_tokens(x) == 17


def test_hf_vision_preprocessing_matches_the_image_processor(vision_dirs, tmp_path):
    from transformers import AutoImageProcessor

    for path, _ in vision_dirs.values():
        enc = HFVisionEncoder(path=str(path))
        proc = AutoImageProcessor.from_pretrained(str(path), backend="pil")
        for i in range(3):
            img = enc.load(enc.example_media(tmp_path, i))
            torch.testing.assert_close(
                enc.preprocess(img), proc(img, return_tensors="pt")["pixel_values"][0]
            )


def test_hf_vision_size_pool_and_unused_parameters(vision_dirs, tmp_path):
    path, model = vision_dirs["dino"]
    enc = HFVisionEncoder(path=str(path), image_size=24, pool_to=3)
    x = enc.preprocess(enc.load(enc.example_media(tmp_path, 0)))
    assert x.shape == (3, 24, 24) and enc.grid == (6, 6) and enc.num_tokens(x) == 9
    assert enc(x[None])[0].shape == (1, 9, 32)
    names = dict(enc.model.named_parameters())
    assert "embeddings.mask_token" not in names  # never used by the features: a buffer now
    assert "embeddings.mask_token" in enc.model.state_dict()
    cut = HFVisionEncoder(path=str(path), feature_layer=1)
    assert len(cut.model.encoder.layer) == 1 and "layernorm.weight" not in dict(
        cut.model.named_parameters()
    )
    assert cut.cache_identity() != HFVisionEncoder(path=str(path)).cache_identity()
    with pytest.raises(ConfigError, match="feature_layer"):
        HFVisionEncoder(path=str(path), feature_layer=5)


# -- hf_causal ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llm")
    tiny.build_tiny_llama(d, hidden=32, layers=2, heads=2, intermediate=64)
    return d


def test_hf_causal_split_forward_equals_the_model(llm_dir):
    llm = HFCausalLM(path=str(llm_dir))
    tok = llm.tokenizer
    ids = torch.tensor([tok("What colour is the circle?")["input_ids"]])
    ones = torch.ones_like(ids)
    with torch.no_grad():
        ours = llm.logits(llm.hidden(llm.embed(ids), ones))
        torch.testing.assert_close(ours, llm.model(input_ids=ids, attention_mask=ones).logits)
        # a left-padded row gives the same states as the row alone
        padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], dim=1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), ones], dim=1)
        torch.testing.assert_close(llm.logits(llm.hidden(llm.embed(padded), mask))[:, 3:], ours)
    assert llm.hidden_size == 32 and len(llm.decoder_layers) == 2


def test_hf_causal_generate_from_embeddings_equals_from_ids(llm_dir):
    llm = HFCausalLM(path=str(llm_dir))
    tok = llm.tokenizer
    rows = [tok("How many shapes are there?")["input_ids"], tok("Red circle")["input_ids"]]
    t = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    new = llm.generate(llm.embed(ids), mask, max_new_tokens=6)
    ref = llm.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 6
    assert torch.equal(new, ref[:, t:])


def test_hf_causal_lora_trains_only_adapters_and_round_trips(llm_dir):
    llm = HFCausalLM(path=str(llm_dir))
    llm.apply_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    with torch.no_grad():
        for p in llm.parameters():
            if p.requires_grad:
                p.normal_()
    state = llm.trainable_state_dict()
    other = HFCausalLM(path=str(llm_dir))
    other.apply_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    other.load_trainable_state_dict(state)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(
            other.model(input_ids=ids).logits, llm.model(input_ids=ids).logits
        )
        assert not torch.allclose(
            HFCausalLM(path=str(llm_dir)).model(input_ids=ids).logits,
            llm.model(input_ids=ids).logits,
        )
    assert llm.identity()["lora"]["r"] == 4
    llm.apply_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])  # next stage
    assert [n for n, p in llm.named_parameters() if p.requires_grad] == trainable
    with pytest.raises(ConfigError, match="already carries LoRA"):
        llm.apply_lora(r=8, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    fresh = HFCausalLM(path=str(llm_dir))
    with pytest.raises(ConfigError, match="target_modules"):
        fresh.apply_lora(r=4, alpha=8, dropout=0.0, target_modules=["query"])


def test_hf_causal_tokenizer_fallbacks(llm_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    tok.pad_token, tok.chat_template = None, None
    tok.save_pretrained(str(llm_dir))  # a base model: no pad token, no chat template
    (llm_dir / "chat_template.jinja").unlink(missing_ok=True)
    llm = HFCausalLM(path=str(llm_dir))
    assert llm.tokenizer.pad_token_id == llm.tokenizer.eos_token_id
    text = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    llm = HFCausalLM(path=str(llm_dir), chat_template=str(template))
    assert (
        llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        == "[hi]"
    )
    with pytest.raises(ConfigError, match="llm.dtype"):
        HFCausalLM(path=str(llm_dir), dtype="float8")


# -- tiny tokenizer and the tiny-llama asset ----------------------------------------------------
def test_tiny_tokenizer_is_compact_and_deterministic():
    tok = tiny.build_tiny_tokenizer()
    assert 500 <= len(tok) <= 1500 and tok.get_vocab() == tiny.build_tiny_tokenizer().get_vocab()
    for word in [
        "red",
        "circle",
        "top",
        "left",
        "What",
        "colour",
        "How",
        "many",
        "triangle",
        "Where",
    ]:
        for text in (word, " " + word):
            assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text
    assert tok.decode(tok("Count the 3 shapes: café!")["input_ids"]) == "Count the 3 shapes: café!"
    chat = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What colour is it?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        chat
        == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nWhat colour is it?<|end|>\n<|assistant|>\n"
    )
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<pad>"


def test_tiny_llama_asset_converts_and_loads(tmp_path, monkeypatch):
    from mmbridge.registry.assets import CACHE_ENV, resolve_model_path

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = resolve_model_path("tiny-llama", registry=shared_registry(), key="llm.path")
    assert path == str(tmp_path / "assets" / "tiny-llama")
    check = (tmp_path / "assets" / "tiny-llama" / "CHECK.txt").read_text()
    assert "reloaded logits identical" in check and "2x128" in check
    llm = build(
        shared_registry(), "llm", _conf("llm", "tiny_llama"), "llm"
    )  # the smoke run's LLM config
    assert isinstance(llm, HFCausalLM) and llm.local_path == path
    assert llm.hidden_size == 128 and len(llm.decoder_layers) == 2
    ids = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where is the red circle?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    assert llm.tokenizer.convert_ids_to_tokens(ids[0]) == [
        "<s>",
        "<|user|>",
        "Ċ",
        "Where",
        "Ġis",
        "Ġthe",
        "Ġred",
        "Ġcircle",
        "?",
        "<|end|>",
        "Ċ",
        "<|assistant|>",
        "Ċ",
    ]


# -- real offline models (slower) ---------------------------------------------------------------
def _asset_or_skip(name: str) -> None:
    asset = shared_registry().get("asset", name).create()
    if not (asset.is_converted() or asset.source_available()):
        pytest.skip(f"asset {name} is not installed")


@pytest.mark.integration
def test_dinov2_small_config(tmp_path):
    _asset_or_skip("dinov2-small")
    enc = build(shared_registry(), "encoder", _conf("encoder", "dinov2_small"), "encoder")
    assert enc.out_dim == 384 and enc.grid == (8, 8)
    check_encoder(enc, tmp_path)
    a, b = (enc.preprocess(enc.load(enc.example_media(tmp_path, i))) for i in (0, 1))
    with torch.no_grad():
        feats, _ = enc(torch.stack([a, b]))
    assert feats.shape == (2, 16, 384) and (feats[0] - feats[1]).abs().mean() > 0.1


@pytest.mark.integration
def test_smollm2_answers_and_splits_like_the_model():
    _asset_or_skip("smollm2-135m-instruct")
    llm = build(shared_registry(), "llm", _conf("llm", "smollm2"), "llm")
    tok = llm.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(
            llm.logits(llm.hidden(llm.embed(ids), mask)),
            llm.model(input_ids=ids, attention_mask=mask).logits,
        )
    answer = tok.decode(
        llm.generate(llm.embed(ids), mask, max_new_tokens=12)[0], skip_special_tokens=True
    )
    assert "Paris" in answer
