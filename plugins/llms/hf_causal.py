"""``hf_causal``: any Hugging Face ``AutoModelForCausalLM`` (local directory, offline asset name,
hub id when online, or a GGUF file) with its tokenizer, as a :class:`mmbridge.LanguageModel`."""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmbridge.contracts.llava_parts import LlavaText, LlavaUnrepresentable
from mmbridge.contracts.llm import LanguageModel
from mmbridge.errors import CheckpointError, ConfigError
from mmbridge.model.lora import inject_lora, mark_adapters_trainable, quantization_config
from mmbridge.model.precision import parse_dtype
from mmbridge.registry import Registry
from mmbridge.registry.assets import resolve_model_path

#: Used when the tokenizer ships no chat template (a base model): one ``<|role|>`` block per
#: turn, each closed by the eos token. Only with ``conversation=native``: a named format
#: (``conversation=vicuna_v1``, ``llama_2``, ``chatml``, ``plain``; mmbridge.data.conversation)
#: is what a base model fine-tuned in the field's recipes expects.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def torch_dtype(value: str, key: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (:func:`mmbridge.model.precision.parse_dtype`:
    ``auto`` is decided from this machine when a component is built on its own; a run decides it
    once for all its components); a :class:`ConfigError` naming ``key`` otherwise."""
    return parse_dtype(value, key)


def _prepare_tokenizer(tok: Any, chat_template: str | None) -> Any:
    """A pad token (eos when there is none) and the chat template: ``chat_template`` (text or a
    ``.jinja`` path) when given, the tokenizer's own, else :data:`FALLBACK_CHAT_TEMPLATE`."""
    if tok.pad_token is None:
        # Padding positions are masked out everywhere, so any id works; eos is always there.
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        p = Path(chat_template).expanduser()
        tok.chat_template = (
            p.read_text() if "{" not in chat_template and p.is_file() else chat_template
        )
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


