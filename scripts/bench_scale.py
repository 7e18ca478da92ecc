"""Peak memory at LLaVA scale: does anything grow with the number of records?

Builds synthetic LLaVA data sets (JSONL, about 8% text-only records as in LLaVA-665K) over
generated 32x32 PNGs — **one distinct image per record** (a reused pool would give the
feature cache the same few rows at every size) — and runs, for each size, in fresh processes:

* ``fill``: the run's session set-up (``open_session``: the tiny model, the data read once,
  the feature-cache fill through ``load_or_compute``);
* ``train``: the same set-up on the filled cache (a hit), then ``run_stage`` of the
  ``instruct`` stage for ``--steps`` steps (recipe pass over the split, the truncation
  report, the loaders, the opening and closing validation, the Lightning ``fit``).

Each child resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) between phases and
reports every phase's own peak (``VmHWM``) and time; the process's overall peak is ``ru_maxrss``.
The model is the ``tiny`` experiment's (random tiny ViT at ``image_size=32`` -> MLP -> tiny
Llama), so a 100,000-record run takes minutes on 2 CPU cores.

    .venv/bin/python scripts/bench_scale.py                      # 1,000 vs 100,000 records
    .venv/bin/python scripts/bench_scale.py --sizes 1000 20000 --keep --work /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VAL_RECORDS = 32
TEXT_ONLY_EVERY = 12  # ~8% text-only records
WORDS = [
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "small",
    "large",
    "left",
    "right",
    "top",
    "bottom",
    "corner",
    "centre",
    "pattern",
    "stripes",
    "dots",
]


# --- data -------------------------------------------------------------------------------------


def make_images(folder: Path, n: int) -> None:
    """``n`` distinct 32x32 RGB PNGs (a seeded 4x4 colour grid, upscaled), ~150 bytes each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.png")))
    for i in range(have, n):
        grid = np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(np.kron(grid, np.ones((8, 8, 1), dtype=np.uint8))).save(
            folder / f"{i:06d}.png"
        )


def make_records(path: Path, n: int, image_dir: Path, offset: int = 0) -> None:
    """``n`` LLaVA JSONL records; record ``i`` uses image ``offset + i`` (or none)."""
    rng = np.random.default_rng(n + offset)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            answer = " ".join(rng.choice(WORDS, int(rng.integers(3, 24))))
            if i % TEXT_ONLY_EVERY == TEXT_ONLY_EVERY - 1:
                rec: dict[str, Any] = {
                    "id": f"t{offset + i}",
                    "conversations": [
                        {"from": "human", "value": "Write a few words about shapes."},
                        {"from": "gpt", "value": answer},
                    ],
                }
            else:
                rec = {
                    "id": f"r{offset + i}",
                    "image": str(image_dir / f"{offset + i:06d}.png"),
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the picture."},
                        {"from": "gpt", "value": answer},
                    ],
                }
            f.write(json.dumps(rec) + "\n")


def make_dataset(work: Path, n: int) -> Path:
    """``work/data_<n>/{train,val}.jsonl`` over ``work/images`` (shared by all sizes)."""
    d = work / f"data_{n}"
    d.mkdir(parents=True, exist_ok=True)
    make_images(work / "images", n + VAL_RECORDS)
    make_records(d / "train.jsonl", n, work / "images")
    make_records(d / "val.jsonl", VAL_RECORDS, work / "images", offset=n)
    return d


# --- measurement ------------------------------------------------------------------------------


