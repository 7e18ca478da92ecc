#!/usr/bin/env bash
# One-GPU check of the CUDA path, in under 8 minutes on an A100/H100-class GPU:
#   1. experiment=tiny in bf16 on CUDA (both stages)
#   2. the quickstart (real DINOv2-S + SmolLM2-135M) in bf16 on CUDA, budget_minutes=3
#   3. mmbridge eval and mmbridge generate of the quickstart checkpoint on the GPU
#   4. experiment=tiny under trainer=fsdp on every GPU (one FSDP unit per block; checkpoints
#      gathered on rank 0, rank 0 evaluates)
#   5. the `gpu`-marked tests
# and prints each stage's median step time (metrics.json stages.<name>.step_time_s) and the
# peak CUDA memory of each run. Without a CUDA device it says so in one line and exits 0.
# usage: scripts/gpu_check.sh [OUT_DIR]      (default: outputs/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
MM=("$PY" -m mmbridge.cli)
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; skipped"
  exit 0
fi
OUT=${1:-outputs/gpu_check}
rm -rf "$OUT"; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
t0=$SECONDS
stamp() { echo "[gpu_check $((SECONDS - t0)) s] $*"; }

stamp "tiny: bf16 on CUDA"
"${MM[@]}" train experiment=tiny trainer=gpu device=cuda "hydra.run.dir=$OUT/tiny" > "$OUT/tiny.log" 2>&1
stamp "quickstart: bf16 on CUDA, budget_minutes=3"
"${MM[@]}" train experiment=quickstart trainer=gpu device=cuda budget_minutes=3 \
  "hydra.run.dir=$OUT/quickstart" > "$OUT/quickstart.log" 2>&1
CKPT="$OUT/quickstart/checkpoints/final"
stamp "eval on CUDA"
"${MM[@]}" eval "checkpoint=$CKPT" device=cuda max_samples=128 "out=$OUT/eval.json" > "$OUT/eval.log" 2>&1
stamp "generate on CUDA"
"$PY" - "$OUT/red_circle.png" <<'PY'
import sys
from PIL import Image, ImageDraw
img = Image.new("RGB", (224, 224), "white")
ImageDraw.Draw(img).ellipse((40, 40, 184, 184), fill=(220, 20, 20))
img.save(sys.argv[1])
PY
"${MM[@]}" generate "checkpoint=$CKPT" "image=$OUT/red_circle.png" "prompt=What shape is this?" \
  max_new_tokens=8 device=cuda | tee "$OUT/generate.txt"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
stamp "tiny: trainer=fsdp on $NGPU GPU(s)"
"${MM[@]}" train experiment=tiny trainer=fsdp "trainer.devices=$NGPU" trainer.enable_progress_bar=false \
  stages.instruct.train.llm=lora "hydra.run.dir=$OUT/tiny_fsdp" > "$OUT/tiny_fsdp.log" 2>&1
stamp "gpu-marked tests"
"$PY" -m pytest -q -m gpu tests/e2e/test_gpu.py 2>&1 | tail -3

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
print(f"\nGPU: {torch.cuda.get_device_name(0)}")
for run in ("tiny", "quickstart", "tiny_fsdp"):
    m = json.loads((out / run / "metrics.json").read_text())
    stages = ", ".join(f"{name} {s['steps']} steps x {s['step_time_s'] * 1000:.1f} ms"
                       for name, s in m["stages"].items())
    test = m.get("test", {})
    em = next((f"{k}={v:.3f}" for k, v in test.items() if k.startswith("exact_match") and isinstance(v, float)), "")
    print(f"{run:<11} precision {m['precision']['trainer']} on {m['precision']['device']}: {stages}; "
          f"peak memory {m['peak_memory_mb']:.0f} MiB; wall {m['wall_s']:.0f} s {em}")
ev = json.loads((out / "eval.json").read_text())
print("eval:", ", ".join(f"{k}={v:.3f}" for k, v in ev.items() if isinstance(v, float))[:300])
PY
stamp "done"
