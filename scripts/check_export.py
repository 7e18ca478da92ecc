"""Does an exported model answer exactly as ``mmbridge generate`` does? Held-out questions of a
run, answered both ways, side by side.

    python scripts/check_export.py outputs/quickstart/<time>              # format=bundle
    python scripts/check_export.py outputs/quickstart_hf/<time> --hf      # format=hf (transformers)

For each of ``--n`` held-out questions of the run's data (its test split: the image and
question ``k`` of sample ``k``, so the question types vary):

* bundle (default): ``mmbridge export format=bundle``, then ``mmbridge generate`` on the run's
  checkpoint (the CLI, one subprocess per question) beside ``mmbridge.load(bundle).generate``
  in a fresh process whose ``MMBRIDGE_CACHE`` and ``HF_HOME`` are empty directories (the bundle
  needs neither the asset cache nor the data). Both run in the precision the machine decides
  (``dtype: auto``).
* ``--hf``: ``mmbridge export format=hf``, then ``mmbridge generate`` in float32
  (``llm.dtype=float32 encoder.dtype=float32``: the export is the model in float32) beside plain
  transformers in a fresh process with empty caches (``AutoProcessor.from_pretrained(DIR,
  backend="pil")`` + ``LlavaForConditionalGeneration.from_pretrained(DIR)``, greedy, the same
  ``max_new_tokens``), plus the largest logits difference over one prompt.

Prints a Markdown table and writes ``check.json`` under ``--out``; the exit status is 1 when any
answer differs (or the logits differ by more than 1e-4), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FP32 = ["llm.dtype=float32", "encoder.dtype=float32"]
LOGITS_TOLERANCE = 1e-4


def mmbridge_cli() -> list[str]:
    """The ``mmbridge`` command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "mmbridge"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from mmbridge.cli import main; sys.exit(main())"]


def held_out(checkpoint: Path, n: int) -> list[dict[str, str]]:
    """``n`` questions of the run's test split: ``{id, image, question, reference}``; sample
    ``k`` gives its question ``k mod (its question count)``, so the question types vary."""
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.runtime.config import RunConfig
    from mmbridge.runtime.session import load_splits
    from mmbridge.training.checkpoint import read_checkpoint

    registry = load_registry()
    cfg = read_checkpoint(checkpoint, registry)[0]
    splits = load_splits(RunConfig.parse(cfg), registry)
    split = "test" if "test" in splits else next(iter(splits))
    out = []
    for k, s in enumerate(splits[split][:n]):
        turns = s.conversations
        pairs = [
            (turns[i]["value"], turns[i + 1]["value"])
            for i in range(0, len(turns) - 1, 2)
            if turns[i]["from"] == "human"
        ]
        question, answer = pairs[k % len(pairs)]
        question = "\n".join(
            line for line in question.splitlines() if line.strip() != "<image>"
        ).strip()
        out.append(
            {"id": s.id, "image": str(s.media["image"]), "question": question, "reference": answer}
        )
    return out


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """stdout of ``cmd``; its stderr is shown when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def generate_cli(
    checkpoint: Path, questions: list[dict[str, str]], max_new_tokens: int, overrides: list[str]
) -> list[str]:
    """Each question through ``mmbridge generate`` (one process per question)."""
    answers = []
    for q in questions:
        out = run(
            [
                *mmbridge_cli(),
                "generate",
                f"checkpoint={checkpoint}",
                f"image={q['image']}",
                f"prompt={q['question']}",
                f"max_new_tokens={max_new_tokens}",
                "device=cpu",
                *overrides,
            ]
        )
        answers.append(out.strip())
    return answers


def fresh_env(root: Path) -> dict[str, str]:
    """This environment with empty mmbridge and Hugging Face caches, offline."""
    env = dict(os.environ)
    for var in ("MMBRIDGE_CACHE", "HF_HOME"):
        d = root / var.lower()
        d.mkdir(parents=True, exist_ok=True)
        env[var] = str(d)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def in_worker(
    mode: str, job: dict[str, Any], env: dict[str, str] | None, root: Path
) -> dict[str, Any]:
    """Run this script's ``--worker MODE`` on ``job`` in a new process; its JSON result."""
    job_file, result_file = root / f"{mode}-job.json", root / f"{mode}-result.json"
    job_file.write_text(json.dumps(job))
    run([sys.executable, __file__, "--worker", mode, str(job_file), str(result_file)], env=env)
    return json.loads(result_file.read_text())


# -- workers (fresh processes) ------------------------------------------------------------------


def worker_bundle(job: dict[str, Any]) -> dict[str, Any]:
    """Answers of ``mmbridge.load(bundle)``, one prompt at a time."""
    import mmbridge

    model = mmbridge.load(job["path"], device="cpu")
    return {
        "answers": [
            model.generate(q["question"], image=q["image"], max_new_tokens=job["max_new_tokens"])
            for q in job["questions"]
        ],
        "llm_dtype": str(next(model.session.model.llm.parameters()).dtype),
    }


def _llava(path: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path, backend="pil")  # PIL resize, as mmbridge
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return processor, model


def _llava_inputs(processor: Any, question: str, image: str) -> Any:
    from PIL import Image

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    with Image.open(image) as im:
        return processor(images=im.convert("RGB"), text=prompt, return_tensors="pt")


def worker_hf(job: dict[str, Any]) -> dict[str, Any]:
    """Answers of plain transformers (greedy) from the ``format=hf`` directory."""
    import torch

    processor, model = _llava(job["path"])
    answers = []
    for q in job["questions"]:
        inputs = _llava_inputs(processor, q["question"], q["image"])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=job["max_new_tokens"], do_sample=False)
        answers.append(
            processor.decode(
                out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            ).strip()
        )
    return {"answers": answers}


