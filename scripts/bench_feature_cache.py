"""Peak memory of filling and reading the streaming feature cache, at two data-set sizes.

Each phase runs in a fresh process (so ``ru_maxrss`` is that phase's own peak):

* ``fill``: ``load_or_compute`` over synthetic image files with a stub encoder (a real
  ``nn.Module`` with fixed random weights: 8x8 RGB pixels -> 64 tokens x 768), rows of 32..64
  tokens (unpadded on disk);
* ``read``: open the filled entry (a cache hit, checksums verified) and read every row once.

Printed next to it: the size of the table the old cache built in RAM (one padded
``[S, N_max, D]`` float16 tensor, plus the float32 rows it collected first). Memory that does
not grow with the data shows as a large/small ratio near 1.

    .venv/bin/python scripts/bench_feature_cache.py                 # 1,000 vs 20,000 rows
    .venv/bin/python scripts/bench_feature_cache.py --rows 500 5000 --workers 2
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

import torch
from torch import nn

from mmbridge.contracts.encoder import ModalityEncoder

PIXELS = 8  # 8 x 8 pixels -> 64 tokens


class StubEncoder(ModalityEncoder):
    """Tiny image encoder: each pixel is a token, ``Linear(3 -> D)`` + tanh; the first byte of
    the file picks how many tokens are real (``N/2 .. N``)."""

    modality = "image"

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.init_args = {"dim": dim, "stub": 1}
        torch.manual_seed(0)
        self.proj = nn.Linear(3, dim)

    @property
    def out_dim(self) -> int:
        return self.proj.out_features

    def load(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def preprocess(self, raw: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).float().div(255)  # [3 * P * P]

    def num_tokens(self, x: torch.Tensor) -> int:
        n = PIXELS * PIXELS
        return n // 2 + int(x[0] * 255) % (n // 2 + 1)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = batch.shape[0], PIXELS * PIXELS
        tokens = batch.view(b, 3, n).transpose(1, 2)  # [B, N, 3]
        lengths = n // 2 + (batch[:, 0] * 255).round().long() % (n // 2 + 1)
        mask = torch.arange(n, device=batch.device)[None, :] < lengths[:, None]
        return torch.tanh(self.proj(tokens)), mask


def make_media(root: Path, rows: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(rows)
    data = torch.randint(0, 256, (rows, 3 * PIXELS * PIXELS), dtype=torch.uint8, generator=g)
    paths = []
    for k in range(rows):
        p = root / f"{k:06d}.rgb"
        p.write_bytes(data[k].numpy().tobytes())
        paths.append(str(p))
    return paths


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from mmbridge.data.feature_cache import load_or_compute

    root = Path(args.dir)
    paths = sorted(str(p) for p in (root / "media").iterdir())
    enc = StubEncoder(args.dim)
    base = rss_mb()
    t0 = time.perf_counter()
    table, stats = load_or_compute(
        enc,
        paths,
        root / "cache",
        batch_size=args.batch_size,
        num_workers=args.workers,
        shard_rows=args.shard_rows,
    )
    out = {
        "phase": args.phase,
        "rows": len(paths),
        "base_mb": base,
        "bytes": stats["bytes"],
        "hit": stats["hit"],
        "max_tokens": int(table.lengths.max()),
    }
    if args.phase == "read":
        total = 0.0
        for p in paths:
            total += float(table.lookup(p)[0, 0])
        out["checksum"] = total
    out["seconds"] = time.perf_counter() - t0
    out["peak_mb"] = peak_mb()
    print(json.dumps(out))


def run_phase(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--dir",
        str(workdir),
        "--dim",
        str(args.dim),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--shard-rows",
        str(args.shard_rows),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(f"{name} phase failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 20000])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--shard-rows", type=int, default=2048)
    ap.add_argument(
        "--dir", default=None, help="work folder (default: a temporary one, removed after)"
    )
    ap.add_argument("--phase", choices=["fill", "read"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        logging.basicConfig(level=logging.WARNING)
        phase(args)
        return
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-fc-"))
    results = []
    try:
        for rows in args.rows:
            work = base / f"rows-{rows}"
            make_media(work / "media", rows)
            fill = run_phase("fill", work, args)
            read = run_phase("read", work, args)
            n = PIXELS * PIXELS
            padded = rows * n * args.dim * 2
            old_peak = (
                padded + fill["bytes"] * 2
            )  # padded fp16 table + the fp32 rows collected first
            results.append((rows, fill, read, padded, old_peak))
            shutil.rmtree(work / "cache")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    print(
        f"feature cache, stub encoder {PIXELS * PIXELS} tokens (32..64 real) x {args.dim}, "
        f"shards of {args.shard_rows} rows, batch {args.batch_size}, workers {args.workers}"
    )
    print(
        f"{'rows':>7} {'on disk':>9} {'old table in RAM':>17} {'old fill peak':>14} "
        f"{'fill peak RSS':>14} {'read peak RSS':>14} {'fill s':>7} {'read s':>7}"
    )
    for rows, fill, read, padded, old_peak in results:
        print(
            f"{rows:>7} {fill['bytes'] / 2**20:>7.0f}MB {padded / 2**20:>15.0f}MB "
            f"{old_peak / 2**20:>12.0f}MB "
            f"{fill['peak_mb']:>12.0f}MB {read['peak_mb']:>12.0f}MB "
            f"{fill['seconds']:>7.1f} {read['seconds']:>7.1f}"
        )
    if len(results) > 1:
        (r0, f0, d0, *_), (r1, f1, d1, *_) = results[0], results[-1]
        print(
            f"peak RSS ratio {r1} / {r0} rows: fill {f1['peak_mb'] / f0['peak_mb']:.2f}, "
            f"read {d1['peak_mb'] / d0['peak_mb']:.2f} (data ratio {r1 / r0:.0f}x)"
        )


if __name__ == "__main__":
    main()
