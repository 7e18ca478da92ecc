"""``mmbridge inspect`` / ``mmbridge.inspect``: what the model is fed, checked by value.

The tiny run through the CLI (``--json``), and LLaVA-1.5's preset on LLaVA-format records with a
Llama tokenizer (weights never written: the LLM is built without them): stage 1 in ``plain``,
stage 2 in ``vicuna_v1`` with the image moved first, images padded to a square.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from helpers import shared_registry
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaTokenizer

import mmbridge
from mmbridge.cli import main as cli
from mmbridge.data.chat import IGNORE
from mmbridge.plugins.llms.hf_causal import HFCausalLM
from mmbridge.runtime.inspection import format_records

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


def test_inspect_tiny_instruct_json(tmp_path, monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("inspect loaded the LLM's weights")

    monkeypatch.setattr(HFCausalLM, "__init__", no_weights)  # the meta-device path only
    registry = shared_registry()  # the command's own build skipped: the suite shares one
    monkeypatch.setattr("mmbridge.registry.plugin_manager.load_registry", lambda *a, **k: registry)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli(
            [
                "inspect",
                "experiment=tiny",
                "stage=instruct",
                "n=2",
                "--json",
                f"paths.data_dir={tmp_path}",
                "data.n_train=8",
                "data.n_val=2",
                "data.n_test=2",
            ]
        )
    assert rc == 0
    records = json.loads(out.getvalue())
    assert [r["id"] for r in records] == ["train-000000", "train-000001"]
    from mmbridge.testing.tiny import CHAT_TEMPLATE, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE
    for r in records:
        assert r["stage"] == "instruct" and r["conversation"] == {
            "name": "native",
            "key": "conversation",
        }
        (m,) = r["media"]
        assert m["kind"] == "image" and m["file"].endswith(".png") and m["slots"] == 64
        a = m["first_slot"]
        assert r["input_ids"][:a] == tok("<s><|user|>\n", add_special_tokens=False)["input_ids"]
        assert set(r["labels"][a : a + 64]) == {IGNORE}
        assert r["input_ids"][a : a + 64] == [tok.pad_token_id] * 64
        assert r["text"].count("<image x64>") == 1 and "<image>" not in r["text"]
        sup = [i for i, lab in enumerate(r["labels"]) if lab != IGNORE]
        assert sup and all(r["labels"][i] == r["input_ids"][i] for i in sup)
        # every supervised run is one answer and its end of turn, as the template writes it
        assert r["supervised"] and all(s.endswith("<|end|>\n") for s in r["supervised"])
        assert sum(
            len(tok(s, add_special_tokens=False)["input_ids"]) for s in r["supervised"]
        ) == len(sup)
        # the text is the chat template's rendering with the image span as one marker
        assert r["text"].replace("<image x64>", "<image>").startswith("<s><|user|>\n<image>")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """config.json + a Llama tokenizer, and no weights."""
    lines = [
        SYS,
        "USER: What colour is the circle? ASSISTANT: Red.",
        "A red circle on grey.",
        "Describe the image. Where is it? In the top left.",
    ]
    bpe = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(
        lines * 20,
        trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False),
    )
    model = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True
    )
    out = tmp_path_factory.mktemp("llava") / "llama"
    tok.save_pretrained(out)
    LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_data")
    a = np.zeros((8, 16, 3), dtype=np.uint8)
    a[:, :, 0] = 255  # a red 16 x 8 image
    Image.fromarray(a).save(root / "red.png")
    pretrain = [
        {
            "id": "p0",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "Describe the image.\n<image>"},
                {"from": "gpt", "value": "A red circle on grey."},
            ],
        }
    ]
    mix = [
        {
            "id": "m0",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "What colour is the circle?\n<image>"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Where is it?"},
                {"from": "gpt", "value": "In the top left."},
            ],
        },
        {
            "id": "m1",
            "conversations": [
                {"from": "human", "value": "Where is it?"},
                {"from": "gpt", "value": "In the top left."},
            ],
        },
    ]
    (root / "pretrain.json").write_text(json.dumps(pretrain))
    (root / "mix.json").write_text(json.dumps(mix))
    return root


def _llava(llama_dir, llava_data, stage, tmp_path, mix: str = "mix.json", **kw):
    return mmbridge.inspect(
        [
            "experiment=llava15_7b",
            "encoder=tiny_vit",
            f"llm.path={llama_dir}",
            "llm.dtype=float32",
            "trainer=cpu",
            f"data.train={llava_data / mix}",
            f"data.media_root={llava_data}",
            f"stages.align.data.train={llava_data / 'pretrain.json'}",
            f"stages.align.data.media_root={llava_data}",
        ],
        stage=stage,
        n=2,
        registry=shared_registry(),
        **kw,
    )


def test_llava15_align_is_plain_with_padded_images(llama_dir, llava_data, tmp_path):
    # the align stage reads its own data only: the run's (instruct's) file is never opened
    (r,) = _llava(
        llama_dir, llava_data, "align", tmp_path, mix="absent.json", images=tmp_path / "png"
    )
    tok = LlamaTokenizer.from_pretrained(llama_dir)
    assert r["conversation"] == {"name": "plain", "key": "stages.align.conversation"}
    # LLaVA's preprocess_plain: BOS, the image, the caption and "\n"; the question dropped
    assert r["text"] == "<s><image x64>A red circle on grey.\n"
    assert r["media"][0]["first_slot"] == 1
    assert r["labels"][:65] == [IGNORE] * 65
    assert tok.decode(r["input_ids"][65:]) == "A red circle on grey.\n"
    assert r["supervised"] == ["A red circle on grey.\n"]
    png = np.asarray(Image.open(r["images"][0]))
    # 16 x 8 red padded to 16 x 16 with the mean colour (timm's 0.5: 127), then resized to 64
    assert png.shape == (64, 64, 3)
    assert png[2, 32].tolist() == [127, 127, 127] and png[32, 32].tolist() == [255, 0, 0]


def test_llava15_instruct_is_vicuna_v1(llama_dir, llava_data, tmp_path):
    first, text_only = _llava(llama_dir, llava_data, "instruct", tmp_path)
    tok = LlamaTokenizer.from_pretrained(llama_dir)
    assert first["conversation"] == {"name": "vicuna_v1", "key": "conversation"}
    assert first["text"] == (
        "<s>" + SYS + " USER: <image x64>\nWhat colour is the circle? ASSISTANT: "
        "Red.</s>USER: Where is it? ASSISTANT: In the top left.</s>"
    )
    assert [s.strip() for s in first["supervised"]] == ["Red.</s>", "In the top left.</s>"]
    n_head = len(tok(SYS + " USER: ")["input_ids"])  # BOS included
    assert first["media"] == [
        {"kind": "image", "file": str(llava_data / "red.png"), "first_slot": n_head, "slots": 64}
    ]
    assert text_only["media"] == [] and text_only["text"] == (
        "<s>" + SYS + " USER: Where is it? ASSISTANT: In the top left.</s>"
    )
    assert text_only["labels"][-1] == tok.eos_token_id
    shown = format_records([first]).splitlines()
    assert shown[0].startswith(
        "== sample m0 (stage instruct, conversation vicuna_v1 from conversation): "
    )
    assert shown[1] == "<s>" + SYS + " USER: <image x64>"
    assert f"-- image {llava_data / 'red.png'}: slots {n_head}..{n_head + 63} (64)" in shown


def test_inspect_refuses_an_unknown_stage_and_a_bad_n():
    from mmbridge.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"stage=nope: not a key of stages; stages: align, instruct"
    ):
        mmbridge.inspect(["experiment=tiny"], stage="nope", registry=shared_registry())
    with pytest.raises(ConfigError, match=r"n=0: expected a number of samples >= 1"):
        mmbridge.inspect(["experiment=tiny"], n=0)
