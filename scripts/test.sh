#!/usr/bin/env bash
# Runs the test suite on the CPU: Triton kernels through the interpreter, the rest on PyTorch references.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLUE_DIR=${GLUE_DIR:-$(cd .. && pwd)/shared/glue}
export TRITON_INTERPRET=${TRITON_INTERPRET:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
