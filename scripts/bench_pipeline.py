r"""Where does a training step's time go, with and without the frozen-encoder feature cache?

For one stage of a config (default: the first stage of ``experiment=quickstart``), runs
``--warmup`` + ``--steps`` training steps the way a run does (the stage's recipe and trainable
parts, the run's ``DataLoader`` + collator, ``MultimodalModel.forward``, backward, gradient
clipping, the stage's AdamW; bf16 autocast when the config's precision resolves to
``bf16-mixed``) twice, each in a fresh process so that its peak memory is its own:

* ``cache``: features come from :mod:`mmbridge.data.feature_cache` (filled first, for the
  benchmark's images, in ``--feature-cache-dir``: by default a temporary directory, so the fill
  time printed is the real first-run cost and the user's cache is untouched);
* ``live``: images are loaded and preprocessed by the data loader and the encoder runs every step.

Each step is cut at explicit boundaries: data (loader + collate), encoder forward, connector
forward (forward hooks), the rest of the forward (LLM: embeddings, decoder, LM head, loss),
LLM backward (the connector's output is detached by a forward hook, so ``loss.backward()``
stops there), connector backward (``tokens.backward(grad)``), optimizer (clip + step). Layers a
Perceiver adds inside the LLM count as LLM. Results (a markdown table) go to stdout::

    python scripts/bench_pipeline.py                               # quickstart, align stage
    python scripts/bench_pipeline.py experiment=tiny --steps 20
    python scripts/bench_pipeline.py --stage instruct stages.instruct.batch_size=8

``--prefix-kv both`` runs each batch twice in the same process, with ``llm.reuse_prefix_kv``
off and on (alternating which goes first), and prints the paired off/on ratios of the step and
of the LLM part (:mod:`mmbridge.model.prefix_kv`)::

    python scripts/bench_pipeline.py --modes cache --prefix-kv both --precision 32-true \
        llm.dtype=float32
    python scripts/bench_pipeline.py --modes cache --prefix-kv both --stage instruct llm=smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PARTS = ("data", "encoder", "connector", "llm_fwd", "llm_bwd", "optimizer")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def warn_if_loaded(threads: int) -> None:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if threads > 1 and load + threads > cores + 0.5:
        log(
            f"note: load average {load:.1f} on {cores} cores: with {threads} torch threads, each "
            "parallel op waits for its slowest (descheduled) thread; "
            "--threads 1 gives steadier figures"
        )


class PartTimer:
    """Forward hooks that time each encoder and connector call and detach their outputs, so that
    backward can be run (and timed) one part at a time."""

    def __init__(self, model: Any, sync: Any) -> None:
        self.sync = sync
        self.times = {"encoder": 0.0, "connector": 0.0}
        self.cut: list[tuple[str, Any, Any]] = []  # (part, original output, detached leaf)
        self._t0 = 0.0
        for branch in model.branches.values():
            for part, module in (("encoder", branch.encoder), ("connector", branch.connector)):
                module.register_forward_pre_hook(self._start)
                module.register_forward_hook(self._stop(part))

    def _start(self, module: Any, args: Any) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def _stop(self, part: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            self.sync()
            self.times[part] += time.perf_counter() - self._t0
            tensor, mask = output
            if not tensor.requires_grad:
                return None
            leaf = tensor.detach().requires_grad_(True)
            self.cut.append((part, tensor, leaf))
            return leaf, mask

        return hook

    def backward_parts(self) -> dict[str, float]:
        """Backward of the detached parts, last cut first (connector, then a trained encoder)."""
        out = {"encoder": 0.0, "connector": 0.0}
        for part, tensor, leaf in reversed(self.cut):
            if leaf.grad is None:
                continue
            t = time.perf_counter()
            tensor.backward(leaf.grad)
            self.sync()
            out[part] += time.perf_counter() - t
        self.cut.clear()
        return out

    def reset(self) -> None:
        self.times = {"encoder": 0.0, "connector": 0.0}


def open_run(args: argparse.Namespace) -> tuple[Any, Any, Any, str, list]:
    """(cfg, registry, session, stage name, the benchmark's samples: a seeded draw of the
    stage's split, the same in every mode)."""
    import torch

    from mmbridge.config import compose
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.runtime.session import open_session

    torch.set_num_threads(args.threads)
    registry = load_registry()
    cfg = compose(args.overrides, registry)
    session = open_session(cfg, registry, cache=False)
    name = args.stage or cfg.schedule[0]
    stage = session.run.stages[name]
    n = (args.warmup + args.steps) * int(stage.batch_size)
    pool = session.splits[stage.split]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(cfg.seed)))
    return cfg, registry, session, name, [pool[int(i)] for i in order[:n]]