class HFCausalLM(LanguageModel):
    """A Hugging Face causal LM (Llama, SmolLM2, Qwen, GPT-2, ... or a GGUF file) and tokenizer.

    Args:
        path: Offline asset name (``mmbridge assets``), local model directory, or hub id.
        gguf_file: File name of a GGUF checkpoint inside ``path`` (dequantised on load).
        dtype: ``float32`` | ``float16`` | ``bfloat16``.
        chat_template: Jinja chat template (text, or a path to a ``.jinja`` file) replacing the
            tokenizer's own; a tokenizer without one gets :data:`FALLBACK_CHAT_TEMPLATE`.
        attn_implementation: ``auto`` | ``sdpa`` | ``eager`` | ``flash_attention_2``. ``auto``
            (the default) is ``sdpa`` when CUDA is available and ``eager`` otherwise: on the CPU,
            PyTorch's fused SDPA backward for short padded sequences costs more than the whole
            rest of a SmolLM2-135M step (measured by ``scripts/bench_pipeline.py``: 0.97 of 3.4 s
            in the SDPA backward alone; with ``eager`` the step takes 1.95 s).
        reuse_prefix_kv: ``auto`` | ``true`` | ``false``: compute the keys/values of the chat
            template's opening that every sequence of a training batch shares once (per step,
            or per stage while nothing before it trains) instead of once per row; see
            :mod:`mmbridge.model.prefix_kv`.
        gradient_checkpointing: Recompute each decoder block's activations in the backward
            pass instead of keeping them (HF's ``gradient_checkpointing_enable``, non-reentrant):
            activation memory falls from about ``34 B T D`` to ``2 B T D`` bytes per layer for
            about a third more compute; it acts only while the module trains.
        quantization: QLoRA's 4-bit base weights (2305.14314), e.g. ``{bits: 4, quant_type:
            nf4, double_quant: true, compute_dtype: bfloat16}`` (:func:`mmbridge.model.lora.
            quantization_config`); CUDA and the ``qlora`` extra (bitsandbytes) only, refused
            elsewhere with one line. The base is prepared with PEFT's
            ``prepare_model_for_kbit_training``; train it with ``train.llm: lora``.
        registry: The run's registry, which resolves an offline model name in ``path`` (given by
            :func:`mmbridge.config.build.build`, never by the config; ``None`` outside a run: a
            local directory or a hub id only).
    """

    def __init__(
        self,
        path: str,
        gguf_file: str | None = None,
        dtype: str = "float32",
        chat_template: str | None = None,
        attn_implementation: str = "auto",
        reuse_prefix_kv: bool | Literal["auto"] = "auto",
        gradient_checkpointing: bool = False,
        quantization: dict[str, Any] | None = None,
        registry: Registry | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if reuse_prefix_kv not in ("auto", True, False):
            raise ConfigError(
                f"llm.reuse_prefix_kv: {reuse_prefix_kv!r} is not valid; valid: auto, true, false"
            )
        self.reuse_prefix_kv = reuse_prefix_kv

        self.path = path
        self.gguf_file = gguf_file
        self.dtype_name = dtype
        self.local_path = resolve_model_path(path, registry, key="llm.path")
        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        if (
            gguf_file
            and not (Path(self.local_path) / gguf_file).is_file()
            and Path(self.local_path).is_dir()
        ):
            present = sorted(p.name for p in Path(self.local_path).glob("*.gguf"))
            raise ConfigError(
                f"llm.gguf_file: '{gguf_file}' is not in {self.local_path}; "
                f"GGUF files there: {', '.join(present) or '(none)'}"
            )
        if attn_implementation == "auto":
            attn_implementation = "sdpa" if torch.cuda.is_available() else "eager"
        self.attn_implementation = attn_implementation
        self.quantization = dict(quantization) if quantization else None
        quant: dict[str, Any] = {}
        if self.quantization is not None:  # refused without CUDA before any weight is read
            quant = {
                "quantization_config": quantization_config(self.quantization),
                "device_map": {"": torch.cuda.current_device()},
            }
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.local_path,
                dtype=torch_dtype(dtype, "llm.dtype"),
                attn_implementation=attn_implementation,
                **kwargs,
                **quant,
            )
            tok = AutoTokenizer.from_pretrained(self.local_path, **kwargs)
        except OSError as exc:
            raise ConfigError(
                f"llm.path: cannot load '{path}' (resolved to '{self.local_path}'): "
                f"{exc}. Give an offline asset name (`mmbridge assets`), a local "
                f"model directory, or a hub id while online"
            ) from exc
        if self.quantization is not None:
            from peft import prepare_model_for_kbit_training

            self.model = prepare_model_for_kbit_training(
                self.model, use_gradient_checkpointing=False
            )
        self.model.eval()
        self._tokenizer = _prepare_tokenizer(tok, chat_template)
        self._lora: dict[str, Any] | None = None
        self.set_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def from_config(
        cls,
        config: str | Path | Any,
        dtype: str = "float32",
        attn_implementation: str = "eager",
        gradient_checkpointing: bool = False,
        chat_template: str | None = None,
    ) -> HFCausalLM:
        """The architecture of a ``config.json`` with freshly initialised weights; nothing is
        downloaded and no weight file is read.

        Built on the current default device, so ``with torch.device("meta"):`` gives a model
        without storage whose shapes and parameter counts are the real model's
        (``mmbridge plan``). The tokenizer is loaded from the config's directory when one is
        there, else :attr:`tokenizer` is ``None`` (enough for counting, not for training).

        Args:
            config: A directory holding ``config.json``, that file, or a ``PretrainedConfig``.
            dtype: ``float32`` | ``float16`` | ``bfloat16`` | ``auto``.
            attn_implementation: ``auto`` | ``eager`` | ``sdpa`` | ``flash_attention_2`` (as in
                the constructor).
            gradient_checkpointing: As in the constructor.
            chat_template: As in the constructor (used when a tokenizer is found).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

        source = None
        if not isinstance(config, PretrainedConfig):
            source = Path(config).expanduser()
            directory = source.parent if source.is_file() else source
            if not (directory / "config.json").is_file():
                raise ConfigError(f"llm config: no config.json at '{source}'")
            config = AutoConfig.from_pretrained(directory)
            source = directory
        if attn_implementation == "auto":
            attn_implementation = "sdpa" if torch.cuda.is_available() else "eager"
        self = cls.__new__(cls)
        LanguageModel.__init__(self)
        self.reuse_prefix_kv = "auto"
        self.path = str(source) if source is not None else config.model_type
        self.gguf_file = None
        self.dtype_name = dtype
        self.local_path = self.path
        self.attn_implementation = attn_implementation
        self.model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype(dtype, "llm.dtype"), attn_implementation=attn_implementation
        )
        self.model.eval()
        tok = None
        if source is not None and any(
            (source / f).is_file()
            for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        ):
            tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(source), chat_template)
        self._tokenizer = tok
        self._lora = None
        self.quantization = None
        self.set_gradient_checkpointing(gradient_checkpointing)
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn activation recomputation of the decoder blocks on or off (non-reentrant, so
        frozen blocks between trainable inputs and outputs still pass gradients)."""
        if not isinstance(enabled, bool):
            raise ConfigError(
                f"llm.gradient_checkpointing: expected true or false, got {enabled!r}"
            )
        if enabled:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ConfigError(
                    f"llm.gradient_checkpointing: {type(self.model).__name__} does "
                    f"not support gradient checkpointing; set it to false"
                )
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif getattr(self, "gradient_checkpointing", False):
            if hasattr(self.model, "activation_checkpointing_disable"):
                self.model.activation_checkpointing_disable()
            else:
                self.model.gradient_checkpointing_disable()
        self.gradient_checkpointing = enabled

    @classmethod
    def for_testing(cls, tmp_dir: Path, **kwargs: Any) -> HFCausalLM:
        """A 2-layer, 32-wide Llama with the tiny tokenizer, saved to and loaded from
        ``tmp_dir``."""
        from mmbridge.testing.tiny import build_tiny_llama

        build_tiny_llama(tmp_dir, hidden=32, layers=2, heads=2, intermediate=64)
        return cls(path=str(tmp_dir), **kwargs)

    # -- the LanguageModel contract ----------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def decoder(self) -> nn.Module:
        """The base decoder (embeddings, blocks, final norm) without the LM head."""
        return self.model.get_decoder()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        for name in ("layers", "h", "blocks", "layer"):
            layers = getattr(self.decoder, name, None)
            if isinstance(layers, nn.ModuleList):
                return layers
        raise AttributeError(
            f"{type(self.model).__name__}: no ModuleList of decoder blocks found "
            f"on {type(self.decoder).__name__} (looked for layers, h, blocks, layer)"
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, T, D]``. Positions count real tokens only (as HF's
        ``generate`` does), so a left-padded row gives the same states as the row alone."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    # -- reuse of a shared prefix's keys/values (see mmbridge.model.prefix_kv) ---------------------
    def _cache_argument(self) -> str | None:
        """The decoder's name for its key/value cache argument (``cache`` from transformers
        5.24, ``past_key_values`` before), or ``None`` when it takes none."""
        params = inspect.signature(self.decoder.forward).parameters
        return next((k for k in ("cache", "past_key_values") if k in params), None)

    def prefix_reuse_blocker(self) -> str | None:
        config = self.model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or (
            not layer_types
            and getattr(config, "sliding_window", None) is not None
            and getattr(config, "use_sliding_window", True)
        ):
            return (
                f"{type(self.model).__name__} has sliding-window or other non-full attention layers"
            )
        if self._cache_argument() is None:
            return f"{type(self.decoder).__name__}.forward takes no key/value cache"
        if (
            self.training
            and torch.is_grad_enabled()
            and getattr(self.model, "is_activation_checkpointing", False)
        ):
            return "gradient checkpointing drops the key/value cache in training"
        if self.training and getattr(self, "gradient_checkpointing", False):
            # a checkpointed block drops its key/value cache in training (transformers)
            return "gradient checkpointing is on (checkpointed blocks take no key/value cache)"
        if self.training:
            # one prefix row for the whole batch would share one dropout mask across the rows
            if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
                return f"attention dropout {config.attention_dropout} is active in training"
            p = next(
                (
                    m.p
                    for m in self.model.modules()
                    if isinstance(m, nn.Dropout) and m.training and m.p > 0
                ),
                None,
            )
            if p is not None:
                return f"dropout {p} (LoRA's or the model's) is active in training"
        return None

    def prefix_states(
        self, prefix_embeds: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per-layer ``(keys, values)``, each ``[1, H_kv, P, d_head]``, of one prefix
        ``[1, P, D]``."""
        from transformers import DynamicCache

        n, device = prefix_embeds.shape[1], prefix_embeds.device
        cache = DynamicCache()
        self.decoder(
            inputs_embeds=prefix_embeds,
            attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
            position_ids=torch.arange(n, device=device).unsqueeze(0),
            use_cache=True,
            **{self._cache_argument(): cache},
        )
        self._check_cache(cache, n)
        return tuple((layer.keys, layer.values) for layer in cache.layers)

    def hidden_after(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    ) -> torch.Tensor:
        """Hidden states ``[B, S, D]`` after a shared prefix whose keys/values are expanded over
        the batch (a view: their gradients sum over the rows, as the plain forward's do)."""
        from transformers import DynamicCache

        b, n = inputs_embeds.shape[0], prefix[0][0].shape[-2]
        cache = DynamicCache(
            [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix]
        )
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, n:]
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_argument(): cache},
        )
        self._check_cache(cache, attention_mask.shape[1])
        return out.last_hidden_state

    def _check_cache(self, cache: Any, positions: int) -> None:
        """A decoder layer that dropped the cache (gradient checkpointing does) would have
        attended without the prefix: an error, never a silently different result."""
        if len(cache.layers) != len(self.decoder_layers) or cache.get_seq_length() != positions:
            raise RuntimeError(
                f"{type(self.decoder).__name__} did not use the prefix keys/values "
                f"({cache.get_seq_length()} cached positions of {positions}); "
                f"set llm.reuse_prefix_kv=false"
            )

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Continue a left-padded embedding batch ``[B, T, D]``; greedy unless ``kwargs`` ask for
        sampling (``do_sample=True, temperature=...``). Returns the new ids ``[B, T_new]``;
        rows that stopped early are filled with the pad id."""
        tok = self._tokenizer
        config = copy.deepcopy(self.model.generation_config)
        # The checkpoint's own defaults may sample; mmbridge evaluates greedily unless asked.
        config.update(
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            max_length=None,
            max_new_tokens=max_new_tokens,
        )
        streamer = kwargs.pop("streamer", None)  # HF's streamer protocol (put / end), for serving
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(f"generate: unknown generation options {sorted(unused)}")
        out = self.model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=config,
            streamer=streamer,
        )
        return out  # with inputs_embeds and no input_ids, HF returns only the new tokens

    # -- LoRA ----------------------------------------------------------------------------------
    @property
    def lora_config(self) -> dict[str, Any] | None:
        return dict(self._lora) if self._lora is not None else None

    def apply_lora(self, settings: Mapping[str, Any] | None = None, **keys: Any) -> None:
        """Inject LoRA adapters (2106.09685) as ``peft.LoraConfig`` describes them
        (:mod:`mmbridge.model.lora`: ``alpha`` / ``dropout`` for ``lora_alpha`` /
        ``lora_dropout``) in place; afterwards the adapters (and ``modules_to_save``) are the LLM's
        only trainable parameters (see :meth:`trainable_state_dict`)."""
        wanted = {**(settings or {}), **keys}
        if self._lora is not None:
            # A later stage asking for the same adapters keeps training the existing ones.
            if wanted != self._lora:
                raise ConfigError(
                    f"lora: the LLM already carries LoRA adapters {self._lora}; a "
                    f"later stage cannot switch to {wanted}"
                )
            mark_adapters_trainable(self.model, wanted)
            return
        inject_lora(self.model, wanted, "lora")
        self._lora = wanted

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters only (the LoRA adapters after :meth:`apply_lora`, everything
        when fully trained), keyed as in ``self.state_dict()``."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` returned (after the same :meth:`apply_lora`)."""
        own = dict(self.named_parameters())
        unknown = [k for k in state if k not in own]
        if unknown:
            hint = (
                " (was apply_lora called with the same target_modules?)"
                if any("lora_" in k for k in unknown)
                else ""
            )
            raise CheckpointError(
                f"{len(unknown)} weights do not belong to this LLM{hint}, e.g. {unknown[:3]}"
            )
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def llava_parts(self) -> LlavaText:
        """This model as Llava's text model (:mod:`mmbridge.contracts.llava_parts`); not from a
        GGUF file (dequantised weights are not the file's)."""
        if self.gguf_file:
            raise LlavaUnrepresentable(
                "is a dequantised GGUF checkpoint", f"gguf_file={self.gguf_file}"
            )
        return LlavaText(model=self.model, tokenizer_path=str(self.local_path))

    def identity(self) -> dict[str, Any]:
        """What determines this LLM (for checkpoints): class, path, GGUF file, dtype, chat
        template hash and the LoRA settings, if any."""
        template = self._tokenizer.chat_template or ""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "path": self.path,
            "gguf_file": self.gguf_file,
            "dtype": self.dtype_name,
            "chat_template_sha1": hashlib.sha1(str(template).encode()).hexdigest()[:12],
            "lora": self._lora,
        }


COMPONENTS = {"llm": {"hf_causal": HFCausalLM}}
