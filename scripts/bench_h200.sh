#!/usr/bin/env bash
# The H200 benchmark, split into parts that each fit one device call (merge them afterwards with
# `etformer bench --merge */bench.json --out benchmarks/results/h200`). Run from the repo root on the device with the
# model and data in .carry (../shared/tools/pack-for-device .carry). Results land in $OUT/<part>. TREE names the
# commit in the test log's header where the copy's git metadata is stale.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GLUE_DIR=$PWD/.carry/glue ETFORMER_DEFAULT_MODEL=$PWD/.carry/minilm-l6-fp16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
EB="python3 -m etformer.cli bench"
for part in "$@"; do
  case $part in
    tests)  # kernels and engine on the GPU (fp16, bf16, CUDA graphs)
      { echo "# ${TREE:-$(git rev-parse --short HEAD 2>/dev/null)} (working tree), $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1): python3 -m pytest -q tests/test_kernels.py tests/test_encoder_layer.py tests/test_engine.py tests/test_torch_encoder.py"
        timeout 400 python3 -m pytest -q -x tests/test_kernels.py tests/test_encoder_layer.py tests/test_engine.py tests/test_torch_encoder.py 2>&1; } | tee "$OUT/gpu_tests.log" | tail -3 ;;
    small)  # BERT-base at the smallest batches (the small-batch path), against the dense peers
      $EB --models bert-base --batches 1,2 --seqs 128,256 --peers hf_sdpa,hf_graph,cublas_sdpa_graph --variants dense,tile \
          --sparsities 0.5 --out "$OUT/small" 2>&1 | grep -v "Loading weights" | tail -30 ;;
    bert128)  # BERT-base, S=128: every dense peer (torch.compile at 32x128), every etformer variant
      $EB --models bert-base --batches 1,8,32,128 --seqs 128 --peers hf_sdpa,hf_graph,compile,cublas_sdpa_graph \
          --compile-shapes 32x128 --out "$OUT/bert128" 2>&1 | grep -v "Loading weights" | tail -90 ;;
    bert512)  # BERT-base, S=384 and 512
      $EB --models bert-base --batches 1,8,32,128 --seqs 384,512 --peers hf_sdpa,hf_graph,cublas_sdpa_graph \
          --out "$OUT/bert512" 2>&1 | grep -v "Loading weights" | tail -120 ;;
    sparsepeers)  # torch's own sparse paths (2:4 semi-structured, BSR with etformer's mask) beside cuBLAS + SDPA
      $EB --models bert-base --batches 8,32 --seqs 128,512 --peers cublas_sdpa_graph,semi24,bsr --sparsities 0.5 \
          --variants dense,tile --out "$OUT/sparsepeers" 2>&1 | grep -v "Loading weights" | tail -40 ;;
    others)  # DistilBERT-shaped and the real MiniLM-L6
      $EB --models distilbert,minilm --batches 1,8,32,128 --seqs 128,512 --peers hf_sdpa,hf_graph,cublas_sdpa_graph \
          --sparsities 0.5,0.7 --variants dense,tile,attention_aware --out "$OUT/others" 2>&1 | grep -v "Loading weights" | tail -70 ;;
    t800)  # E.T.'s Transformer (d=800) through nn.TransformerEncoder
      python3 -m etformer.bench.transformer --out "$OUT/t800" 2>&1 | grep -v -i warn | tail -50 ;;
    kernels)  # operators alone: tile linear vs cuBLAS and BSR; attention vs SDPA
      python3 -m etformer.bench.kernels --out "$OUT/kernels" --tiles 64x64,128x64 2>&1 | tail -45 ;;
    attnvarlen)  # attention launch sweep on ragged and full batches at S <= 512 (RAGGED_SHORT_LAUNCH)
      python3 scripts/tune_attention_varlen.py "$OUT/attnvarlen" 2>&1 | grep -v "^  (" | tail -50 ;;
    raggedab)  # the ragged short-batch attention launch on and off in the whole encoder (BERT-base, S=128)
      python3 scripts/ragged_attention_ab.py "$OUT/raggedab" 2>&1 | grep -v -i "warn\|Loading weights" | tail -12 ;;
    smallm)  # launch sweep of the tile kernel at 128 rows (grid blocks, split-K), graphs of 20 calls
      python3 scripts/tune_small_m.py "$OUT/smallm" 2>&1 | grep -v -i warn | tail -25 ;;
    m4096)  # the same sweep at 4096 rows (BLOCK_M 64 / 128, 4 or 8 warps, 3-6 stages), 128x64 tiles
      python3 scripts/tune_small_m.py "$OUT/m4096" --m 4096 2>&1 | grep -v -i warn | tail -12 ;;
    ws)  # the warp-specialised Gluon tile kernel: every launch form against the reference (under timeout: a protocol
         # bug hangs), the kernel A/B against the grid kernel and cuBLAS, and the 50% encoder with it from 8192 / 4096 rows
      mkdir -p "$OUT/ws"
      timeout 240 python3 scripts/ws_ab.py "$OUT/ws" check > "$OUT/ws/ws_check.log" 2>&1; echo "check rc=$?"; tail -1 "$OUT/ws/ws_check.log"
      python3 scripts/ws_ab.py "$OUT/ws" time 2>&1 | tail -22
      python3 scripts/ws_engine_ab.py "$OUT/ws" 2>&1 | grep -v -i "warn\|Loading" | tail -4 ;;
    wsprobe)  # does this Triton's automatic warp specialisation run on the GPU (a control, then three minimal
              # warp-specialised kernels; 30 s each)
      python3 scripts/ws_probe.py "$OUT/wsprobe" 2>&1 | grep "^{" ;;
    torchparity)  # every nn.TransformerEncoder configuration through the kernels vs PyTorch's own fp16/bf16 run
      python3 scripts/torch_encoder_parity.py "$OUT/torchparity" 2>&1 | grep -v -i warn | tail -40 ;;
    accuracy)  # 50% tiles on MiniLM / STS-B: longer recipes, the larger distillation corpus, RGL and ADMM
      bash scripts/accuracy_gpu.sh 2>&1 | tail -40 ;;
    smallbatch)  # same-run A/B of the small-batch path (cuBLAS vs etformer kernels on dense weights vs tiles), sweep
      python3 scripts/small_batch_ab.py "$OUT/smallbatch" 2>&1 | grep -v -i warn | tail -45 ;;
    fusedffn)  # same-run A/B of the fused FFN block at small batch, and its launch sweep
      python3 scripts/small_batch_ab.py "$OUT/fusedffn" --ffn 2>&1 | grep -v -i warn | tail -45 ;;
    deep)  # the small-batch path's dense-weight block and launch over deeper pipelines, 12-layer chain
      python3 scripts/small_batch_sweep.py "$OUT/deep" --deep 2>&1 | grep -v -i warn | tail -60 ;;
    layer)  # same-run A/B of one persistent launch a layer against the seven-launch kernel path and cuBLAS, sweep
      python3 scripts/small_batch_ab.py "$OUT/layer" --layer 2>&1 | grep -v -i warn | tail -80 ;;
    latency)  # same-run A/Bs of the small-batch path's add+LayerNorm and attention block rows, per-kernel profile; tile-kernel bias
      python3 scripts/small_latency_ab.py "$OUT/latency" 2>&1 | grep -v -i warn | tail -20
      python3 scripts/small_latency_ab.py "$OUT/latency" --bias 2>&1 | grep -v -i warn | tail -8 ;;
    attnproj)  # attention fused with the O projection: sweep and A/B; graph row rounding by length; launch floor
      python3 scripts/attn_proj_ab.py "$OUT/attnproj" 2>&1 | grep -v -i warn | tail -60 ;;
    flat)  # the persistent flattened tile kernel against the grid kernel and cuBLAS, launch sweep (FLAT_LAUNCH)
      python3 scripts/flat_ab.py "$OUT/flat" 2>&1 | grep -v -i warn | tail -70 ;;
    flattests)  # the tile-kernel tests alone (the persistent kernel among them), on the GPU
      timeout 300 python3 -m pytest -q -x tests/test_kernels.py -k "tile_linear or flat" 2>&1 | tail -3 ;;
    reorder)  # the pruned-V reordering against full-width V (V rows at 50%, 25%, 75%), then the narrow-V probe
      python3 scripts/reorder_ab.py "$OUT/reorder" 2>&1 | grep -v -i warn | tail -25
      for a in "16 128 8 16" "16 128 8 64" "32 128 8 16" "32 512 8 16" "48 128 8 16"; do
        timeout 60 python3 scripts/narrow_v_probe.py $a 2>&1 | grep "^DV="
      done | tee "$OUT/reorder/narrow_v_probe.log" ;;
    sparsemin)  # dense copy against tiles for pruned matrices from 512 to 8192 tokens (SPARSE_MIN_TOKENS[_LOW])
      python3 scripts/sparse_min_tokens_ab.py "$OUT/sparsemin" 2>&1 | grep -v -i warn | tail -20 ;;
    varlenerr)  # relative error of padded batches against HF fp32 with one engine switch flipped at a time
      python3 scripts/varlen_error_probe.py "$OUT/varlenerr" 2>&1 | grep -v -i warn | tail -100 ;;
    parity)  # engine vs HF on GLUE dev, fp16 and bf16
      python3 scripts/gpu_parity.py "$OUT/parity" 2>&1 | grep -v "Loading weights" | tail -12 ;;
    tune)  # launch sweeps of the tile kernel (TUNED_TMA) and the wide-head attention
      python3 scripts/tune.py "$OUT" --no-attention 2>&1 | tail -60
      python3 scripts/tune_attention_wide.py "$OUT" 2>&1 | tail -5 ;;
    probe)  # BERT-base at B=1, 32 x S=128, 512 with sparse matrices on tiles (the SPARSE_MIN_TOKENS measurement, at 51ee834)
      python3 - <<'PY' 2>&1 | grep -v "Loading weights" | tail -40
import os
from etformer.bench.run import run_bench, write_reports
res = run_bench(models=("bert-base",), batches=(1, 32), seqs=(128, 512), varlens=(False, True), sparsities=(0.5, 0.7),
                peers=("hf_graph", "cublas_sdpa_graph"), max_tokens=16384, variants=("dense", "tile"))
write_reports(res, os.environ["OUT"] + "/probe", "bash scripts/bench_h200.sh probe")
PY
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
