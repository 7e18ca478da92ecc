"""``mmbridge inspect [overrides] stage=NAME n=K [--json] [--images DIR]``: what the model is fed
(the rendered text, media slots, token ids and supervised tokens of a stage's first samples)."""

from __future__ import annotations

import argparse
import json

from mmbridge.errors import ConfigError
from mmbridge.runtime.inspection import format_records, inspect

#: ``key=value`` arguments of the command itself (not config overrides).
OPTIONS = ("stage", "n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmbridge inspect",
        description=(
            "The first n samples of a stage after its recipe and conversation format, as the model "
            "sees them: the rendered text with each media span shown as one marker and its slot "
            "count (<image x64>), the token ids, the supervised text, and where each media item's "
            "slots start. The LLM's weights are not read when its directory holds a tokenizer; no "
            "feature cache is used. Example: mmbridge inspect experiment=llava15_7b stage=align n=2"
        ),
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides, plus stage=NAME (default: the schedule's first) and n=K (default 2)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per sample: id, text, "
        "input_ids, labels (-100 = not supervised), media (kind, file, first_slot, slots)",
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        default=None,
        help="write each sample's preprocessed images to DIR as PNG",
    )
    args = p.parse_intermixed_args(argv)  # flags anywhere among the overrides
    options: dict[str, str] = {}
    overrides = []
    for arg in args.overrides:
        key, eq, value = arg.partition("=")
        if eq and key in OPTIONS:
            options[key] = value
        else:
            overrides.append(arg)
    try:
        n = int(options.get("n", "2"))
    except ValueError:
        raise ConfigError(f"n={options['n']}: expected a number of samples >= 1") from None
    records = inspect(overrides, stage=options.get("stage"), n=n, images=args.images)
    if args.json:
        print(json.dumps(records, ensure_ascii=False))
    else:
        print(format_records(records))
    return 0
