"""Conversation formats (mmbridge.data.conversation) against LLaVA's, written out by hand.

The expectations are LLaVA's (haotian-liu/LLaVA ``llava/conversation.py`` and
``preprocess_plain`` / ``preprocess_v1`` / ``preprocess_llama_2`` in ``llava/train/train.py``):
the rendered string, and the supervised text. Token level with a Llama tokenizer (BPE with
byte fallback and the ``▁`` metaspace, BOS added, ``</s>`` special) trained here on a few lines:
the Vicuna/Llama-2 family's tokenizer, built offline.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer

from mmbridge.config import compose
from mmbridge.config.validation import config_errors
from mmbridge.data.chat import IGNORE, ChatEncoder, to_messages
from mmbridge.data.conversation import (
    LLAMA_2_SYSTEM,
    VICUNA_SYSTEM,
    ConversationSpec,
    move_media_first,
    stage_conversation,
)
from mmbridge.errors import ConfigError, DataError

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)

MULTI_TURN_IMAGE_LAST = [
    {"from": "human", "value": "What colour is the circle?\n<image>"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "In the top left."},
]
IMAGE_FIRST = [
    {"from": "human", "value": "<image>\nDescribe the image briefly."},
    {"from": "gpt", "value": "A red circle."},
]
TEXT_ONLY = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]


@pytest.fixture(scope="module")
def llama_tok():
    """A Llama tokenizer (transformers' LlamaTokenizer: metaspace, byte fallback, BOS <s>)."""
    lines = [
        SYS,
        "USER: What colour is the circle? ASSISTANT: Red.",
        "Where is it? In the top left.",
        "Describe the image briefly. A red circle.",
        "Name a colour. Blue.",
        "[INST] <<SYS>> You are a helpful assistant. <</SYS>> Hi [/INST] Hello. Bye Goodbye.",
    ]
    bpe = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(
        lines * 20,
        trainer=trainers.BpeTrainer(vocab_size=420, special_tokens=special, show_progress=False),
    )
    model = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True
    )
    tok.pad_token = tok.unk_token
    return tok


def encoder(tok, name: str, image_first: bool = False, **kw) -> ChatEncoder:
    return ChatEncoder(
        tok,
        ["image"],
        max_length=512,
        conversation=ConversationSpec(name, image_first=image_first, **kw),
    )


def supervised_runs(tok, enc) -> list[str]:
    """The supervised tokens, decoded run by run (labels must equal the ids there)."""
    runs, cur = [], []
    for tid, label in zip(enc.input_ids, enc.labels):
        if label == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == tid
            cur.append(tid)
    if cur:
        runs.append(cur)
    return [tok.decode(r).strip() for r in runs]


# -- strings --------------------------------------------------------------------------------------
def test_vicuna_v1_multi_turn_image_moved_first(llama_tok):
    chat = encoder(llama_tok, "vicuna_v1", image_first=True)
    text = chat.render(to_messages(MULTI_TURN_IMAGE_LAST))
    assert VICUNA_SYSTEM == SYS
    assert text == (
        SYS + " USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>"
        "USER: Where is it? ASSISTANT: In the top left.</s>"
    )
    prompt = chat.render(to_messages(MULTI_TURN_IMAGE_LAST[:3]), add_generation_prompt=True)
    assert prompt == (
        SYS + " USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>"
        "USER: Where is it? ASSISTANT:"
    )


def test_vicuna_v1_image_last_kept_without_image_first(llama_tok):
    text = encoder(llama_tok, "vicuna_v1").render(to_messages(MULTI_TURN_IMAGE_LAST[:2]))
    assert text == SYS + " USER: What colour is the circle?\n<image> ASSISTANT: Red.</s>"


