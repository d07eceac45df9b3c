#!/usr/bin/env bash
# Accuracy at 50% tiles (MiniLM-L6, STS-B, 128x64 tiles) on the GPU: longer recipes and a larger distillation corpus
# (the training sentences of the other GLUE tasks, no labels), reweighted group lasso and ADMM side by side. The runs
# share the GPU and go in parallel. Run from the repo root with PYTHONPATH, GLUE_DIR and ETFORMER_DEFAULT_MODEL set
# (scripts/bench_h200.sh does that: part `accuracy`). Writes OUT/accuracy/NAME.{log,json}.
set -uo pipefail
OUT=${OUT:-/tmp/out}/accuracy; mkdir -p "$OUT"
CORPUS=${CORPUS:-sst2,mrpc,cola,rte}; LIMIT=${LIMIT:-20000}; EPOCHS=${EPOCHS:-3}
run() {
  local name=$1; shift
  ( time timeout "${SECONDS_EACH:-560}" python3 -m etformer.cli prune --task stsb --pattern tile --sparsity "${SPARSITY:-0.5}" \
      --max-len 64 --out "/tmp/acc-$name" --overwrite "$@" ) > "$OUT/$name.log" 2>&1
  cp "/tmp/acc-$name/etformer.json" "$OUT/$name.json" 2>/dev/null
  grep -E "^dense|pruned \(|wrote|rror|real" "$OUT/$name.log" | sed "s/^/$name: /"
}
case ${SET:-methods} in
  methods)  # RGL and ADMM on the larger corpus, batch 128 (and RGL distilling every layer)
    run rgl_corpus --method rgl --distill-tasks "$CORPUS" --distill-limit "$LIMIT" --batch-size 128 --epochs "$EPOCHS" &
    run admm_corpus --method admm --distill-tasks "$CORPUS" --distill-limit "$LIMIT" --batch-size 128 --epochs "$EPOCHS" &
    run rgl_corpus_hidden --method rgl --distill-tasks "$CORPUS" --distill-limit "$LIMIT" --batch-size 128 \
      --epochs "$EPOCHS" --distill-hidden & ;;
  length)  # STS-B sentences only, 8 epochs per stage, batch 32
    run rgl_stsb_e8 --method rgl --epochs 8 & ;;
  frontier)  # batch 32, every layer distilled: 50% on the corpus (2 epochs) and on STS-B alone (8), 30% on STS-B (8)
    run rgl50_corpus_hidden_b32 --method rgl --distill-tasks "$CORPUS" --distill-limit "$LIMIT" --epochs 2 --distill-hidden &
    run rgl50_stsb_e8_hidden --method rgl --epochs 8 --distill-hidden &
    SPARSITY=0.3 run rgl30_stsb_e8_hidden --method rgl --epochs 8 --distill-hidden & ;;
esac
wait
