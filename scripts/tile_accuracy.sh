#!/usr/bin/env bash
# Accuracy against tile shape: prune MiniLM to 50% on STS-B with each tile shape (one epoch per stage) on the GPU.
set -uo pipefail
OUT=${OUT:-/tmp/out}
for t in ${TILES:-16x16 32x32 64x64 128x64}; do
  python3 -m etformer.cli prune --task stsb --pattern tile --sparsity 0.5 --tile $t --out /tmp/ta-$t --overwrite \
    --max-len 64 --lr 1e-4 --epochs ${EPOCHS:-1} 2>&1 | grep -E "dense|pruned|wrote" | tee -a "$OUT/tile_accuracy.log"
  cp /tmp/ta-$t/etformer.json "$OUT/tile_accuracy_$t.json"
done
