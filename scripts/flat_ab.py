"""The persistent flattened tile kernel against the grid kernel and cuBLAS, side by side in one process.

    python3 scripts/flat_ab.py OUT_DIR [--quick]

BERT-base shapes (QKV 2304x768, FFN-in 3072x768, FFN-out 768x3072), fp16, M in {4096, 16384}, tiles 128x64 and 64x64,
densities 1, 0.5 (balanced and not) and 0.25. For each case: cuBLAS on the dense matrix, the grid kernel with its
tabled launch, and the persistent kernel over a sweep of (BLOCK_M, num_warps, num_stages, programs per SM); every
timing is the median of CUDA-graph replays, and every output is checked against an fp32 F.linear. Writes flat_ab.json
with each case's timings and the best persistent launch per (tile, M bucket) by geometric-mean speed-up over the grid
kernel.
"""
import importlib
import math
import os
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import SHAPES, random_tile_weight
from etformer.bench.timing import env_info, time_cuda
from etformer.sparse.tiles import TileSparseWeight, atomic_write_json

T = importlib.import_module("etformer.kernels.tile_linear")

CONFIGS = [(128, 4, 4), (128, 4, 5), (128, 4, 6), (128, 8, 4), (128, 8, 5), (128, 8, 6), (64, 4, 4), (64, 4, 6)]


def rel_err(y, ref):
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def main(out_dir, quick=False):
    os.makedirs(out_dir, exist_ok=True)
    Ms = (4096,) if quick else (4096, 16384)
    tiles = ((128, 64),) if quick else ((128, 64), (64, 64))
    cases = [(1.0, True), (0.5, True), (0.5, False), (0.25, True)]
    rows, failures = [], []
    for name, (K, N) in SHAPES.items():
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            Wd = torch.randn(N, K, device="cuda", dtype=torch.float16) / math.sqrt(K)
            cublas = time_cuda(lambda: F.linear(x, Wd), graph=True, min_ms=40)["median_us"]
            for tile in tiles:
                for d, balanced in cases:
                    W = random_tile_weight(K, N, tile, d, torch.float16, balanced=balanced)
                    w = TileSparseWeight.from_dense(W, tile)
                    ref = F.linear(x.float(), W.float())
                    grid_y = T.tile_linear(x, w, persistent=False)
                    grid = time_cuda(lambda: T.tile_linear(x, w, persistent=False), graph=True, min_ms=40)["median_us"]
                    row = {"matrix": name, "M": M, "K": K, "N": N, "tile": f"{tile[0]}x{tile[1]}", "density": d,
                           "balanced": balanced, "cublas_dense_us": cublas, "grid_us": grid,
                           "grid_err": rel_err(grid_y, ref), "flat": {}}
                    for cfg in CONFIGS:
                        for per_sm in (1, 2):
                            key = f"{cfg[0]}/{cfg[1]}/{cfg[2]}/x{per_sm}"
                            try:
                                y = T.tile_linear(x, w, persistent=True, _config=(*cfg, per_sm))
                                err = rel_err(y, ref)
                                us = time_cuda(lambda: T.tile_linear(x, w, persistent=True, _config=(*cfg, per_sm)),
                                               graph=True, min_ms=40)["median_us"]
                                row["flat"][key] = {"us": us, "err": err}
                                if not err < 1e-2:
                                    failures.append((name, M, tile, d, key, err))
                            except Exception as e:  # out of shared memory etc.: recorded
                                row["flat"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                    ok = {k: v["us"] for k, v in row["flat"].items() if "us" in v}
                    best = min(ok, key=ok.get) if ok else None
                    row["best_flat"] = best
                    rows.append(row)
                    print(f"{name:7s} M={M:5d} {tile} d={d:.2f}{'' if balanced else ' unbal'}: cuBLAS {cublas:7.1f} "
                          f"grid {grid:7.1f} (x{cublas / grid:.2f})  best flat {best} {ok.get(best, float('nan')):7.1f} "
                          f"(x{cublas / ok[best]:.2f} cuBLAS, x{grid / ok[best]:.2f} grid)" if best else
                          f"{name} {M} {tile} {d}: no persistent launch ran", flush=True)
    # best launch per (tile, M bucket): geometric mean of grid/flat over that bucket's cases
    summary = {}
    for tile in {r["tile"] for r in rows}:
        for M in Ms:
            sel = [r for r in rows if r["tile"] == tile and r["M"] == M]
            keys = set.intersection(*[{k for k, v in r["flat"].items() if "us" in v} for r in sel])
            gm = {k: math.exp(sum(math.log(r["grid_us"] / r["flat"][k]["us"]) for r in sel) / len(sel)) for k in keys}
            if gm:
                b = max(gm, key=gm.get)
                summary[f"{tile}@{M}"] = {"best": b, "geomean_vs_grid": gm[b], "all": gm}
                print(f"{tile} M={M}: best persistent launch {b}, geometric-mean speed-up over the grid kernel "
                      f"{gm[b]:.3f}", flush=True)
    atomic_write_json(os.path.join(out_dir, "flat_ab.json"),
                      {"env": env_info(), "command": "python3 scripts/flat_ab.py " + " ".join(sys.argv[1:]),
                       "rows": rows, "summary": summary, "failures": failures})
    if failures:
        print("FAILED correctness:", failures)
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1], quick="--quick" in sys.argv[2:])
