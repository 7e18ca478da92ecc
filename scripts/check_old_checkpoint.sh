#!/usr/bin/env bash
# Behaviour check across versions: does this checkout still read an older mmbridge's checkpoint
# and give the same figures, and does it train the same model?
#
#   scripts/check_old_checkpoint.sh OLD_COMMIT [NEW_COMMIT] [-- extra train overrides]
#
# 1. trains `experiment=tiny` with the code of OLD_COMMIT (a temporary git worktree, run through
#    this checkout's venv with `mmbridge`, `mmbridge.plugins` and `mmbridge.conf` pointed at it);
# 2. evaluates that old checkpoint with the new code (`mmbridge eval`) and compares every figure
#    of the old run's test metrics (exact match, per type, the no-media / chance baselines, n)
#    and its predictions.jsonl;
# 3. trains the same experiment (same seed) with the new code and compares its metrics.json
#    with the old run's (timings left out).
# The new code is this working tree, or NEW_COMMIT (a second worktree). Exits 1 on any
# difference. Figures go to $MMBRIDGE_CHECK_DIR (default: a fresh temporary directory, kept).
#
# Two changes alter training on purpose, so compare training from a commit after them:
# - 164b4cd (exact resume) draws the training order from a sampler seeded by (seed, epoch):
#   from an older commit the runs differ from the first step (evaluation figures still match);
# - d58d0bd (llm.reuse_prefix_kv: auto) reuses the chat-template prefix's keys/values: the same
#   sums in another order, so losses differ in the 7th digit and drift over a run. For a bitwise
#   comparison with a commit before it, set MMBRIDGE_CHECK_NEW_OVERRIDES="llm.reuse_prefix_kv=false"
#   (overrides for the new code's training only; those after `--` go to both).
# Only CPUs are needed: the tiny run takes a few minutes on 2 cores.
set -euo pipefail

