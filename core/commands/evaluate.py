"""``mmbridge eval checkpoint=PATH [split=test] [max_samples=N] [key=value ...]``."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmbridge.errors import ConfigError

HELP = "evaluate a checkpoint: checkpoint=PATH [split=test max_samples=N]"
USAGE = """usage: mmbridge eval checkpoint=PATH [split=test] [max_samples=N] [out=FILE] [predictions=FILE] [key=value ...]

Rebuild the model of a checkpoint (a run's checkpoints/final directory, or its
weights.safetensors), and report exact match on the split's questions per question type,
beside the same model without the media and the majority-answer (chance) baseline.
Other key=value pairs override the stored config (e.g. evaluation.batch_size=8).

  out=FILE          also write the metrics as JSON
  predictions=FILE  write every answer as a JSON line: id, qtype, mode (media | no_media),
                    question, answer (reference), prediction, correct
"""

OWN_KEYS = ("checkpoint", "split", "max_samples", "out", "predictions")


def parse_kv(argv: list[str], usage: str, own_keys: tuple[str, ...] = OWN_KEYS) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into this command's own keys and config overrides."""
    own, rest = {}, []
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"argument '{a}' is not key=value\n{usage}")
        k, v = a.split("=", 1)
        if k in own_keys:
            own[k] = v
        else:
            rest.append(a)
    return own, rest


def print_metrics(console: Console, metrics: dict[str, float], title: str) -> None:
    table = Table(title=title)
    for col in ("metric", "model", "no media", "chance"):
        table.add_column(col)
    keys = sorted(k for k in metrics if k.startswith("exact_match"))
    for k in keys:
        def fmt(v):
            return "-" if v is None else f"{v:.3f}"
        table.add_row(k, fmt(metrics.get(k)), fmt(metrics.get(f"no_media/{k}")), fmt(metrics.get(f"chance/{k}")))
    console.print(table)


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    own, overrides = parse_kv(argv, USAGE)
    if "checkpoint" not in own:
        raise ConfigError("checkpoint=PATH is required\n" + USAGE)
    from mmbridge.training.run import evaluate_session
    from mmbridge.training.session import session_from_checkpoint

    session, _ = session_from_checkpoint(own["checkpoint"], overrides)
    split = own.get("split", session.cfg.evaluation.split)
    if split not in session.splits:
        raise ConfigError(f"split={split}: not a split of the data set; splits: {', '.join(session.splits)}")
    max_samples = int(own["max_samples"]) if "max_samples" in own else None
    preds = Path(own["predictions"]) if "predictions" in own else None
    metrics = evaluate_session(session, session.cfg, split=split, max_samples=max_samples, predictions=preds)
    print_metrics(Console(), metrics, f"{own['checkpoint']} on {split} ({metrics.get('n', 0)} questions)")
    if "out" in own:
        Path(own["out"]).write_text(json.dumps(metrics, indent=2))
    return 0
