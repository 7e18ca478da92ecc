"""LoRA as PEFT writes it: a stage's ``lora`` / ``encoder_lora`` section becomes a
``peft.LoraConfig`` (LoRA: 2106.09685), and adapters are injected into any ``nn.Module``.

A section holds ``LoraConfig``'s own keys, with ``alpha`` and ``dropout`` standing for
``lora_alpha`` and ``lora_dropout`` (:data:`mmbridge.config.schema.LORA_RENAMED`); ``target_modules:
all-linear`` is every linear layer but the output head, as PEFT defines it for a
``PreTrainedModel``, resolved here for modules of any class (a timm tower, a Perceiver).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmbridge.config.schema import LORA_MANAGED, LORA_RENAMED, Lora
from mmbridge.errors import ConfigError

#: Names of output heads that ``all-linear`` leaves out (PEFT leaves the LM head out).
HEAD_NAMES = ("lm_head", "head", "output", "classifier", "score")


def lora_settings(section: Lora) -> dict[str, Any]:
    """A stage's ``lora`` / ``encoder_lora`` section as a plain dict (mmbridge's key names, the
    other ``peft.LoraConfig`` keys it passes through included; keys left at ``None`` dropped, so
    PEFT's own defaults apply)."""
    return {k: copy.deepcopy(v) for k, v in vars(section).items() if v is not None}


def linear_names(module: nn.Module) -> list[str]:
    """The last name part of every ``nn.Linear`` inside ``module`` but output heads: what
    ``target_modules: all-linear`` means (a layer PEFT already wraps counts by its own name)."""
    names = set()
    for n, m in module.named_modules():
        if not isinstance(m, nn.Linear) or not n or ".lora_" in f".{n}":
            continue  # PEFT's own adapter layers are not targets
        parts = n.split(".")
        names.add(parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1])
    return sorted(names - set(HEAD_NAMES))


def linear_targets(module: nn.Module) -> list[str]:
    """What ``all-linear`` resolves to: for each ``nn.Linear`` inside ``module`` but output
    heads, the shortest name suffix that names linear layers only (``q_proj``; ``attn.proj`` in a
    ViT whose ``patch_embed.proj`` is a convolution). Suffixes, not full paths: PEFT applies
    ``layers_to_transform`` to suffix matches only."""
    modules = {n: m for n, m in module.named_modules() if n and ".lora_" not in f".{n}"}
    linear = {
        n
        for n, m in modules.items()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in HEAD_NAMES
    }
    targets = set()
    for path in sorted(linear):
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(p in linear for p in modules if p == suffix or p.endswith("." + suffix)):
                targets.add(suffix)
                break
    return sorted(targets)