def test_vicuna_v1_system_turn_first_assistant_turn_and_alternation(llama_tok):
    chat = encoder(llama_tok, "vicuna_v1")
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "skipped"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert chat.render(msgs) == "Be brief. USER: Hi ASSISTANT: Hello.</s>"
    with pytest.raises(DataError, match="alternate user / assistant.*turn 1 is 'user'"):
        chat.encode([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {})


def test_plain_drops_the_question(llama_tok):
    chat = encoder(llama_tok, "plain")
    assert chat.render(to_messages(IMAGE_FIRST)) == "<image>A red circle.\n"
    last = [{"from": "human", "value": "Describe it.\n<image>"}, IMAGE_FIRST[1]]
    assert chat.render(to_messages(last)) == "<image>A red circle.\n"
    with pytest.raises(DataError, match="needs a media placeholder in the first turn"):
        chat.encode(to_messages(TEXT_ONLY), {}, sample_id="t1")
    with pytest.raises(DataError, match="exactly two turns.*has 4"):
        chat.encode(to_messages(MULTI_TURN_IMAGE_LAST), {"image": 3})


def test_llama_2_two_rounds(llama_tok):
    chat = encoder(llama_tok, "llama_2")
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    assert chat.render(msgs) == (
        f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\nHi [/INST] Hello. </s>"
        "<s>[INST] Bye [/INST] Goodbye. </s>"
    )
    assert LLAMA_2_SYSTEM.startswith("You are a helpful, respectful and honest assistant. Always")
    assert "safe.  Your answers" in LLAMA_2_SYSTEM and "nature.\n\nIf a question" in LLAMA_2_SYSTEM
    own = encoder(llama_tok, "llama_2", system="S")
    assert (
        own.render(msgs[:1], add_generation_prompt=True)
        == "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]"
    )
    assert (
        encoder(llama_tok, "llama_2", system="").render(msgs[:2]) == "[INST] Hi [/INST] Hello. </s>"
    )


def test_chatml_standard_with_newlines(llama_tok):
    chat = encoder(llama_tok, "chatml")
    msgs = to_messages(MULTI_TURN_IMAGE_LAST[:2])
    assert chat.render(msgs) == (
        "<|im_start|>user\nWhat colour is the circle?\n<image><|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
    )
    sys_chat = encoder(llama_tok, "chatml", image_first=True, system="Be brief.")
    assert sys_chat.render(msgs[:1], add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat colour is the "
        "circle?<|im_end|>\n<|im_start|>assistant\n"
    )
    rendered = sys_chat.format.render(sys_chat.prepare(msgs))
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Red.<|im_end|>"]


def test_move_media_first_is_llava_preprocess_multimodal():
    msgs = [
        {"role": "user", "content": "  Look: <image> here  "},
        {"role": "assistant", "content": "ok"},
    ]
    assert move_media_first(msgs, ["image"])[0]["content"] == "<image>\nLook:  here"
    assert move_media_first(msgs, ["image"])[1] == msgs[1]


# -- tokens (Llama tokenizer) ---------------------------------------------------------------------
def test_vicuna_v1_tokens_and_masks(llama_tok):
    chat = encoder(llama_tok, "vicuna_v1", image_first=True)
    enc = chat.encode(to_messages(MULTI_TURN_IMAGE_LAST), {"image": 3})
    assert (
        enc.input_ids[0] == llama_tok.bos_token_id
        and enc.input_ids.count(llama_tok.bos_token_id) == 1
    )
    assert enc.labels[0] == IGNORE
    assert supervised_runs(llama_tok, enc) == ["Red.</s>", "In the top left.</s>"]
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE)
    head = [t for t, w in zip(enc.input_ids[:first], enc.slot_modality) if not w]
    # everything up to and including "ASSISTANT: " is ignored (LLaVA's instruction part; this
    # tokenizer writes the space before "Red" as a token of its own)
    assert llama_tok.decode(head).endswith("What colour is the circle? ASSISTANT: ")
    slots = [i for i, w in enumerate(enc.slot_modality) if w == "image"]
    n_prefix = len(llama_tok(SYS + " USER: ", add_special_tokens=False)["input_ids"])
    assert slots == [1 + n_prefix, 2 + n_prefix, 3 + n_prefix]
    assert enc.input_ids[-1] == llama_tok.eos_token_id
    gen = chat.encode(
        to_messages(MULTI_TURN_IMAGE_LAST[:1]), {"image": 3}, add_generation_prompt=True
    )
    assert set(gen.labels) == {IGNORE}
    assert llama_tok.decode(
        [t for t, w in zip(gen.input_ids, gen.slot_modality) if not w]
    ).endswith("? ASSISTANT:")


def test_vicuna_v1_text_only_tokens(llama_tok):
    enc = encoder(llama_tok, "vicuna_v1", image_first=True).encode(to_messages(TEXT_ONLY), {})
    assert supervised_runs(llama_tok, enc) == ["Blue.</s>"]
    assert enc.input_ids[0] == llama_tok.bos_token_id
    assert llama_tok.decode(enc.input_ids, skip_special_tokens=True) == (
        SYS + " USER: Name a colour. ASSISTANT: Blue."
    )


def test_plain_tokens_and_masks(llama_tok):
    enc = encoder(llama_tok, "plain").encode(to_messages(IMAGE_FIRST), {"image": 4})
    # BOS and the image slots ignored (LLaVA's tokenized_len of "<image>"), caption + "\n"
    # supervised
    assert enc.input_ids[0] == llama_tok.bos_token_id
    assert enc.slot_modality[1:5] == ["image"] * 4
    assert enc.labels[:5] == [IGNORE] * 5
    assert all(lab != IGNORE for lab in enc.labels[5:])
    assert llama_tok.decode(enc.input_ids[5:]) == "A red circle.\n"
    assert llama_tok.eos_token_id not in enc.input_ids


