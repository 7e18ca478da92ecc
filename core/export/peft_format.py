"""``format=peft``: the LLM's LoRA adapters in PEFT's own format, beside the connector weights.

Layout::

    adapter_config.json, adapter_model.safetensors   PeftModel.from_pretrained(base, DIR)
    mmbridge_weights.safetensors                     connector (and prefix) tensors, and any other
                                                     trained tensor outside the LLM, by their
                                                     mmbridge names (branches.image.connector...)
    config.yaml                                      the composed config
    mmbridge.json                                    the base model, the adapter settings and
                                                     which module each tensor file belongs to

The adapters are written by PEFT itself (``get_peft_model`` on a freshly loaded base model,
the trained LoRA tensors copied in, ``save_pretrained``), so they load with PEFT's public API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from mmbridge.config.model_spec import branch_at, node_at
from mmbridge.contracts.llm import LanguageModel
from mmbridge.errors import ConfigError
from mmbridge.model.lora import adapter_parameters, peft_config

#: PEFT's wrapper adds this before the base model's own parameter names.
PEFT_PREFIX = "base_model.model."
EXTRA = "mmbridge_weights.safetensors"


def lora_settings(llm: LanguageModel) -> dict[str, Any]:
    """The LLM's LoRA settings (:attr:`mmbridge.contracts.llm.LanguageModel.lora_config`: ``r``,
    ``alpha``, ``dropout``, ``target_modules`` and any other ``peft.LoraConfig`` key), or a
    ConfigError saying why there are none to export."""
    settings = llm.lora_config
    if settings is None or not hasattr(llm, "local_path"):
        kind = type(llm).__name__
        raise ConfigError(
            f"format=peft: the LLM ({kind}) carries no LoRA adapters (no stage trained "
            f"it with train.llm=lora); export format=bundle, or format=hf for a full model"
        )
    return dict(settings)


def peft_llm(llm: Any) -> Any:
    """A PEFT ``PeftModel``: the LLM's base weights freshly loaded from its files, wrapped by
    ``get_peft_model`` with the same LoRA settings, holding the trained adapter tensors."""
    settings = lora_settings(llm)
    kwargs = {"gguf_file": llm.gguf_file} if getattr(llm, "gguf_file", None) else {}
    dtype = next(llm.model.parameters()).dtype
    base = AutoModelForCausalLM.from_pretrained(
        llm.local_path, dtype=dtype, attn_implementation=llm.attn_implementation, **kwargs
    )
    # the same LoraConfig the training run built (all-linear resolved on the same architecture)
    config = peft_config(
        settings, "lora", base, task_type="CAUSAL_LM", base_model_name_or_path=str(llm.path)
    )
    wrapped = get_peft_model(base, config)
    # adapters, modules_to_save copies and the biases `bias` trains (mmbridge.model.lora)
    mine, peft_own = adapter_parameters(llm.model, settings), adapter_parameters(wrapped, settings)
    trained = {n: p for n, p in llm.model.named_parameters() if n in mine}
    own = {n: p for n, p in wrapped.named_parameters() if n in peft_own}
    want = {PEFT_PREFIX + n for n in trained}
    if want != set(own):
        raise ConfigError(
            f"format=peft: PEFT's adapters do not match the LLM's "
            f"(only in mmbridge: {sorted(want - set(own))[:3]}, only in PEFT: "
            f"{sorted(set(own) - want)[:3]})"
        )
    with torch.no_grad():
        for n, p in trained.items():
            own[PEFT_PREFIX + n].copy_(p.detach().to(own[PEFT_PREFIX + n].device))
    return wrapped.eval()


def non_llm_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Connector and prefix tensors, and every other trained tensor outside the LLM."""
    state = {}
    for n, t in model.state_dict().items():
        if (
            ".connector." in f".{n}"
            or n.startswith("prefix.")
            or (n in model.ever_trained and not n.startswith("llm."))
        ):
            state[n] = t.detach().cpu().contiguous()
    return state


def write_peft(session: Any, meta: dict[str, str], out: Path) -> dict[str, Any]:
    """Write the PEFT adapters, the other tensors and the config into ``out``; the manifest."""
    model = session.model
    settings = lora_settings(model.llm)
    peft_llm(model.llm).save_pretrained(str(out))
    # PEFT records the local directory it loaded; the config's own name (asset, hub id) is the
    # one a user can look up
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(model.llm.path)
    (out / "adapter_config.json").write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    )
    extra = non_llm_tensors(model)
    # tied tensors (none expected outside the LLM) would refuse save_file: clone them apart
    save_file({k: v.clone() for k, v in extra.items()}, str(out / EXTRA))
    (out / "config.yaml").write_text(session.run.to_yaml())
    model_cfg = session.run.model  # the model's nodes: mmbridge.config.model_spec
    groups: dict[str, list[str]] = {}
    for k in extra:
        owner = ".".join(k.split(".")[:3]) if k.startswith("branches.") else k.split(".")[0]
        groups.setdefault(owner, []).append(k)
    return {
        "format": "peft",
        "base_model": str(model.llm.path),
        "adapter": settings,
        "adapter_files": ["adapter_config.json", "adapter_model.safetensors"],
        "weights": {EXTRA: {owner: len(keys) for owner, keys in sorted(groups.items())}},
        "stages": json.loads(meta.get("stages", "[]")),
        "config": "config.yaml",
        "modules": {
            m: {
                "encoder": node_at(model_cfg, branch_at(model_cfg, b.key).encoder.key),
                "connector_prefix": f"branches.{m}.connector.",
            }
            for m, b in model.branches.items()
        },
    }
