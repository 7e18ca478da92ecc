"""``mmbridge config [overrides]``: the composed config, as ``mmbridge train`` would see it."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf
from rich.console import Console
from rich.syntax import Syntax

from mmbridge.config import compose, group_options
from mmbridge.config.validation import config_errors
from mmbridge.errors import ConfigError
from mmbridge.registry.plugin_manager import load_registry


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmbridge config",
        description=(
            "Compose the training config from the built-in tree and every plugin's config dir, "
            "apply Hydra overrides (e.g. connector=linear stages.align.max_steps=10) and print it."
        ),
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, key=value or group=option")
    p.add_argument("--groups", action="store_true", help="list the config groups and their options")
    p.add_argument("--resolve", action="store_true", help="resolve ${...} interpolations")
    args = p.parse_args(argv)
    registry = load_registry()
    console = Console()
    if args.groups:
        for group, options in group_options(registry).items():
            console.print(f"[bold]{group}[/bold]: {', '.join(options)}")
        return 0
    cfg = compose(args.overrides, registry)
    text = OmegaConf.to_yaml(cfg, resolve=args.resolve)
    console.print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    # printed as composed, then judged as `mmbridge train` would: a bad value is not silent
    errors = config_errors(cfg, registry)
    if errors:
        raise ConfigError(
            f"this config would not train ({len(errors)} problem{'s' * (len(errors) > 1)}):\n  "
            + "\n  ".join(errors)
        )
    return 0
