"""``mmbridge export checkpoint=PATH out=DIR format=hf|peft|bundle``."""

from __future__ import annotations

from pathlib import Path

from mmbridge.config.preflight import dir_problem
from mmbridge.errors import ConfigError

USAGE = """usage: mmbridge export checkpoint=PATH out=DIR [format=bundle|peft|hf] [overwrite=true]

Write a trained model out of mmbridge (every export holds a model card, README.md):
  bundle  any model: one self-contained directory (every weight, the tokenizer, the config,
          the plugin versions); loads with mmbridge.load(DIR) without the asset cache or data
  peft    the LLM's LoRA adapters in PEFT's format (PeftModel.from_pretrained(base, DIR))
          plus the connector weights and mmbridge.json saying how they fit together
  hf      a transformers LlavaForConditionalGeneration with its processor (LoRA merged), for an
          hf_vision encoder + linear/mlp connector + causal LM that Llava represents exactly

examples:
  mmbridge export checkpoint=outputs/quickstart/<time>/checkpoints/final out=exports/qs \
format=bundle
  mmbridge export checkpoint=outputs/tiny/<time>/checkpoints/final out=exports/tiny-hf format=hf
"""
OWN_KEYS = ("checkpoint", "out", "format", "overwrite")


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    own, errors = {}, []
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in OWN_KEYS:
            errors.append(f"{a}: expected one of {', '.join(f'{o}=...' for o in OWN_KEYS)}")
        else:
            own[k] = v
    missing = [k for k in ("checkpoint", "out") if k not in own]
    if missing:
        errors.append(f"{' and '.join(f'{k}=' for k in missing)} required")
    if own.get("overwrite", "false").lower() not in ("true", "false"):
        errors.append(f"overwrite={own['overwrite']!r}: expected true or false")
    if "out" in own and (reason := dir_problem(Path(own["out"]).expanduser().parent)):
        # checked before the model is loaded; the export writes a sibling temporary directory
        errors.append(
            f"out={own['out']}: cannot write its directory ({reason}); give a writable directory"
        )
    if errors:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(errors) + "\n" + USAGE)
    from mmbridge.export import export

    out = export(
        own["checkpoint"],
        own["out"],
        format=own.get("format", "bundle"),
        overwrite=own.get("overwrite", "false").lower() == "true",
    )
    print(f"exported ({own.get('format', 'bundle')}): {out}")
    return 0
