"""The warp-specialised tile loop against the plain grid kernel and cuBLAS, side by side in one process.

    python3 scripts/ws_ab.py OUT_DIR [--tiles 128x64,64x64]

BERT-base shapes (QKV 2304x768, FFN-in 3072x768, FFN-out 768x3072), fp16, M in {4096, 16384}, densities 1, 0.5
(balanced and not) and 0.25. For each case: cuBLAS on the dense matrix; the grid kernel with its tabled launch, with
the descriptor store (its default for 128-wide tiles) and with pointer stores (what the warp-specialised form must
use, so the store's share is seen apart); and tile_linear(warp_specialize=True) over a sweep of (BLOCK_M, 4 warps,
num_stages). Every timing is the median of CUDA-graph replays; every output is checked against an fp32 F.linear.
Writes ws_ab.json with each case's timings and, per (tile, M bucket), the warp-specialised launch with the best
geometric-mean speed-up over the grid kernel.
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

WS_CONFIGS = [(bm, 4, st) for bm in (128, 64) for st in (2, 3, 4, 5)]
GATE = 1e-2


def main(out_dir, tiles):
    os.makedirs(out_dir, exist_ok=True)
    if not T.ws_available():
        raise SystemExit(f"Triton {T.triton.__version__} does not build the warp-specialised loop")
    Ms = (4096, 16384)
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
                    row = {"matrix": name, "M": M, "K": K, "N": N, "tile": f"{tile[0]}x{tile[1]}", "density": d,
                           "balanced": balanced, "cublas_dense_us": cublas, "ws": {}}
                    variants = {"grid": dict(warp_specialize=False),
                                "grid_pointer_store": dict(warp_specialize=False, tma_store=False)}
                    variants.update({f"ws {c[0]}/{c[1]}/{c[2]}": dict(warp_specialize=True, _config=c)
                                     for c in WS_CONFIGS})
                    for key, kw in variants.items():
                        try:
                            y = T.tile_linear(x, w, **kw)
                            torch.cuda.synchronize()
                            err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)) if d > 0 else \
                                float(y.float().abs().max())
                            us = time_cuda(lambda: T.tile_linear(x, w, **kw), graph=True, min_ms=40)["median_us"]
                            res = {"us": us, "err": err}
                            if not err < GATE:
                                failures.append((name, M, tile, d, key, err))
                        except Exception as e:  # out of shared memory etc.: recorded
                            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                        if key.startswith("ws "):
                            row["ws"][key[3:]] = res
                        else:
                            row[key] = res
                    ok = {k: v["us"] for k, v in row["ws"].items() if "us" in v}
                    best = min(ok, key=ok.get) if ok else None
                    row["best_ws"] = best
                    rows.append(row)
                    g, gp = row["grid"].get("us", float("nan")), row["grid_pointer_store"].get("us", float("nan"))
                    print(f"{name:7s} M={M:5d} {tile} d={d:.2f}{'' if balanced else ' unbal'}: cuBLAS {cublas:7.1f}  "
                          f"grid {g:7.1f} (x{cublas / g:.2f})  grid+ptr store {gp:7.1f}  best ws {best} "
                          f"{ok.get(best, float('nan')):7.1f} (x{cublas / ok[best]:.2f} cuBLAS, x{g / ok[best]:.2f} grid)"
                          if best else f"{name} {M} {tile} {d}: no warp-specialised launch ran", flush=True)
    summary = {}
    for tile in sorted({r["tile"] for r in rows}):
        for M in Ms:
            sel = [r for r in rows if r["tile"] == tile and r["M"] == M and "us" in r["grid"]]
            keys = set.intersection(*[{k for k, v in r["ws"].items() if "us" in v} for r in sel]) if sel else set()
            gm = {k: math.exp(sum(math.log(r["grid"]["us"] / r["ws"][k]["us"]) for r in sel) / len(sel)) for k in keys}
            if gm:
                b = max(gm, key=gm.get)
                summary[f"{tile}@{M}"] = {"best": b, "geomean_vs_grid": gm[b], "all": gm}
                print(f"{tile} M={M}: best warp-specialised launch {b}, geometric-mean speed-up over the grid "
                      f"kernel {gm[b]:.3f}", flush=True)
    atomic_write_json(os.path.join(out_dir, "ws_ab.json"),
                      {"env": env_info(), "command": "python3 scripts/ws_ab.py " + " ".join(sys.argv[1:]),
                       "rows": rows, "summary": summary, "failures": failures})
    if failures:
        print("FAILED correctness:", failures)
        raise SystemExit(1)


if __name__ == "__main__":
    args = sys.argv[1:]
    tiles = ((128, 64),)
    if "--tiles" in args:
        spec = args[args.index("--tiles") + 1]
        tiles = tuple(tuple(int(v) for v in t.split("x")) for t in spec.split(","))
    main(args[0], tiles)