def _status(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Phases:
    """Per phase: its own peak RSS (the kernel's counter reset at its start) and its time."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._name: str | None = None
        self._t0 = 0.0

    def start(self, name: str) -> None:
        self.stop()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self._name, self._t0 = name, time.perf_counter()

    def stop(self) -> None:
        if self._name is not None:
            self.rows.append(
                {
                    "phase": self._name,
                    "peak_mb": _status("VmHWM"),
                    "end_mb": _status("VmRSS"),
                    "s": time.perf_counter() - self._t0,
                }
            )
            self._name = None


def child(kind: str, data: Path, cache: Path, steps: int) -> dict[str, Any]:
    """One measured process: ``fill`` (session set-up) or ``train`` (set-up + ``steps`` steps)."""
    logging.basicConfig(level=logging.WARNING)
    from mmbridge.config import compose
    from mmbridge.data import batcher as batcher_mod
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.runtime import session as session_mod
    from mmbridge.runtime import stage as stage_mod
    from mmbridge.runtime import train as run_mod

    phases = Phases()
    phases.start("imports")
    registry = load_registry()
    cfg = compose(
        [
            "experiment=tiny",
            "data=llava",
            f"data.train={data / 'train.jsonl'}",
            f"data.val={data / 'val.jsonl'}",
            "encoder.image_size=32",
            "schedule=[instruct]",
            f"stages.instruct.max_steps={steps}",
            f"stages.instruct.val_every={steps}",
            "stages.instruct.batch_size=16",
            "evaluation.val_samples=4",
            f"paths.cache_dir={cache}",
            "trainer.enable_progress_bar=false",
            "loader.num_workers=0",
        ],
        registry,
    )

    def measured(name: str, fn):
        def wrapper(*args, **kwargs):
            phases.start(name)
            out = fn(*args, **kwargs)
            phases.start(f"after {name}")
            return out

        return wrapper

    # phase boundaries inside the run's own code (wrapped here, nothing else changed)
    session_mod.load_splits = measured("read data", session_mod.load_splits)
    session_mod.fill_feature_cache = measured("feature cache", session_mod.fill_feature_cache)
    batcher_mod.ConversationDataset = measured(
        "recipe pass (ConversationDataset)", batcher_mod.ConversationDataset
    )
    stage_mod.truncation_report = measured("truncation report", stage_mod.truncation_report)

    phases.start("model")
    session = session_mod.open_session(cfg, registry)
    out: dict[str, Any] = {"records": sum(len(v) for v in session.splits.values())}
    if kind == "train":
        run_dir = cache / "run"
        run_dir.mkdir(exist_ok=True)
        result, _ = run_mod.run_stage(session, "instruct", run_dir, resume=False)
        phases.stop()
        if phases.rows[-1]["phase"] == "after truncation report":
            phases.rows[-1]["phase"] = f"loaders + validation + {result.steps} training steps"
        out["steps"] = result.steps
    phases.stop()
    out["phases"] = phases.rows
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# --- driver -----------------------------------------------------------------------------------


def run_child(kind: str, data: Path, cache: Path, steps: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MMBRIDGE_DISABLE_PLUGINS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--steps",
        str(steps),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{kind} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes", type=int, nargs=2, default=[1000, 100_000], metavar=("SMALL", "LARGE")
    )
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument(
        "--work", type=Path, default=None, help="work folder (default: a temporary one)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--child", choices=["fill", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.cache, args.steps)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="mmbridge-scale-"))
    results: dict[int, dict[str, dict]] = {}
    try:
        for n in args.sizes:
            t0 = time.perf_counter()
            data = make_dataset(work, n)
            print(
                f"{n:,} records: data written in {time.perf_counter() - t0:.0f} s ({data})",
                flush=True,
            )
            cache = work / f"cache_{n}"
            shutil.rmtree(cache, ignore_errors=True)
            results[n] = {}
            for kind in ("fill", "train"):
                t0 = time.perf_counter()
                results[n][kind] = run_child(kind, data, cache, args.steps)
                print(
                    f"  {kind}: peak RSS {results[n][kind]['peak_mb']:.0f} MiB "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    small, large = args.sizes
    print(
        "\npeak RSS (MiB), a fresh process per size; ratio and growth: "
        f"{large:,} vs {small:,} records"
    )
    print(f"{'':52s}{small:>9,}{large:>9,}{'ratio':>7}{'+MiB':>7}{'time (s)':>17}")
    for kind, label in (
        ("fill", "(a) feature-cache fill (session set-up)"),
        ("train", f"(b) {args.steps} training steps (session + stage)"),
    ):
        a, b = results[small][kind]["peak_mb"], results[large][kind]["peak_mb"]
        print(f"{label:52s}{a:9.0f}{b:9.0f}{b / a:7.2f}{b - a:7.0f}")
        for ra, rb in zip(
            results[small][kind]["phases"], results[large][kind]["phases"], strict=False
        ):
            if ra["phase"].startswith("after ") and max(ra["s"], rb["s"]) < 0.5:
                continue
            print(
                f"    {ra['phase'][:46]:46s}{ra['peak_mb']:9.0f}{rb['peak_mb']:9.0f}"
                f"{rb['peak_mb'] / ra['peak_mb']:7.2f}{rb['peak_mb'] - ra['peak_mb']:7.0f}"
                f"{ra['s']:8.1f}{rb['s']:9.1f}"
            )


if __name__ == "__main__":
    main()
