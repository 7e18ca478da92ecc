"""Serving overhead: ``mmbridge serve`` under concurrent requests vs ``generate`` in one process.

Starts ``mmbridge serve`` on a free 127.0.0.1 port (or uses ``--url``), sends ``--requests``
chat completions (each a different image as a data: URL, streamed, greedy) with 1 and with 8 in
flight, and prints requests/s, p50 / p95 latency and time to first token; then answers the
same questions through :meth:`mmbridge.api.Model.generate` in this process (one by one, and in
batches of 8) and prints the serving overhead as a ratio. ::

    python scripts/bench_serve.py --tiny                      # a tiny checkpoint, built here
    python scripts/bench_serve.py --build quickstart --requests 8   # DINOv2-S -> MLP -> SmolLM2
    python scripts/bench_serve.py --checkpoint runs/x/checkpoints/final --requests 32

The server answers one request at a time (a lock around the model), so 8 in flight queue:
throughput stays that of batch 1 and latency grows with the queue.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPT = "What colour is the shape?"


def untrained_checkpoint(out: Path, overrides: list[str]) -> Path:
    """An untrained model of a config (its connector random, the pretrained parts as they
    ship) saved as a run saves it: what serving costs does not depend on training."""
    from mmbridge.config import compose
    from mmbridge.model import assemble
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.runtime.config import RunConfig
    from mmbridge.training.checkpoint import save_checkpoint
    from mmbridge.training.stages import configure_trainable

    registry = load_registry()
    cfg = compose(overrides, registry)
    model = assemble(cfg, registry)
    for stage in ("align", "instruct"):
        configure_trainable(model, RunConfig.parse(cfg).stages[stage])
    save_checkpoint(model, cfg, out, ["align", "instruct"], registry)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(
    client, model: str, url: str, max_tokens: int, stream: bool = True
) -> tuple[float, float, str]:
    """(latency s, time to first token s, answer) of one completion (not streamed: the first
    token comes with the answer)."""
    start = time.perf_counter()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": PROMPT},
            ],
        }
    ]
    if not stream:
        reply = client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0, messages=messages
        )
        end = time.perf_counter() - start
        return end, end, reply.choices[0].message.content or ""
    first, text = None, []
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True, messages=messages
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return end - start, (first or end) - start, "".join(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a run's checkpoints/final or a bundle")
    ap.add_argument(
        "--tiny", action="store_true", help="build and serve a tiny untrained checkpoint"
    )
    ap.add_argument(
        "--build",
        metavar="EXPERIMENT",
        help="build and serve an untrained checkpoint of experiment=EXPERIMENT",
    )
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="the server's batch_size; above 1 the requests are not streamed (batching "
        "takes greedy non-streamed requests)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server and of the in-process baseline alike",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process's torch threads
    import openai
    import torch

    import mmbridge
    from mmbridge.plugins.encoders._image import example_png

    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.tiny:
        ckpt = untrained_checkpoint(work / "final", ["experiment=tiny", "encoder.image_size=32"])
    elif args.build:
        ckpt = untrained_checkpoint(work / "final", [f"experiment={args.build}"])
    elif args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        ap.error("give --checkpoint PATH, --tiny or --build EXPERIMENT")
    images = [example_png(work, k) for k in range(args.requests)]
    urls = [
        "data:image/png;base64," + base64.b64encode(Path(p).read_bytes()).decode() for p in images
    ]

    proc = None
    base = args.url
    if base is None:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(work / "serve.log", "w")  # noqa: SIM115 (open while the server runs)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mmbridge.cli",
                "serve",
                f"checkpoint={ckpt}",
                f"port={port}",
                "device=cpu",
                f"batch_size={args.batch_size}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        for _ in range(600):
            try:
                model_id = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                if proc is not None and proc.poll() is not None:
                    raise SystemExit(
                        f"the server exited: {(work / 'serve.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        else:
            raise SystemExit("the server did not start in 300 s")
        stream = args.batch_size == 1
        one_request(client, model_id, urls[0], args.max_tokens, stream)  # warm-up
        rows = {}
        for conc in (1, 8):
            start = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                results = list(
                    pool.map(
                        lambda u: one_request(client, model_id, u, args.max_tokens, stream), urls
                    )
                )
            wall = time.perf_counter() - start
            lat, ttft = [r[0] for r in results], [r[1] for r in results]
            rows[conc] = (
                len(urls) / wall,
                pct(lat, 0.5),
                pct(lat, 0.95),
                pct(ttft, 0.5),
                pct(ttft, 0.95),
            )
            served = [r[2] for r in results]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)

    m = mmbridge.load(ckpt, device="cpu")
    m.generate(PROMPT, image=images[0], max_new_tokens=args.max_tokens)  # warm-up
    local: dict[int, tuple[float, float, float]] = {}
    answers: list[str] = []
    for batch in (1, 8):
        times = []
        start = time.perf_counter()
        for k in range(0, len(images), batch):
            t0 = time.perf_counter()
            out = m.generate(
                [PROMPT] * len(images[k : k + batch]),
                image=images[k : k + batch],
                max_new_tokens=args.max_tokens,
            )
            times.append(time.perf_counter() - t0)
            if batch == 1:
                answers.extend(out)
        wall = time.perf_counter() - start
        local[batch] = (len(images) / wall, pct(times, 0.5), pct(times, 0.95))

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    print(
        f"# bench_serve {time.strftime('%Y-%m-%d')}: {args.requests} requests, max_tokens "
        f"{args.max_tokens}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    print(
        "| path | in flight / batch | requests/s | p50 latency s | p95 latency s "
        "| p50 TTFT s | p95 TTFT s |"
    )
    print("|---|---|---|---|---|---|---|")
    for conc, (rps, p50, p95, t50, t95) in rows.items():
        how = "streamed" if args.batch_size == 1 else f"batch_size={args.batch_size}, not streamed"
        print(
            f"| mmbridge serve (openai client, {how}) | {conc} | {rps:.2f} | {p50:.3f} | {p95:.3f} "
            f"| {t50:.3f} | {t95:.3f} |"
        )
    for batch, (rps, p50, p95) in local.items():
        print(
            f"| Model.generate in one process | {batch} | {rps:.2f} | {p50:.3f} | {p95:.3f} "
            "| - | - |"
        )
    print(
        f"serving overhead (p50 latency, 1 in flight vs generate batch 1): "
        f"{rows[1][1] / local[1][1]:.2f}x; throughput ratio (serve 8 in flight / generate "
        f"batch 8): {rows[8][0] / local[8][0]:.2f}"
    )
    same = sum(a == b for a, b in zip(served, answers))
    print(f"answers equal to generate's (last served round): {same} of {len(answers)}")
    for a, b in zip(served, answers):
        if a != b:
            print(f"  served {a!r} != generate {b!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