def test_llama_2_tokens_and_masks(llama_tok):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    enc = encoder(llama_tok, "llama_2", system="").encode(msgs, {})
    assert supervised_runs(llama_tok, enc) == ["Hello. </s>", "Goodbye. </s>"]
    assert enc.input_ids.count(llama_tok.bos_token_id) == 2  # the start and the second round's <s>


def test_native_is_unchanged():
    from mmbridge.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    msgs = to_messages(TEXT_ONLY)
    a = ChatEncoder(tok, ["image"]).encode(msgs, {})
    b = ChatEncoder(tok, ["image"], conversation=ConversationSpec("native")).encode(msgs, {})
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert ChatEncoder(tok, ["image"]).start_ids == []


# -- config ---------------------------------------------------------------------------------------
def test_config_group_and_per_stage_format(registry):
    cfg = compose(["experiment=llava15_7b"], registry)
    assert cfg.conversation.name == "vicuna_v1" and cfg.conversation.image_first is True
    assert stage_conversation(cfg, "align") == (
        ConversationSpec("plain"),
        "stages.align.conversation",
    )
    assert stage_conversation(cfg, "instruct") == (
        ConversationSpec("vicuna_v1", image_first=True),
        "conversation",
    )
    tiny = compose(["experiment=tiny"], registry)
    assert stage_conversation(tiny, "align")[0] == ConversationSpec()
    chatml = compose(["experiment=tiny", "conversation=chatml"], registry)
    assert stage_conversation(chatml, "instruct")[0].name == "chatml"


def test_bad_format_is_one_clear_error(registry):
    cfg = compose(["experiment=tiny", "conversation.name=vicuna"], registry)
    errors = config_errors(cfg, registry)
    assert any(
        e.startswith("conversation.name='vicuna': expected one of native, plain, vicuna_v1")
        for e in errors
    ), errors
    cfg = compose(["experiment=tiny", "+stages.align.conversation={name: nope}"], registry)
    assert any(
        e.startswith("stages.align.conversation.name='nope'") for e in config_errors(cfg, registry)
    )
    with pytest.raises(ConfigError, match="stages.align.conversation.name='nope'.*valid: native"):
        ConversationSpec.from_node({"name": "nope"}, "stages.align.conversation")


@pytest.mark.parametrize("name", ["vicuna_v1", "llama_2", "chatml", "plain"])
def test_the_formats_jinja_template_renders_the_same(llama_tok, name):
    """ChatEncoder.template (what an export writes) renders as the format does."""
    chat = encoder(llama_tok, name)
    records = (
        [IMAGE_FIRST, to_messages(IMAGE_FIRST)]
        if name == "plain"
        else [
            to_messages(MULTI_TURN_IMAGE_LAST),
            to_messages(TEXT_ONLY),
            [{"role": "system", "content": "Line one.\nLine two."}, *to_messages(TEXT_ONLY)],
        ]
    )
    for msgs in records[1:]:
        for k in (len(msgs), len(msgs) - 1):
            part = msgs[:k]
            want = chat.render(part, add_generation_prompt=k < len(msgs))
            got = llama_tok.apply_chat_template(
                part,
                chat_template=chat.template,
                tokenize=False,
                add_generation_prompt=k < len(msgs),
            )
            assert got == want, (name, k)


def test_chatml_is_smollm2s_own_template_token_for_token(registry):
    """Standard ChatML = a real ChatML model's template (SmolLM2-135M-Instruct, offline)."""
    from transformers import AutoTokenizer

    asset = registry.get("asset", "smollm2-135m-instruct").create()
    if not asset.is_converted():
        pytest.skip("the offline SmolLM2 is not converted (scripts/setup.sh converts it)")
    tok = AutoTokenizer.from_pretrained(asset.location())
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "Red."},
    ]
    chat = ChatEncoder(tok, ["image"], conversation=ConversationSpec("chatml"))
    assert chat.render(msgs) == tok.apply_chat_template(msgs, tokenize=False)
    assert chat.render(msgs[:2], add_generation_prompt=True) == tok.apply_chat_template(
        msgs[:2], tokenize=False, add_generation_prompt=True
    )
    enc = chat.encode(msgs, {})
    own = tok.apply_chat_template(msgs, tokenize=True)
    assert enc.input_ids == list(own["input_ids"] if hasattr(own, "keys") else own)
    assert supervised_runs(tok, enc) == ["Red.<|im_end|>"]
