"""``mmbridge report --baseline``: paired differences against a baseline configuration, on a
hand-made sweep whose predictions are known by construction, checked against a direct
computation (a plain loop over bootstrap draws) and, for one seed a side, scipy's paired
bootstrap."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import mmbridge_exe
from scipy.stats import bootstrap

from mmbridge.errors import ConfigError
from mmbridge.reporting.significance import paired_bootstrap
from mmbridge.reporting.tables import write_report

Q = 40
PNG = b"\x89PNG\r\n\x1a\n"


def qtype(q: int) -> str:
    return "colour" if q < Q // 2 else "count"


# Which questions each run answers correctly (40 questions: 0-19 colour, 20-39 count).
PATTERNS = {
    # the baseline: half right, different halves per seed
    ("mlp", 0): lambda q: q % 2 == 0,
    ("mlp", 1): lambda q: q % 4 in (0, 1),
    # as good as the baseline overall and per type, on other questions
    ("linear", 0): lambda q: q % 2 == 1,
    ("linear", 1): lambda q: q % 4 in (2, 3),
    # clearly better: 36 of 40 per seed
    ("qformer", 0): lambda q: q % 10 != 0,
    ("qformer", 1): lambda q: q % 10 != 5,
    # one seed: every colour question right, half of the count questions
    ("resampler", 0): lambda q: q < 30,
}


def _write_run(root: Path, connector: str, seed: int) -> None:
    d = root / f"connector={connector},seed={seed}"
    d.mkdir(parents=True)
    right = [PATTERNS[(connector, seed)](q) for q in range(Q)]
    records = []
    for q in range(Q):
        base = {
            "id": f"test-{q // 2:04d}#{q % 2}",
            "qtype": qtype(q),
            "question": f"<image>\nquestion {q}?",
            "answer": f"answer {q}",
            "prediction": "x",
        }
        records.append({**base, "mode": "media", "correct": right[q]})
        records.append({**base, "mode": "no_media", "correct": True})  # must not count
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    by_type = {t: [r for q, r in enumerate(right) if qtype(q) == t] for t in ("colour", "count")}
    test = {
        "exact_match": sum(right) / Q,
        "n": Q,
        "no_media/exact_match": 1.0,
        **{f"exact_match/{t}": sum(v) / len(v) for t, v in by_type.items()},
    }
    metrics = {
        "overrides": [f"connector={connector}", f"seed={seed}", "experiment=tiny"],
        "seed": seed,
        "test": test,
        "parameters": {"trainable": 1000, "total": 5000},
        "visual_tokens": {"image": 16},
    }
    (d / "config.yaml").write_text("seed: 0\n")
    (d / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for connector, seed in PATTERNS:
        _write_run(root, connector, seed)
    return root


def _matrix(connector: str, questions: list[int]) -> np.ndarray:
    """``[S, Q]`` correctness of a configuration's seeds on ``questions``."""
    seeds = sorted(s for c, s in PATTERNS if c == connector)
    return np.array([[PATTERNS[(connector, s)](q) for q in questions] for s in seeds], dtype=float)


def _direct(
    base: np.ndarray, other: np.ndarray, n: int = 10_000, seed: int = 123
) -> tuple[float, float]:
    """The interval by a plain loop: draw questions (shared) and each side's seeds, n times."""
    rng = np.random.default_rng(seed)
    (sa, q), sb = base.shape, other.shape[0]
    stats = []
    for _ in range(n):
        qi = rng.integers(0, q, q)
        a, b = base[rng.integers(0, sa, sa)], other[rng.integers(0, sb, sb)]
        stats.append(b[:, qi].mean() - a[:, qi].mean())
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


