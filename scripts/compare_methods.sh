#!/usr/bin/env bash
# Pruning methods side by side on MiniLM-L6 / STS-B at 50% tiles (default tile), same budget for each:
# STEPS steps per stage, batch 32, sequences up to 64 tokens. Writes one etformer.json per method under OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/methods}; STEPS=${STEPS:-100}
export GLUE_DIR=${GLUE_DIR:-$(cd .. && pwd)/shared/glue} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for m in ${METHODS:-rgl admm oneshot gmp}; do
  .venv/bin/etformer prune --task stsb --pattern tile --sparsity 0.5 --method $m --max-steps $STEPS --max-len 64 \
    --lr 1e-4 --out "$OUT/$m" --overwrite --device cpu | grep -E "pruned \(|wrote"
done