def worker_logits(job: dict[str, Any]) -> dict[str, Any]:
    """Largest |logits difference| over one prompt: transformers vs ``mmbridge.load`` (float32),
    and whether the token ids agree (the image slots in place of the image token)."""
    import torch

    import mmbridge

    q = job["questions"][0]
    m = mmbridge.load(job["checkpoint"], device="cpu", overrides=FP32)
    want, _ = m.logits(q["question"], image=q["image"])
    batch = m.encode(
        [[{"from": "human", "value": f"<image>\n{q['question']}"}]], [{"image": q["image"]}]
    )
    processor, llava = _llava(job["path"])
    inputs = _llava_inputs(processor, q["question"], q["image"])
    ids = torch.where(batch["slots"]["image"], llava.config.image_token_id, batch["input_ids"])
    with torch.no_grad():
        got = llava(**inputs).logits[..., : want.shape[-1]].float()
    return {
        "same_ids": bool(torch.equal(inputs["input_ids"], ids)),
        "tokens": int(ids.shape[1]),
        "max_abs_diff": float((got - want).abs().max()),
        "logit_scale": float(want.abs().max()),
    }


WORKERS = {"bundle": worker_bundle, "hf": worker_hf, "logits": worker_logits}


# -- the check ----------------------------------------------------------------------------------


def table(
    questions: list[dict[str, str]], left: list[str], right: list[str], right_name: str
) -> str:
    rows = [
        f"| # | question | reference | `mmbridge generate` | {right_name} | same |",
        "|---:|---|---|---|---|:---:|",
    ]
    for k, (q, a, b) in enumerate(zip(questions, left, right)):
        rows.append(
            f"| {k} | {q['question']} | {q['reference']} | {a} | {b} "
            f"| {'yes' if a == b else '**no**'} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir", type=Path, nargs="?", help="a run directory (holding checkpoints/final)"
    )
    parser.add_argument(
        "--hf", action="store_true", help="check format=hf through transformers (default: bundle)"
    )
    parser.add_argument("--n", type=int, default=8, help="held-out questions (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length (default: 8)")
    parser.add_argument(
        "--out",
        type=Path,
        help="where the export and check.json go (default: a temporary directory)",
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("MODE", "JOB", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.worker:
        mode, job, result = args.worker
        Path(result).write_text(json.dumps(WORKERS[mode](json.loads(Path(job).read_text()))))
        return 0
    if args.run_dir is None:
        parser.error("run_dir is required")
    checkpoint = (args.run_dir / "checkpoints" / "final").resolve()
    if not checkpoint.is_dir():
        parser.error(
            f"{checkpoint}: no such checkpoint (give a run directory holding checkpoints/final)"
        )
    fmt = "hf" if args.hf else "bundle"
    root = (args.out or Path(tempfile.mkdtemp(prefix=f"mmbridge-check-{fmt}-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    export_dir = root / fmt
    t0 = time.perf_counter()
    questions = held_out(checkpoint, args.n)
    run(
        [
            *mmbridge_cli(),
            "export",
            f"checkpoint={checkpoint}",
            f"out={export_dir}",
            f"format={fmt}",
            "overwrite=true",
        ]
    )
    t_export = time.perf_counter() - t0
    print(f"exported format={fmt}: {export_dir} ({t_export:.0f} s)", flush=True)
    fresh = root / "fresh-caches"
    shutil.rmtree(fresh, ignore_errors=True)
    job = {
        "path": str(export_dir),
        "checkpoint": str(checkpoint),
        "questions": questions,
        "max_new_tokens": args.max_new_tokens,
    }
    generated = generate_cli(checkpoint, questions, args.max_new_tokens, FP32 if args.hf else [])
    result = in_worker(fmt, job, fresh_env(fresh), root)
    other = result["answers"]
    if "llm_dtype" in result:
        print(
            f"mmbridge.load(bundle) with empty caches ran its LLM in {result['llm_dtype']} "
            "(dtype: auto)"
        )
    right_name = (
        "transformers (Llava, float32)" if args.hf else "`mmbridge.load(bundle)` (empty cache)"
    )
    print(table(questions, generated, other, right_name))
    same = [a == b for a, b in zip(generated, other)]
    summary: dict[str, Any] = {
        "run_dir": str(args.run_dir.resolve()),
        "format": fmt,
        "export": str(export_dir),
        "max_new_tokens": args.max_new_tokens,
        "questions": questions,
        "mmbridge_generate": generated,
        "other": other,
        "identical": all(same),
        "precision": "float32 (llm.dtype / encoder.dtype overrides)" if args.hf else "auto",
    }
    ok = all(same)
    if args.hf:
        logits = in_worker("logits", job, None, root)
        summary["logits"] = logits
        print(
            f"logits over prompt 0 ({logits['tokens']} tokens, "
            f"same token ids: {logits['same_ids']}): "
            f"max |diff| {logits['max_abs_diff']:.3g} (largest |logit| {logits['logit_scale']:.3g})"
        )
        ok = ok and logits["same_ids"] and logits["max_abs_diff"] <= LOGITS_TOLERANCE
    summary["ok"] = ok
    (root / "check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{sum(same)}/{len(same)} answers identical; {'OK' if ok else 'DIFFERENT'} "
        f"({time.perf_counter() - t0:.0f} s, {root / 'check.json'})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
