"""``mmbridge plan [overrides] [gpu_memory_gb=80] [gpus=N] [--json]``: parameters, tokens, steps
and memory per GPU of a configured model, built from its configs on the meta device."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from mmbridge.config import compose
from mmbridge.config.validation import validate_config
from mmbridge.errors import ConfigError
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.runtime.config import RunConfig

#: ``key=value`` arguments of the command itself (not config overrides) -> their type.
OPTIONS = {"gpu_memory_gb": float, "gpus": int, "images_per_sample": int, "data_samples": int}


def split_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``gpu_memory_gb=40 experiment=x`` -> ``({"gpu_memory_gb": 40.0}, ["experiment=x"])``."""
    options: dict[str, Any] = {}  # make_plan's keyword arguments (float or int, per OPTIONS)
    overrides = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in OPTIONS:
            try:
                options[key] = OPTIONS[key](value)
            except ValueError:
                raise ConfigError(f"{key}={value}: expected {OPTIONS[key].__name__}") from None
            if options[key] <= 0:
                raise ConfigError(f"{key}={value}: must be > 0")
        else:
            overrides.append(arg)
    return options, overrides


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmbridge plan",
        description=(
            "Build the model of the composed config from its components' config.json files on the "
            "meta device (no weights, no downloads, no data) and print total / trainable "
            "parameters per component, visual tokens and sequence length per sample, the steps of "
            "each scheduled stage, and memory per GPU (weights, gradients, optimizer state, "
            "activations) for the trainer's strategy and the stage's batch size, with whether it "
            "fits. Example: mmbridge plan experiment=llava15_7b schedule=[align,instruct] "
            "gpu_memory_gb=40"
        ),
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides; plus gpu_memory_gb=GiB (default 80), "
        "gpus=N (default trainer.devices x num_nodes), images_per_sample=N (default 1), "
        "data_samples=N (a stage given in epochs: its training samples)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    options, overrides = split_options(args.overrides)
    registry = load_registry()
    cfg = compose(overrides, registry)
    validate_config(cfg, registry)
    from mmbridge.runtime.plan import format_plan, make_plan  # torch and transformers, on demand

    plan = make_plan(RunConfig.parse(cfg), registry, **options)
    print(json.dumps(dataclasses.asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0
