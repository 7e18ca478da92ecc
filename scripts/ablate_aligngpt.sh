#!/usr/bin/env bash
# AlignGPT (2405.14129) ablation on noisy shapes, one command: the sweep of
# conf/experiment/aligngpt_ablation.yaml (MLP baseline vs AlignGPT N=4 / N=8 vs the local-only,
# uniform and global-only variants; 2 seeds), its results table (held-out exact match,
# trainable parameters, step time), and how well the alignment levels match the known caption
# corruption (rank correlation).
#
#   scripts/ablate_aligngpt.sh                                          # tiny models (CPU)
#   scripts/ablate_aligngpt.sh experiment=aligngpt_quickstart_ablation  # DINOv2-S -> SmolLM2
#   scripts/ablate_aligngpt.sh seed=0 --dir /tmp/abl                    # any `mmbridge sweep` args
#
# On a small busy CPU, OMP_NUM_THREADS=1 makes the tiny models several times faster.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
MMBRIDGE=${MMBRIDGE:-mmbridge}
PYTHON=${PYTHON:-python}
args=("$@")
experiment=experiment=aligngpt_ablation
for a in "$@"; do [[ $a == experiment=* ]] && experiment=$a; done
[[ " $* " == *" experiment="* ]] || args=("$experiment" "${args[@]}")

log=$(mktemp)
"$MMBRIDGE" sweep "${args[@]}" 2>&1 | tee "$log"
report=$(sed -n 's/.*report: \(.*results\.md\)$/\1/p' "$log" | tail -1)
rm -f "$log"

echo
echo "## Alignment levels vs the known caption corruption ($experiment)"
# stage overrides of the sweep do not matter here: only the data, encoder and scorer do
"$PYTHON" scripts/aligngpt_levels.py "$experiment" | grep '^|'
if [[ -n $report ]]; then
  echo
  cat "$report"
fi
