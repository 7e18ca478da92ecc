"""``mmbridge report DIR``: gather the runs under DIR into results tables, plots and
report.html; with ``--baseline KEY=VALUE``, every other configuration's paired difference
against that one. For a single run's directory, its report.html."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmbridge.errors import ConfigError

USAGE = """usage: mmbridge report DIR [--metric KEY] [--out DIR] [--baseline KEY=VALUE ...] \
[--resamples N]

Gather every metrics.json under DIR (a sweep directory, or any folder of runs) and write, into
DIR (or --out):
  results.md    one row per configuration (the overrides minus `seed`), mean ± std over seeds,
                the best value per column in bold; exact match per question type
  results.csv   the same rows with every metric's mean and std at full precision
  runs.csv      one row per run (the raw values)
  <metric>_vs_trainable_params.png, <metric>_vs_visual_tokens.png, learning_curves.png
  report.html   one self-contained page: the results with their intervals, the forest plot
                against the baseline, the learning curves overlaid, and the held-out questions
                on which the configurations disagree (image, reference, each one's answer)
Runs without metrics.json (interrupted or failed; failed ones leave error.txt) are listed.

With --baseline, every other configuration is compared with the baseline question by question
(each run's predictions.jsonl): its test exact match minus the baseline's, overall and per
question type, with a 95 % bootstrap interval (questions resampled, paired; each
configuration's seeds resampled too), `*` where the interval excludes 0, and the numbers of
questions and seeds. They go into results.md, results.csv (<metric>_diff, _diff_low,
_diff_high, _diff_significant, _diff_questions) and exact_match_vs_baseline.png.

When DIR is one run (it holds metrics.json), only its report.html is written (`mmbridge
train` writes it too): the loss curves per stage, exact match per question type beside the
no-media and chance baselines, AlignGPT's gate weights per question type when it has a gate,
and a gallery of held-out questions (image, reference, prediction; right and wrong).

options:
  --metric KEY          the metric of the plots (default test/exact_match; e.g.
                        test/exact_match/colour, val_loss_last)
  --out DIR             write there instead of into DIR
  --baseline KEY=VALUE  the configuration to compare against (e.g. connector=mlp); repeat it
                        when one setting does not pick a single configuration
  --resamples N         bootstrap draws (default 10000; seeded, so the same runs give the
                        same intervals)
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    parser = argparse.ArgumentParser(prog="mmbridge report", add_help=False)
    parser.add_argument("dir")
    parser.add_argument("--metric", default="test/exact_match")
    parser.add_argument("--out")
    parser.add_argument("--baseline", action="append", default=[])
    parser.add_argument("--resamples", type=int, default=10_000)
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise ConfigError(f"unexpected arguments {extra}\n{USAGE}")
    if args.resamples < 100:
        raise ConfigError(f"--resamples {args.resamples}: use at least 100 (default 10000)")
    if (Path(args.dir) / "metrics.json").is_file():
        from mmbridge.reporting.run_report import write_run_report

        out = Path(args.out) / "report.html" if args.out else None
        print(f"  wrote {write_run_report(args.dir, out)}")
        return 0
    from mmbridge.reporting.results import varying_keys
    from mmbridge.reporting.tables import diff_cell, write_report

    report = write_report(
        Path(args.dir),
        args.metric,
        Path(args.out) if args.out else None,
        baseline=args.baseline,
        n_resamples=args.resamples,
    )
    n_runs = sum(len(r.runs) for r in report.rows)
    print(
        f"{n_runs} runs in {len(report.rows)} configurations under {report.root}"
        + (f"; {len(report.unfinished)} unfinished" if report.unfinished else "")
    )
    if report.baseline is not None:
        keys = varying_keys(report.rows)

        def name(row) -> str:
            return " ".join(f"{k}={row.setting(k)}" for k in keys) or " ".join(row.config)

        print(
            f"exact match minus the baseline's ({name(report.baseline)}), 95 % interval, "
            f"* = excludes 0:"
        )
        for row in report.rows:
            for c in report.comparisons.get(row.config, []):
                print(
                    f"  {name(row)}  {c.metric.removeprefix('test/')}: {diff_cell(c)}  "
                    f"({c.n_questions} questions, {c.n_seeds} vs {c.n_baseline_seeds} seeds)"
                )
    for f in report.files:
        print(f"  wrote {f}")
    return 0 if n_runs else 1