GROUPS = {
    "test/exact_match": list(range(Q)),
    "test/exact_match/colour": list(range(Q // 2)),
    "test/exact_match/count": list(range(Q // 2, Q)),
}


def test_report_baseline_csv_matches_direct_computation(sweep):
    report = write_report(sweep, baseline=["connector=mlp"])
    assert report.baseline is not None and report.baseline.setting("connector") == "mlp"
    table = {r["connector"]: r for r in csv.DictReader((sweep / "results.csv").open())}
    assert table["mlp"]["baseline"] == "1" and table["mlp"]["test/exact_match_diff"] == ""
    for connector in ("linear", "qformer", "resampler"):
        row = table[connector]
        assert row["baseline"] == "0" and row["diff_baseline_seeds"] == "2"
        assert row["diff_seeds"] == str(len(_matrix(connector, [0])))
        for metric, questions in GROUPS.items():
            base, other = _matrix("mlp", questions), _matrix(connector, questions)
            diff = other.mean() - base.mean()
            low, high = _direct(base, other)
            assert float(row[f"{metric}_diff"]) == pytest.approx(diff, abs=1e-12)
            # the same statistic, other random draws: equal within bootstrap noise (steps of 1/80)
            assert float(row[f"{metric}_diff_low"]) == pytest.approx(low, abs=0.025), (
                connector,
                metric,
            )
            assert float(row[f"{metric}_diff_high"]) == pytest.approx(high, abs=0.025), (
                connector,
                metric,
            )
            assert row[f"{metric}_diff_significant"] == str(int(low > 0 or high < 0))
            assert row[f"{metric}_diff_questions"] == str(len(questions))
        # for runs on the same questions, the difference is that of the exact match columns
        assert float(row["test/exact_match_diff"]) == pytest.approx(
            float(row["test/exact_match_mean"]) - float(table["mlp"]["test/exact_match_mean"])
        )


def test_better_equal_and_per_type_verdicts(sweep):
    report = write_report(sweep, baseline=["connector=mlp"])
    got = {(cfg[0], c.metric): c for cfg, cs in report.comparisons.items() for c in cs}
    # qformer is clearly better: +0.4 (0.9 against 0.5), overall and in each type
    for metric in GROUPS:
        c = got[("connector=qformer", metric)]
        assert c.diff == pytest.approx(0.4) and c.low > 0.1 and c.significant
    # linear is as good: the difference is 0 and its interval straddles 0
    for metric in GROUPS:
        c = got[("connector=linear", metric)]
        assert c.diff == 0 and c.low < 0 < c.high and not c.significant
    # resampler (one seed): +0.5 on colour (significant), 0 on count (not)
    colour, count = (
        got[("connector=resampler", "test/exact_match/colour")],
        got[("connector=resampler", "test/exact_match/count")],
    )
    assert (
        colour.diff == pytest.approx(0.5)
        and colour.significant
        and (colour.n_seeds, colour.n_baseline_seeds) == (1, 2)
    )
    assert count.diff == 0 and not count.significant and count.n_questions == 20
    assert ("connector=mlp", "test/exact_match") not in got

    md = (sweep / "results.md").read_text()
    section = md[md.index("## Paired difference against the baseline `connector=mlp`") :]
    main, per_type = section.split("Per question type:")
    lines = {
        line.split("|")[1].strip(): line for line in main.splitlines() if line.startswith("| ")
    }
    assert "| +0.400 [" in lines["qformer"] and lines["qformer"].rstrip(" |").endswith("*")
    assert "| 2 vs 2 | 40 |" in lines["qformer"] and "| 1 vs 2 | 40 |" in lines["resampler"]
    assert "| +0.000 [-" in lines["linear"] and not lines["linear"].rstrip(" |").endswith("*")
    assert "baseline" in lines["mlp"]
    assert "colour (n=20)" in per_type and "count (n=20)" in per_type
    resampler = next(line for line in per_type.splitlines() if line.startswith("| resampler"))
    assert resampler.count("*") == 1 and "+0.500 [" in resampler
    plot = sweep / "exact_match_vs_baseline.png"
    assert plot in report.files and plot.read_bytes()[:8] == PNG


def test_intervals_are_deterministic(sweep, tmp_path):
    write_report(sweep, baseline=["connector=mlp"])
    write_report(sweep, baseline=["connector=mlp"], out_dir=tmp_path / "again")
    assert (sweep / "results.csv").read_text() == (tmp_path / "again" / "results.csv").read_text()


def test_one_seed_each_equals_scipy_paired_bootstrap():
    rng = np.random.default_rng(7)
    a = (rng.random(300) < 0.55).astype(float)
    b = np.where(rng.random(300) < 0.8, a, 1 - a)  # B agrees with A on most questions
    diff, low, high = paired_bootstrap(a[None], b[None], seed=0)
    res = bootstrap(
        (a, b),
        lambda x, y, axis=-1: y.mean(axis) - x.mean(axis),
        paired=True,
        vectorized=True,
        n_resamples=10_000,
        method="percentile",
        rng=np.random.default_rng(1),
    )
    assert diff == pytest.approx(b.mean() - a.mean())
    assert low == pytest.approx(res.confidence_interval.low, abs=0.006)
    assert high == pytest.approx(res.confidence_interval.high, abs=0.006)


def test_baseline_selection_and_missing_predictions(sweep):
    with pytest.raises(
        ConfigError, match="connector=gru: no configuration has it; connector: linear, mlp"
    ):
        write_report(sweep, baseline=["connector=gru"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        write_report(sweep, baseline=["mlp"])
    (sweep / "connector=linear,seed=1" / "predictions.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"connector=linear,seed=1/predictions.jsonl"):
        write_report(sweep, baseline=["connector=mlp"])


def test_report_cli_prints_the_comparisons(sweep, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1"}
    out = subprocess.run(
        [
            mmbridge_exe(),
            "report",
            str(sweep),
            "--baseline",
            "connector=mlp",
            "--resamples",
            "2000",
            "--out",
            str(tmp_path / "rep"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    qformer = next(line for line in lines if "connector=qformer" in line and "exact_match:" in line)
    assert "+0.400 [" in qformer and "] *" in qformer and "(40 questions, 2 vs 2 seeds)" in qformer
    linear = next(
        line for line in lines if "connector=linear" in line and "exact_match/count:" in line
    )
    assert "+0.000 [" in linear and "*" not in linear and "(20 questions, 2 vs 2 seeds)" in linear
    assert (tmp_path / "rep" / "exact_match_vs_baseline.png").read_bytes()[:8] == PNG