def fill_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Cache the features of the benchmark's media (a run's first, cache-filling pass)."""
    from mmbridge.data.feature_cache import load_or_compute

    _, _, session, _, samples = open_run(args)
    out = {}
    for modality, branch in session.model.branches.items():
        paths = [s.media[modality] for s in samples if modality in s.media]
        _, stats = load_or_compute(branch.encoder, paths, Path(args.feature_cache_dir))
        out[modality] = {"seconds": stats["seconds"], "hit": stats["hit"], "files": len(set(paths))}
        log(
            f"[fill] {modality} features: {'hit' if stats['hit'] else 'computed'} "
            f"in {stats['seconds']:.1f} s for {len(set(paths))} files"
        )
    return {"mode": "fill", "cache": out}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One mode (``cache`` | ``live``) in this process; returns its figures."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    from mmbridge.data.batcher import Batcher, to_device
    from mmbridge.data.feature_cache import load_or_compute
    from mmbridge.runtime.stage import prepare_stage
    from mmbridge.training.module import BridgeModule
    from mmbridge.training.stages import configure_trainable

    cfg, registry, session, name, samples = open_run(args)
    model = session.model
    stage = session.run.stages[name]
    configure_trainable(model, stage)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    model.to(device).train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bs = int(stage.batch_size)
    tables = {}
    if args.mode == "cache":  # filled by the previous process: this is a later run's cache hit
        for modality, branch in model.branches.items():
            paths = [s.media[modality] for s in samples if modality in s.media]
            tables[modality], _ = load_or_compute(
                branch.encoder, paths, Path(args.feature_cache_dir)
            )
    batcher = Batcher.from_model(model, session.chat, tables=tables)
    ds = prepare_stage(session, name, samples=samples, batcher=batcher, check=False).train_ds
    workers = int(cfg.loader.num_workers)
    loader = iter(
        DataLoader(
            ds, batch_size=bs, shuffle=False, num_workers=workers, collate_fn=batcher.collator
        )
    )

    precision = args.precision or session.precision.precision
    amp = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if precision.startswith("bf16")
        else contextlib.nullcontext
    )
    opt_cfg = BridgeModule(model, stage).configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    params = [p for p in model.parameters() if p.requires_grad]
    clip = float(cfg.trainer.gradient_clip_val or 0)
    timer = PartTimer(model, sync)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _status_mb("VmRSS") or 0.0
    hwm = reset_peak_rss() and _status_mb("VmHWM") is not None
    variants = ["off", "on"] if args.prefix_kv == "both" else [args.prefix_kv]
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    plans: dict[str, str] = {}

    def step(batch: dict[str, Any], t_data: float) -> dict[str, float]:
        timer.reset()
        sync()
        t1 = time.perf_counter()
        with amp():
            loss = model(batch)
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        back = timer.backward_parts()
        t4 = time.perf_counter()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        sync()
        t5 = time.perf_counter()
        fwd = timer.times
        return {
            "data": t_data,
            "encoder": fwd["encoder"] + back["encoder"],
            "connector": fwd["connector"] + back["connector"],
            "llm_fwd": (t2 - t1) - fwd["encoder"] - fwd["connector"],
            "llm_bwd": t3 - t2,
            "optimizer": t5 - t4,
            "step": t_data + t5 - t1,
            "loss": float(loss),
        }

    log(
        f"[{args.mode}] stage {name}, batch {bs}, {precision}, prefix kv {'/'.join(variants)}, "
        f"{args.warmup}+{args.steps} steps ..."
    )
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        batch = to_device(next(loader), device)
        t_data = time.perf_counter() - t0
        # "both": the same batch with reuse off and on, in alternating order, so that the load
        # of a shared machine falls on the two alike and their ratio is paired per step
        for variant in variants if i % 2 == 0 else variants[::-1]:
            if variant != "config":
                model.llm.reuse_prefix_kv = variant == "on" and "auto"
            row = step(batch, t_data)
            plans[variant] = model.prefix_plan.reason
            if i >= args.warmup:
                rows[variant].append(row)
            log(
                f"[{args.mode}] step {i + 1} (prefix kv {variant}): {row['step']:.3f} s, "
                f"loss {row['loss']:.3f}"
            )
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "peak CUDA memory allocated"
    elif hwm:
        peak, kind = _status_mb("VmHWM") or 0.0, "peak RSS during the steps"
    else:
        peak, kind = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak RSS of the process",
        )
    out = []
    for variant, vrows in rows.items():
        out.append(
            {
                "mode": args.mode,
                "prefix_kv": variant,
                "prefix_plan": plans.get(variant, ""),
                "stage": name,
                "batch_size": bs,
                "precision": precision,
                "step_s": statistics.median(r["step"] for r in vrows),
                "steps_s": [r["step"] for r in vrows],
                "llm_s": [r["llm_fwd"] + r["llm_bwd"] for r in vrows],
                "parts_s": {p: sum(r[p] for r in vrows) / len(vrows) for p in PARTS},
                "mean_step_s": sum(r["step"] for r in vrows) / len(vrows),
                "peak_mb": peak,
                "rss_before_steps_mb": rss_before,
                "memory_kind": kind,
            }
        )
    return out


def table(
    results: list[dict[str, Any]], args: argparse.Namespace, load: tuple[float, float]
) -> None:
    r0 = next(r for r in results if r["mode"] != "fill")
    print(
        f"## Training step with and without the feature cache (`{' '.join(args.overrides)}`, "
        f"stage `{r0['stage']}`)\n"
    )
    print(
        f"batch {r0['batch_size']}, {r0['precision']}, {args.device}, "
        f"torch threads {args.threads}; "
        f"median of {args.steps} steps after {args.warmup} warm-up, each mode in its own process; "
        f"shares are of the mean step; load average {load[0]:.1f} at start, {load[1]:.1f} at end.\n"
    )
    head = ["data", "encoder", "connector", "LLM fwd+bwd", "optimizer"]
    print(f"| mode | step (s) | samples/s | {' | '.join(head)} | {r0['memory_kind']} (MB) |")
    print("|---|---|---|" + "---|" * len(head) + "---|")
    for r in results:
        if r["mode"] == "fill":
            continue
        p, mean = r["parts_s"], r["mean_step_s"]
        cells = [
            p["data"],
            p["encoder"],
            p["connector"],
            p["llm_fwd"] + p["llm_bwd"],
            p["optimizer"],
        ]
        shares = " | ".join(f"{1e3 * c:.0f} ms ({100 * c / mean:.0f}%)" for c in cells)
        label = (
            r["mode"]
            if r.get("prefix_kv", "config") == "config"
            else f"{r['mode']}, prefix kv {r['prefix_kv']}"
        )
        print(
            f"| {label} | {r['step_s']:.3f} | {r['batch_size'] / r['step_s']:.1f} | {shares} | "
            f"{r['peak_mb']:.0f} (before steps {r['rss_before_steps_mb']:.0f}) |"
        )
    prefix_kv_ratios(results)
    by = {r["mode"]: r for r in results if r.get("prefix_kv") in ("config", "on", None)}
    if "cache" in by and "live" in by:
        live, cached = by["live"], by["cache"]
        saved = (
            live["parts_s"]["encoder"]
            + live["parts_s"]["data"]
            - cached["parts_s"]["encoder"]
            - cached["parts_s"]["data"]
        )
        print(
            f"\nLive / cached median step time: {live['step_s'] / cached['step_s']:.2f}. "
            f"The parts the cache removes (encoder, image loading) cost {1e3 * saved:.0f} ms "
            "per live step "
            f"({100 * saved / live['mean_step_s']:.0f}% of it): the expected speed-up is "
            f"{live['mean_step_s'] / (live['mean_step_s'] - saved):.2f}x"
            + (
                " (within the step-to-step noise of about 10-20%)."
                if saved < 0.1 * live["mean_step_s"]
                else "."
            )
        )
    for modality, c in by.get("fill", {}).get("cache", {}).items():
        verb = "read" if c["hit"] else "filled"
        print(
            f"Feature cache ({modality}): {verb} in {c['seconds']:.1f} s for {c['files']} files "
            f"({1e3 * c['seconds'] / max(1, c['files']):.0f} ms per file)."
        )


def prefix_kv_ratios(results: list[dict[str, Any]]) -> None:
    """Per mode run with ``--prefix-kv both``: the paired off/on ratios of the step and of the
    LLM's forward + backward (median and range over the steps), and what reuse did."""
    for mode in dict.fromkeys(r["mode"] for r in results):
        pair = {r.get("prefix_kv"): r for r in results if r["mode"] == mode}
        if "off" not in pair or "on" not in pair:
            continue
        off, on = pair["off"], pair["on"]
        print(f"\nPrefix reuse ({mode}): {on['prefix_plan']}.")
        for what, key in (("step", "steps_s"), ("LLM fwd+bwd", "llm_s")):
            ratios = sorted(a / b for a, b in zip(off[key], on[key], strict=True))
            print(
                f"- {what}, off / on per step: median {statistics.median(ratios):.3f} "
                f"(range {ratios[0]:.3f}-{ratios[-1]:.3f}, {len(ratios)} pairs); "
                f"medians {statistics.median(off[key]):.3f} s / {statistics.median(on[key]):.3f} s"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides (default: experiment=quickstart)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--stage", default=None, help="stage to run (default: the first of `schedule`)"
    )
    parser.add_argument("--modes", default="cache,live", help="comma-separated: cache, live")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision", default=None, help="32-true | bf16-mixed (default: the config's, resolved)"
    )
    parser.add_argument(
        "--feature-cache-dir",
        default=None,
        help="where the cache mode stores features "
        "(default: a temporary directory, removed afterwards)",
    )
    parser.add_argument(
        "--prefix-kv",
        default="config",
        choices=["config", "off", "on", "both"],
        help="llm.reuse_prefix_kv for the steps: the config's, off, on (auto), or both "
        "(each batch twice, off and on in alternating order: paired ratios)",
    )
    parser.add_argument("--worker", dest="mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not any(o.startswith("experiment=") for o in args.overrides):
        default = (
            "quickstart"
            if (Path(__file__).resolve().parents[1] / "conf/experiment/quickstart.yaml").is_file()
            else "tiny"
        )
        args.overrides = [f"experiment={default}", *args.overrides]

    if args.mode:  # a child: one mode, figures as JSON on stdout
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # progress bars of loaders stay off stdout
            result = fill_cache(args) if args.mode == "fill" else worker(args)
        print(json.dumps(result))
        return 0

    load_start = os.getloadavg()[0]
    warn_if_loaded(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.feature_cache_dir or tmp
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for mode in modes:
            if mode not in ("cache", "live"):
                parser.error(f"--modes: unknown mode '{mode}'; valid: cache, live")
        if "cache" in modes:
            modes.insert(modes.index("cache"), "fill")
        for mode in modes:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                mode,
                "--feature-cache-dir",
                cache_dir,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--prefix-kv",
                args.prefix_kv,
                *(["--stage", args.stage] if args.stage else []),
                *(["--precision", args.precision] if args.precision else []),
                *args.overrides,
            ]
            log(f"mode {mode}: starting a fresh process ...")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                log(f"mode {mode} failed (exit {proc.returncode})")
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.extend(result if isinstance(result, list) else [result])
    table(results, args, (load_start, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