old=${1:?usage: scripts/check_old_checkpoint.sh OLD_COMMIT [NEW_COMMIT] [-- overrides]}
shift
new=""
if [[ $# -gt 0 && $1 != "--" ]]; then new=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
extra=("$@")

repo=$(git rev-parse --show-toplevel)
py=${MMBRIDGE_PYTHON:-$repo/.venv/bin/python}
work=${MMBRIDGE_CHECK_DIR:-$(mktemp -d /tmp/mmbridge-check.XXXXXX)}
mkdir -p "$work"
trees=()
cleanup() {
  for t in "${trees[@]}"; do git -C "$repo" worktree remove --force "$t" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

worktree() {  # $1 commit, $2 dir
  git -C "$repo" worktree add --detach --force "$2" "$1" >/dev/null
  trees+=("$2")
}
worktree "$old" "$work/old-code"
new_root=$repo
if [[ -n $new ]]; then worktree "$new" "$work/new-code"; new_root=$work/new-code; fi

# The venv installs mmbridge editable (a meta-path finder mapping package -> folder); this
# sitecustomize points that mapping at $MMBRIDGE_CODE_ROOT, in every process the command starts.
mkdir -p "$work/shim"
cat > "$work/shim/sitecustomize.py" <<'PY'
import os
import sys

_root = os.environ.get("MMBRIDGE_CODE_ROOT")
for _name, _mod in list(sys.modules.items()):
    if _root and _name.startswith("__editable___mmbridge") and hasattr(_mod, "MAPPING"):
        _mod.MAPPING.update({"mmbridge": f"{_root}/core", "mmbridge.conf": f"{_root}/conf",
                             "mmbridge.plugins": f"{_root}/plugins"})
PY

mmb() {  # $1 code root, $2 cache dir, rest: mmbridge arguments
  local root=$1 cache=$2
  shift 2
  (cd "$work" && MMBRIDGE_CODE_ROOT=$root PYTHONPATH=$work/shim MMBRIDGE_CACHE=$cache \
     HF_HUB_OFFLINE=1 MMBRIDGE_DISABLE_PLUGINS=1 "$py" -c "import sys; from mmbridge.cli import main; sys.exit(main())" "$@")
}

where=$(MMBRIDGE_CODE_ROOT=$work/old-code PYTHONPATH=$work/shim "$py" -c "import mmbridge; print(mmbridge.__file__)")
[[ $where == "$work/old-code/core/__init__.py" ]] || { echo "the shim did not take: mmbridge is $where" >&2; exit 2; }

train=(train experiment=tiny trainer.enable_progress_bar=false "${extra[@]}")
echo "== training with $old (old code) -> $work/old-run"
mmb "$work/old-code" "$work/cache-old" "${train[@]}" "hydra.run.dir=$work/old-run" > "$work/old-train.log" 2>&1 \
  || { tail -30 "$work/old-train.log"; exit 2; }
echo "== evaluating the old checkpoint with the new code ($new_root)"
mmb "$new_root" "$work/cache-old" eval "checkpoint=$work/old-run/checkpoints/final" \
  "out=$work/new-eval.json" "predictions=$work/new-eval-predictions.jsonl" > "$work/new-eval.log" 2>&1 \
  || { tail -30 "$work/new-eval.log"; exit 2; }
echo "== training with the new code -> $work/new-run"
mmb "$new_root" "$work/cache-new" "${train[@]}" ${MMBRIDGE_CHECK_NEW_OVERRIDES:-} "hydra.run.dir=$work/new-run" > "$work/new-train.log" 2>&1 \
  || { tail -30 "$work/new-train.log"; exit 2; }

"$py" - "$work" <<'PY'
import json
import math
import sys
from pathlib import Path

work = Path(sys.argv[1])
# wall-clock figures differ between any two runs
TIMING = ("seconds", "time_s", "per_s", "wall_s")


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, f"{key}."))
        elif isinstance(v, list) and all(isinstance(x, dict) for x in v):  # a validation history
            for i, x in enumerate(v):
                out.update(flat(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def compare(title, want, got, keep=lambda k: True):
    """Print old vs new per key; count differences (a key only the new side has is reported,
    not counted: new versions add figures)."""
    print(f"\n{title}")
    print(f"  {'key':44} {'old':>22} {'new':>22}")
    bad = 0
    for k in sorted(set(want) | set(got)):
        if not keep(k):
            continue
        a, b = want.get(k, "(absent)"), got.get(k, "(absent)")
        ok = same(a, b) or k not in want
        bad += not ok
        print(f"{' ' if ok else '!'} {k:44} {str(a)[:22]:>22} {str(b)[:22]:>22}")
    return bad


# what a training run decides: the held-out figures, the validation history, the model's size;
# not wall-clock figures, paths or the cache's bookkeeping
FIGURES = ("test.", "stages.", "val_loss_", "parameters.", "visual_tokens.", "seed")


def figure(key):
    return key.startswith(FIGURES) and not any(s in key for s in TIMING)


old = json.loads((work / "old-run" / "metrics.json").read_text())
new_eval = json.loads((work / "new-eval.json").read_text())
new = json.loads((work / "new-run" / "metrics.json").read_text())
bad = compare("old checkpoint: the old run's test metrics vs `mmbridge eval` with the new code",
              flat(old["test"]), flat(new_eval))
preds_same = ((work / "old-run" / "predictions.jsonl").read_bytes()
              == (work / "new-eval-predictions.jsonl").read_bytes())
print(f"{' ' if preds_same else '!'} predictions.jsonl identical: {preds_same}")
bad += not preds_same
bad += compare("metrics.json of experiment=tiny: old code vs new code (same seed)",
               flat(old), flat(new), keep=figure)
print(f"\n{'SAME' if not bad else f'{bad} DIFFERENCES'} (files in {work})")
sys.exit(1 if bad else 0)
PY
