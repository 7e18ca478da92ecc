"""``mmbridge eval checkpoint=PATH [split=test] [max_samples=N] [key=value ...]``."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmbridge.config.preflight import writable_file_error
from mmbridge.config.schema import DEVICE
from mmbridge.config.validation import TOP_LEVEL_KEYS, override_errors
from mmbridge.errors import ConfigError, did_you_mean
from mmbridge.reporting.runs import atomic_write_text

USAGE = """usage: mmbridge eval checkpoint=PATH [split=test] [max_samples=N] [out=FILE] \
[predictions=FILE] [device=DEV] [key=value ...]

Rebuild the model of a checkpoint (a run's checkpoints/final directory, or its
weights.safetensors) or of a format=bundle export, and report exact match on the split's
questions per question type, beside the same model without the media and the majority-answer
(chance) baseline. A bundle holds no data: the stored config's data (or data=... overrides)
must be readable where it runs.
Other key=value pairs override the stored config (e.g. evaluation.batch_size=8).

  device=DEV        where the model runs: cpu, cuda, cuda:N (default: the trainer's accelerator)
  out=FILE          also write the metrics as JSON
  predictions=FILE  write every answer as a JSON line: id, qtype, mode (media | no_media),
                    question, answer (reference), prediction, correct, media

Benchmarks from local files, each with its official scoring (data=NAME data.path=...):
  data=vqa              VQAv2 / TextVQA: VQA accuracy (ten answers, leave-one-out)
  data=gqa              GQA balanced questions: exact match after the VQA normalisation
  data=pope             POPE: accuracy, precision, recall, F1, yes-ratio, per category
  data=multiple_choice  ScienceQA-IMG or an MMBench TSV (data.circular=true: CircularEval)
  data=llava / data=hf_local  your own LLaVA-format questions (JSON/JSONL, or a saved HF data set)
  e.g. mmbridge eval checkpoint=RUN/checkpoints/final data=gqa \
data.path=/data/gqa/testdev_balanced_questions.json

lmms-eval (the `eval` extra) runs its own tasks on a checkpoint without a launcher:
  lmms-eval --model mmbridge --model_args checkpoint=PATH,device=cuda,batch_size=8 \
--tasks mmbench_en_dev
"""

OWN_KEYS = ("checkpoint", "split", "max_samples", "out", "predictions", "device")


def parse_kv(
    argv: list[str],
    usage: str,
    own_keys: tuple[str, ...] = OWN_KEYS,
    counts: tuple[str, ...] = ("max_samples",),
) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into this command's own keys and config overrides.

    Checked before any work, every problem reported together: a key that is neither an own
    key nor a config key (``max_sample=4``) is refused with a did-you-mean; the ``counts`` own
    keys must be integers >= 1; the overrides' values must fit the config schema.
    """
    own, rest, errors = {}, [], []
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"argument '{a}' is not key=value\n{usage}")
        k, v = a.split("=", 1)
        bare = k.lstrip("+~")
        if k in own_keys:
            own[k] = v
        elif "." not in bare and bare not in TOP_LEVEL_KEYS:
            errors.append(
                f"{a}: '{k}' is neither an option of this command nor a config key"
                f"{did_you_mean(bare, [*own_keys, *TOP_LEVEL_KEYS])}; "
                f"options: {', '.join(own_keys)}"
            )
        else:
            rest.append(a)
    for key in counts:
        if key in own and not (own[key].strip().isdigit() and int(own[key]) >= 1):
            errors.append(f"{key}={own[key]!r}: expected an integer >= 1")
    if "device" in own and not DEVICE.ok(own["device"]):
        errors.append(f"device={own['device']!r}: expected {DEVICE.valid}")
    errors += override_errors(rest)
    if errors:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(errors))
    return own, rest


def check_outputs(own: dict[str, str], keys: tuple[str, ...] = ("out", "predictions")) -> None:
    """Refuse, before any work, output files (``out=``, ``predictions=``) that cannot be written."""
    errors = [e for k in keys if k in own and (e := writable_file_error(own[k], k))]
    if errors:
        raise ConfigError("\n".join(errors))


def write_outputs(metrics: dict, own: dict[str, str], predictions: Path | None) -> None:
    """Write ``out=`` and move the predictions (written to a temporary file) to ``predictions=``;
    write what can be written, then raise one error naming what could not (and where the
    predictions are kept). Called after the table is printed, so no result is lost."""
    errors = []
    if "out" in own:
        try:
            atomic_write_text(Path(own["out"]).expanduser(), json.dumps(metrics, indent=2))
        except OSError as exc:
            errors.append(
                f"out={own['out']}: could not write the metrics ({exc.strerror or exc}); "
                f"they are printed above"
            )
    if predictions is not None and "predictions" in own:
        try:
            shutil.move(str(predictions), str(Path(own["predictions"]).expanduser()))
            with contextlib.suppress(OSError):  # the temporary directory, now empty
                predictions.parent.rmdir()
        except OSError as exc:
            errors.append(
                f"predictions={own['predictions']}: could not write the answers "
                f"({exc.strerror or exc}); they are kept in {predictions}"
            )
    if errors:
        raise ConfigError("\n".join(errors))


def print_metrics(console: Console, metrics: dict[str, float], title: str) -> None:
    table = Table(title=title)
    for col in ("metric", "model", "no media", "chance"):
        table.add_column(col)
    # VQA accuracy, POPE, ... when the data names a benchmark
    from mmbridge.evaluation.benchmarks import benchmark_keys

    keys = sorted(k for k in metrics if k.startswith("exact_match")) + benchmark_keys(metrics)
    for k in keys:

        def fmt(v):
            return "-" if v is None else f"{v:.3f}"

        table.add_row(
            k,
            fmt(metrics.get(k)),
            fmt(metrics.get(f"no_media/{k}")),
            fmt(metrics.get(f"chance/{k}")),
        )
    console.print(table)


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    own, overrides = parse_kv(argv, USAGE)
    if "checkpoint" not in own:
        raise ConfigError("checkpoint=PATH is required\n" + USAGE)
    check_outputs(own)
    from mmbridge.export.source import open_model
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.runtime.evaluate import evaluate_session

    # a checkpoint or a format=bundle export (whose data the stored config names, or data=...)
    session, _ = open_model(
        own["checkpoint"],
        overrides,
        registry=load_registry(),
        device=own.get("device"),
        with_data=True,
    )
    split = own.get("split", session.cfg.evaluation.split)
    if split not in session.splits:
        raise ConfigError(
            f"split={split}: not a split of the data set; splits: {', '.join(session.splits)}"
        )
    max_samples = int(own["max_samples"]) if "max_samples" in own else None
    # answers go to a temporary file first: a failing predictions= write cannot lose them
    preds = (
        Path(tempfile.mkdtemp(prefix="mmbridge-eval-")) / "predictions.jsonl"
        if "predictions" in own
        else None
    )
    metrics = evaluate_session(session, split=split, max_samples=max_samples, predictions=preds)
    print_metrics(
        Console(), metrics, f"{own['checkpoint']} on {split} ({metrics.get('n', 0)} questions)"
    )
    write_outputs(metrics, own, preds)
    return 0
