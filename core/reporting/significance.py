"""Is configuration B better than the baseline A? Paired differences of exact match between a
sweep's configurations, with bootstrap intervals.

Every run writes ``predictions.jsonl``: one line per held-out question with ``id``,
``question``, ``answer``, ``qtype``, ``mode`` and ``correct``. The model's own answers (mode
``media``) give each run a 0/1 vector over the questions. For a configuration against the
baseline, on the questions every run of both answered:

- the difference is ``mean(B) - mean(A)``, each the mean over its seeds and the questions
  (for runs evaluated on the same questions, the difference of their ``test/exact_match``);
- the 95 % interval is the percentile interval of that difference over ``n_resamples``
  bootstrap draws, each drawing the questions with replacement (one draw for both
  configurations: the comparison is paired) and, independently, each configuration's seeds;
- per question type, the same on the questions of that type.

Why not ``scipy.stats.bootstrap``: with ``paired=True`` it resamples a single level, the same
indices in every sample, and needs samples of equal length. Here there are two levels, the
questions (shared, paired) and the seeds (independent per configuration, 2 against 3 is
allowed), so the draw is written out with numpy. With one seed on each side the design is
exactly scipy's paired bootstrap of the per-question differences; the tests check the two agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmbridge.errors import ConfigError
from mmbridge.reporting.results import Row, varying_keys
from mmbridge.reporting.runs import override_key

PREDICTIONS = "predictions.jsonl"
MODE = "media"  # the model's answers with its media (not the no-media or tool baselines)
METRIC = "test/exact_match"
N_RESAMPLES = 10_000
CONFIDENCE = 0.95

# A question is the same question in two runs when its id, text and reference answer match.
Key = tuple[str, str, str]


@dataclass(frozen=True)
class Comparison:
    """One configuration against the baseline on one metric.

    ``metric`` is ``test/exact_match`` or ``test/exact_match/<qtype>``; ``diff`` = this
    configuration's mean minus the baseline's; ``[low, high]`` the bootstrap interval.
    """

    metric: str
    diff: float
    low: float
    high: float
    n_questions: int
    n_seeds: int
    n_baseline_seeds: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0 or self.high < 0


def read_predictions(run_dir: Path) -> dict[Key, tuple[str, bool]]:
    """``{(id, question, answer): (qtype, correct)}`` of the mode-``media`` lines of
    ``run_dir/predictions.jsonl``.

    Raises:
        ConfigError: the file is missing, or a line is not a JSON object with those fields.
    """
    f = Path(run_dir) / PREDICTIONS
    if not f.is_file():
        raise ConfigError(
            f"--baseline needs {f} (each run's answers, written by `mmbridge train`); "
            f"it is missing: run the job again, or report without --baseline"
        )
    out: dict[Key, tuple[str, bool]] = {}
    for i, line in enumerate(f.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if rec.get("mode", MODE) != MODE:
                continue
            out[(str(rec["id"]), str(rec.get("question", "")), str(rec.get("answer", "")))] = (
                str(rec.get("qtype", "all")),
                bool(rec["correct"]),
            )
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise ConfigError(
                f"{f}:{i}: not a prediction record with 'id' and 'correct' ({exc})"
            ) from exc
    return out


def paired_bootstrap(
    base: np.ndarray,
    other: np.ndarray,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The difference ``mean(other) - mean(base)`` and its percentile bootstrap interval.

    Args:
        base: ``[S_a, Q]`` 0/1 correctness of the baseline's runs (one row per seed) on the
            ``Q`` questions.
        other: ``[S_b, Q]`` the other configuration's, the same questions in the same order.
        n_resamples: Bootstrap draws.
        confidence: The interval's coverage.
        seed: Seed of the draws (the same inputs give the same interval).

    Returns:
        ``(diff, low, high)``.
    """
    base, other = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if base.ndim != 2 or other.ndim != 2 or base.shape[1] != other.shape[1] or base.shape[1] == 0:
        raise ValueError(
            f"paired_bootstrap: need [S_a, Q] and [S_b, Q] with Q > 0, got "
            f"{base.shape} and {other.shape}"
        )
    (sa, q), sb = base.shape, other.shape[0]
    diff = float(other.mean() - base.mean())
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    chunk = max(1, 1_000_000 // q)  # [chunk, Q] float arrays stay near 8 MB
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        questions = rng.integers(0, q, size=(r, q))  # [r, Q] drawn question indices
        wa = rng.multinomial(sa, np.full(sa, 1 / sa), size=r) / sa  # [r, S_a] seed weights
        wb = rng.multinomial(sb, np.full(sb, 1 / sb), size=r) / sb  # [r, S_b]
        per_question = wb @ other - wa @ base  # [r, Q] difference per question
        stats[start : start + r] = np.take_along_axis(per_question, questions, axis=1).mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return diff, float(low), float(high)


def _row_table(row: Row) -> tuple[dict[Key, str], np.ndarray, list[Key]]:
    """The questions every run of ``row`` answered: their types, and ``[S, Q]`` correctness."""
    preds = [read_predictions(run.path) for run in row.runs]
    keys = sorted(set.intersection(*(set(p) for p in preds)))
    correct = np.array([[p[k][1] for k in keys] for p in preds], dtype=np.float64).reshape(
        len(preds), len(keys)
    )
    return {k: preds[0][k][0] for k in keys}, correct, keys


def select_baseline(rows: Sequence[Row], selectors: Sequence[str]) -> Row:
    """The one row whose settings match every ``KEY=VALUE`` of ``selectors``.

    Raises:
        ConfigError: a selector is not ``KEY=VALUE``, or not exactly one row matches.
    """
    keys = varying_keys(list(rows))
    choices = "; ".join(
        f"{k}: {', '.join(dict.fromkeys(r.setting(k) for r in rows))}" for k in keys
    )
    wanted = []
    for s in selectors:
        if "=" not in s:
            raise ConfigError(
                f"--baseline {s!r}: expected KEY=VALUE, e.g. connector=mlp; {choices}"
            )
        k, v = s.split("=", 1)
        wanted.append((override_key(k.strip()), v.strip()))
    matches = [r for r in rows if all(r.setting(k) == v for k, v in wanted)]
    given = " ".join(selectors)
    if not matches:
        raise ConfigError(
            f"--baseline {given}: no configuration has it; {choices or 'nothing varies'}"
        )
    if len(matches) > 1:
        raise ConfigError(
            f"--baseline {given}: {len(matches)} configurations match; give one more "
            f"KEY=VALUE to pick one ({choices})"
        )
    return matches[0]


def compare(
    rows: Sequence[Row], baseline: Row, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> dict[tuple[str, ...], list[Comparison]]:
    """Every row but ``baseline`` against it: exact match overall, then per question type.

    Returns:
        ``{row.config: [Comparison(test/exact_match), Comparison(test/exact_match/<qtype>), ...]}``;
        a row sharing no question with the baseline gets an empty list.
    """
    _, b_correct, b_keys = _row_table(baseline)
    b_index = {k: i for i, k in enumerate(b_keys)}
    out: dict[tuple[str, ...], list[Comparison]] = {}
    for row in rows:
        if row is baseline:
            continue
        types, correct, keys = _row_table(row)
        common = [(j, b_index[k]) for j, k in enumerate(keys) if k in b_index]
        groups = {METRIC: common}
        for qtype in sorted({types[keys[j]] for j, _ in common}):
            groups[f"{METRIC}/{qtype}"] = [(j, i) for j, i in common if types[keys[j]] == qtype]
        found = []
        for metric, pairs in groups.items():
            if not pairs:
                continue
            mine, theirs = (np.array(ix) for ix in zip(*pairs))
            diff, low, high = paired_bootstrap(
                b_correct[:, theirs], correct[:, mine], n_resamples, seed=seed
            )
            found.append(
                Comparison(metric, diff, low, high, len(pairs), len(row.runs), len(baseline.runs))
            )
        out[row.config] = found
    return out