def peft_config(
    settings: Mapping[str, Any], key: str, module: nn.Module | None = None, **fixed: Any
) -> Any:
    """The ``peft.LoraConfig`` of ``settings`` (:func:`lora_settings`).

    Args:
        settings: mmbridge's LoRA keys (``r``, ``alpha``, ``dropout``, ``target_modules``, and
            any other ``LoraConfig`` key).
        key: The config key, for errors (``stages.instruct.lora``).
        module: When given, ``all-linear`` is resolved to its linear layers' names (PEFT
            resolves it itself only for a ``PreTrainedModel``) and named targets are checked.
        fixed: Keys mmbridge sets (``task_type``, ``base_model_name_or_path``).

    Raises:
        ConfigError: a key that is not a ``LoraConfig`` field, a target that matches no linear
            layer, or a value ``LoraConfig`` refuses, naming ``key``.
    """
    from peft import LoraConfig  # PEFT (and transformers) only where LoRA is used

    kwargs = {LORA_RENAMED.get(k, k): v for k, v in settings.items()}
    known = {f for f in LoraConfig.__dataclass_fields__ if not f.startswith("_")}
    unknown = sorted(
        k for k in settings if LORA_RENAMED.get(k, k) not in known or k in LORA_MANAGED
    )
    if unknown:
        ours = {v: k for k, v in LORA_RENAMED.items()}
        named = [f"{k} (written {ours[k]} here)" if k in ours else k for k in unknown]
        valid = sorted({*LORA_RENAMED, *(known - set(LORA_MANAGED))})
        raise ConfigError(
            f"{key}: {', '.join(named)}: not a key of peft.LoraConfig here; "
            f"valid: {', '.join(valid)}"
        )
    targets = kwargs.get("target_modules")
    if module is not None and targets is not None:
        linear = linear_names(module)
        if targets == "all-linear":
            kwargs["target_modules"] = linear_targets(module)
        elif isinstance(targets, str):
            pass  # a regular expression: PEFT matches it
        else:
            kwargs["target_modules"] = list(targets)
            missing = [t for t in targets if t not in linear]
            if missing:
                raise ConfigError(
                    f"{key}.target_modules: {missing} match no linear layer of "
                    f"{type(module).__name__}; linear layer names: {', '.join(linear)}"
                )
    try:
        return LoraConfig(**kwargs, **fixed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: peft.LoraConfig refuses {settings}: {exc}") from exc


def adapter_parameters(module: nn.Module, settings: Mapping[str, Any]) -> set[str]:
    """The names of ``module``'s parameters that train with its adapters: the LoRA / DoRA
    tensors, the ``modules_to_save`` copies, and the biases ``bias`` asks for (``all``: every
    bias; ``lora_only``: those of the adapted layers), as PEFT marks them."""
    bias = settings.get("bias", "none")
    names = set()
    for n, _ in module.named_parameters():
        if (
            "lora_" in n
            or ".modules_to_save." in n
            or n.endswith("bias")
            and (bias == "all" or (bias == "lora_only" and ".base_layer." in n))
        ):
            names.add(n)
    return names


def mark_adapters_trainable(module: nn.Module, settings: Mapping[str, Any]) -> None:
    """Only :func:`adapter_parameters` of ``module`` require grad."""
    trained = adapter_parameters(module, settings)
    for n, p in module.named_parameters():
        p.requires_grad_(n in trained)


def inject_lora(module: nn.Module, settings: Mapping[str, Any], key: str) -> None:
    """Add LoRA adapters to ``module`` in place (``peft.inject_adapter_in_model``); afterwards
    only :func:`adapter_parameters` of ``module`` require grad. They are fp32 whatever the base
    weights' dtype, as PEFT's ``get_peft_model`` makes adapters (``autocast_adapter_dtype``):
    trained weights are fp32 master weights (:mod:`mmbridge.model.precision`)."""
    from peft import inject_adapter_in_model

    config = peft_config(settings, key, module)
    module.requires_grad_(False)
    inject_adapter_in_model(config, module)
    mark_adapters_trainable(module, settings)
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype.itemsize < 4:
            p.data = p.data.float()


#: ``llm.quantization`` keys -> ``transformers.BitsAndBytesConfig`` arguments (4-bit).
QUANT_KEYS = {
    "bits": None,
    "quant_type": "bnb_4bit_quant_type",
    "double_quant": "bnb_4bit_use_double_quant",
    "compute_dtype": "bnb_4bit_compute_dtype",
}


def quantization_config(spec: Mapping[str, Any], key: str = "llm.quantization") -> Any:
    """QLoRA's base-weight quantisation (Dettmers et al., 2305.14314): ``{bits: 4,
    quant_type: nf4, double_quant: true, compute_dtype: bfloat16}`` as a
    ``transformers.BitsAndBytesConfig`` (``bits: 8``: LLM.int8()).

    Raises:
        ConfigError: one line, on a machine without CUDA (bitsandbytes' kernels are CUDA
            kernels), without the ``bitsandbytes`` package, or for keys / values it does not
            know.
    """
    unknown = sorted(set(spec) - set(QUANT_KEYS))
    if unknown:
        raise ConfigError(
            f"{key}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(QUANT_KEYS)}"
        )
    bits = spec.get("bits", 4)
    if bits not in (4, 8):
        raise ConfigError(f"{key}.bits={bits}: 4 (QLoRA's NF4) or 8 (LLM.int8())")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key}: {bits}-bit base weights (QLoRA, bitsandbytes) need a CUDA GPU and "
            f"this machine has none; remove {key} to train LoRA on unquantised weights"
        )
    try:
        import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401  (fail here with the fix)
    except ImportError:
        raise ConfigError(
            f"{key}: needs the bitsandbytes package: pip install 'mmbridge[qlora]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    kwargs: dict[str, Any] = {str(QUANT_KEYS[k]): v for k, v in spec.items() if QUANT_KEYS.get(k)}
    kwargs.setdefault("bnb_4bit_quant_type", "nf4")
    kwargs.setdefault("bnb_4bit_use_double_quant", True)
    kwargs["bnb_4bit_compute_dtype"] = getattr(
        torch, str(kwargs.get("bnb_4bit_compute_dtype", "bfloat16"))
    )
    return BitsAndBytesConfig(load_in_4bit=True, **kwargs)


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` carries LoRA adapters."""
    return any("lora_" in n for n, _ in module.named_parameters())
