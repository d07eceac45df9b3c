#!/usr/bin/env bash
# Everything the H200 checks in one call: kernel + engine tests (fp16, bf16), parity with HF on GLUE dev, and
# the operator benchmark. Run on the device from the repo root with the model and data carried in .carry
# (../shared/tools/pack-for-device). Results land in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GLUE_DIR=$PWD/.carry/glue ETFORMER_DEFAULT_MODEL=$PWD/.carry/minilm-l6-fp16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
step=${1:-all}
if [ "$step" = all ] || [ "$step" = tests ]; then
  python3 -m pytest -q -x tests/test_kernels.py tests/test_engine.py tests/test_torch_encoder.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$step" = all ] || [ "$step" = parity ]; then
  python3 scripts/gpu_parity.py "$OUT" 2>&1 | grep -v "Loading weights" | tee "$OUT/parity.log" | tail -12
fi
if [ "$step" = all ] || [ "$step" = kernels ]; then
  python3 -m etformer.bench.kernels --out "$OUT" ${KBENCH_ARGS:-} 2>&1 | tee "$OUT/kernels.log" | tail -80
fi
if [ "$step" = tune ]; then
  python3 scripts/tune.py "$OUT" 2>&1 | tee "$OUT/tune.log" | tail -60
fi
if [ "$step" = all ] || [ "$step" = probe ] || [ "$step" = tune ]; then
  python3 - <<'PY' 2>&1 | grep -v "Loading weights" | tee "$OUT/probe.log" | tail -40
import os
from etformer.bench.run import run_bench, write_reports
tile = tuple(int(v) for v in os.environ.get("PROBE_TILE", "128x64").split("x"))
res = run_bench(models=("bert-base",), batches=(1, 32), seqs=(128, 512), varlens=(False, True), sparsities=(0.5, 0.7),
                peers=("hf_graph", "cublas_sdpa_graph"), tile=tile, max_tokens=16384, variants=("dense", "tile"))
write_reports(res, os.environ["OUT"] + "/probe", "probe")
PY
fi
