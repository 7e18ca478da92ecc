"""``mmbridge report DIR``: gather the runs under DIR into results tables and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmbridge.errors import ConfigError

HELP = "gather a sweep directory's runs into results.csv/.md and plots"
USAGE = """usage: mmbridge report DIR [--metric KEY] [--out DIR]

Gather every metrics.json under DIR (a sweep directory, or any folder of runs) and write, into
DIR (or --out):
  results.md    one row per configuration (the overrides minus `seed`), mean ± std over seeds,
                the best value per column in bold; exact match per question type
  results.csv   the same rows with every metric's mean and std at full precision
  runs.csv      one row per run (the raw values)
  <metric>_vs_trainable_params.png, <metric>_vs_visual_tokens.png, learning_curves.png
Runs without metrics.json (interrupted or failed; failed ones leave error.txt) are listed.

options:
  --metric KEY  the metric of the plots (default test/exact_match; e.g. test/exact_match/colour,
                val_loss_last)
  --out DIR     write there instead of into DIR
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    parser = argparse.ArgumentParser(prog="mmbridge report", add_help=False)
    parser.add_argument("dir")
    parser.add_argument("--metric", default="test/exact_match")
    parser.add_argument("--out")
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise ConfigError(f"unexpected arguments {extra}\n{USAGE}")
    from mmbridge.reporting import write_report

    report = write_report(Path(args.dir), args.metric, Path(args.out) if args.out else None)
    n_runs = sum(len(r.runs) for r in report.rows)
    print(f"{n_runs} runs in {len(report.rows)} configurations under {report.root}"
          + (f"; {len(report.unfinished)} unfinished" if report.unfinished else ""))
    for f in report.files:
        print(f"  wrote {f}")
    return 0 if n_runs else 1
