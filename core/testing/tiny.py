"""Tiny real models for tests and smoke runs, built deterministically and saved with
``save_pretrained`` so that components load them through their ordinary loading code.

* :func:`build_tiny_tokenizer` - a byte-level BPE tokenizer trained on a built-in corpus of the
  shapes data set's language (colours, shapes, positions, numbers, question words), with a chat
  template;
* :func:`build_tiny_llama` - a seeded random ``LlamaForCausalLM`` with that tokenizer;
* :func:`build_tiny_dinov2`, :func:`build_tiny_clip_vision` - vision towers with their
  ``preprocessor_config.json`` (for the ``hf_vision`` encoder).

Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "grey",
    "pink",
    "brown",
    "cyan",
    "magenta",
]
SHAPES = [
    "circle",
    "square",
    "triangle",
    "rectangle",
    "star",
    "ellipse",
    "diamond",
    "cross",
    "hexagon",
    "pentagon",
    "heart",
    "line",
    "dot",
    "shape",
    "object",
]
POSITIONS = [
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "centre",
    "middle",
    "upper",
    "lower",
    "corner",
    "side",
    "above",
    "below",
    "next",
    "near",
]
SIZES = ["small", "large", "big", "tiny", "medium"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
#: Instruction and answer words beyond the shapes vocabulary (tools, descriptions, replies).
WORDS = [
    "what",
    "which",
    "how",
    "many",
    "where",
    "is",
    "are",
    "there",
    "the",
    "a",
    "an",
    "of",
    "in",
    "on",
    "at",
    "and",
    "or",
    "with",
    "it",
    "this",
    "that",
    "image",
    "picture",
    "photo",
    "shows",
    "show",
    "contains",
    "colour",
    "color",
    "size",
    "position",
    "located",
    "count",
    "number",
    "describe",
    "answer",
    "question",
    "word",
    "words",
    "please",
    "briefly",
    "yes",
    "no",
    "not",
    "none",
    "only",
    "each",
    "all",
    "both",
    "background",
    "text",
    "read",
    "says",
    "tool",
    "result",
    "call",
    "calculator",
    "audio",
    "sound",
    "speech",
    "transcript",
    "user",
    "assistant",
    "you",
    "can",
    "see",
    "total",
    "sum",
    "plus",
    "minus",
    "times",
    "equals",
    "use",
    "give",
    "short",
    "caption",
    "than",
    "more",
    "fewer",
    "same",
    "different",
    "first",
    "second",
    "third",
    "from",
    "to",
    "for",
    "be",
    "has",
    "have",
    "do",
    "does",
    "kind",
    "drawn",
    "part",
    "between",
    "inside",
    "objects",
    "shapes",
]
SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",
]
#: Jinja chat template: one ``<|role|>`` block per turn, closed by ``<|end|>`` (the eos, so
#: that generation stops at the end of the assistant's turn).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def tiny_corpus() -> list[str]:
    """A few hundred deterministic lines in the language of the generated shape data sets."""
    lines = []
    for k, (c, s) in enumerate(itertools.product(COLOURS, SHAPES)):
        v, h = ["top", "bottom", "middle"][k % 3], ["left", "right", "center"][k // 3 % 3]
        size = SIZES[k % len(SIZES)]
        lines += [
            f"A {size} {c} {s} in the {v} {h} corner.",
            f"What colour is the {s}? {c.capitalize()}.",
            f"Where is the {c} {s}? In the {v} {h}.",
            f"Is there a {c} {s}? Yes, there is a {c} {s} {POSITIONS[k % len(POSITIONS)]} it.",
        ]
    for k, n in enumerate(NUMBERS):
        s = SHAPES[k % len(SHAPES)]
        lines += [
            f"How many {s}s are there? {n.capitalize()}. There are {k} {s}s.",
            f"Count the shapes: {k}, {n}; {k} + {k} = {2 * k}.",
        ]
    words = COLOURS + SHAPES + POSITIONS + SIZES + NUMBERS + WORDS
    for k in range(0, len(words), 6):
        chunk = words[k : k + 6]
        lines += [
            " ".join(chunk) + ".",
            " ".join(w.capitalize() for w in chunk) + "?",
            "(" + ", ".join(chunk) + ")!",
        ]
    lines += [
        "Describe the image briefly.",
        "Answer with one word.",
        "Which shape is red?",
        "Which shapes are blue? The circle and the square.",
        "Read the text in the image.",
        '{"name": "calculator", "arguments": {"expression": "3 * 4"}} -> 12',
        "The picture shows two shapes on a white background.",
        "0 1 2 3 4 5 6 7 8 9 10",
    ]
    return lines


def build_tiny_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 1400) -> Any:
    """Train a byte-level BPE tokenizer on :func:`tiny_corpus` (deterministic).

    Each corpus line is repeated so that every listed word becomes one token (with and without
    a leading space, e.g. ``"red"``, ``" red"``, ``"Red"``). Bos ``<s>``, eos ``<|end|>`` (the
    end of a chat turn), pad ``<pad>``; chat template :data:`CHAT_TEMPLATE`.

    Returns:
        A ``PreTrainedTokenizerFast``, saved into ``out_dir`` when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = COLOURS + SHAPES + POSITIONS + SIZES + NUMBERS + WORDS
    # Every word in four spellings (after a space or starting a turn, lower or capitalised),
    # many times, so that whole words win the merges.
    spellings = [f"{w}\n{w.capitalize()}\n {w} {w.capitalize()}" for w in words]
    corpus = tiny_corpus() + spellings * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[3:7],
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 256,
    seed: int = 0,
) -> Any:
    """A seeded random ``LlamaForCausalLM`` plus :func:`build_tiny_tokenizer`, both saved into
    ``out_dir`` (an HF model directory). Returns the in-memory model (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    return model.eval()


def _save_vision(model: Any, processor: Any, out_dir: str | Path) -> Any:
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return model.eval()


def build_tiny_dinov2(
    out_dir: str | Path,
    hidden: int = 32,
    layers: int = 2,
    patch_size: int = 4,
    image_size: int = 16,
    seed: int = 0,
) -> Any:
    """A seeded random ``Dinov2Model`` with a ``BitImageProcessor`` (resize + centre crop to
    ``image_size``, ImageNet mean/std), saved into ``out_dir``; returns the model."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=patch_size,
        image_size=image_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    processor = BitImageProcessor(
        size={"shortest_edge": image_size + image_size // 8},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return _save_vision(model, processor, out_dir)


def build_tiny_clip_vision(
    out_dir: str | Path,
    hidden: int = 32,
    layers: int = 2,
    patch_size: int = 4,
    image_size: int = 16,
    seed: int = 0,
) -> Any:
    """A seeded random ``CLIPVisionModel`` with a ``CLIPImageProcessor``, saved into
    ``out_dir``; returns the model."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        patch_size=patch_size,
        image_size=image_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return _save_vision(model, processor, out_dir)
