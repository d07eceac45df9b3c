"""Sweep launch parameters of the tile-sparse linear and attention kernels on the GPU; print the best per case.

    python3 scripts/tune.py OUTDIR
The winners go into the TUNED table of etformer/kernels/tile_linear.py and _blocks() of attention.py by hand,
with the sweep's JSON committed beside the benchmark results.
"""
import json
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.bench.timing import time_cuda
from etformer.kernels.attention import attention
from etformer.kernels.tile_linear import tile_linear
from etformer.sparse import TileSparseWeight

out = {"linear": [], "attention": []}
for tile in [(32, 32), (64, 64), (128, 64), (64, 128), (128, 128)]:
    for M in (128, 4096, 16384):
        for (K, N) in ((768, 3072), (3072, 768)):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            Wd = torch.randn(N, K, device="cuda", dtype=torch.float16)
            dense = time_cuda(lambda: F.linear(x, Wd), graph=True, min_ms=40)["median_us"]
            for d in (1.0, 0.5):
                w = TileSparseWeight.from_dense(random_tile_weight(K, N, tile, d, torch.float16), tile)
                best = None
                for bm in (64, 128, 256):
                    if M <= 128 and bm == 256:
                        continue
                    for warps in ((4,) if bm == 64 else (4, 8) if bm == 128 else (8,)):
                        for stages in (2, 3, 4):
                            try:
                                t = time_cuda(lambda: tile_linear(x, w, _config=(bm, warps, stages)), graph=True,
                                              min_ms=40)["median_us"]
                            except Exception:  # out of shared memory etc.
                                continue
                            if best is None or t < best[0]:
                                best = (t, bm, warps, stages)
                row = {"tile": tile, "M": M, "K": K, "N": N, "density": d, "best_us": best[0],
                       "config": best[1:], "cublas_us": dense, "x_cublas": dense / best[0]}
                out["linear"].append(row)
                print(f"linear tile={tile} M={M} K={K} N={N} d={d}: {best[0]:.1f} us cfg={best[1:]} "
                      f"cuBLAS {dense:.1f} -> x{dense / best[0]:.2f}", flush=True)

H, D = 12, 64
for S in (128, 192, 256, 384, 512):
    B = 32
    lens = [S] * B
    T = B * S
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    qkv = torch.randn(T, 3 * H * D, device="cuda", dtype=torch.float16)
    o = torch.empty(T, H * D, device="cuda", dtype=torch.float16)
    res = []
    cands = []
    if S <= 256:
        bn = 1 << (S - 1).bit_length()
        cands += [(True, bm, bn, w, 1) for bm in (32, 64, 128) for w in (4, 8)]
    cands += [(False, bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
    for c in cands:
        try:
            t = time_cuda(lambda: attention(qkv, cu, S, H, D, out=o, _config=c), graph=True, min_ms=40)["median_us"]
        except Exception:
            continue
        res.append((t, c))
    res.sort(key=lambda r: r[0])
    one = [r for r in res if r[1][0]]
    onl = [r for r in res if not r[1][0]]
    out["attention"].append({"S": S, "B": B, "best": res[0], "best_one_pass": one[0] if one else None,
                             "best_online": onl[0] if onl else None})
    print(f"attention S={S}: best {res[0]}  one-pass {one[0] if one else None}  online {onl[0] if onl else None}", flush=True)

with open(sys.argv[1] + "/tune.json", "w") as f:
    json.dump(out, f, indent=1)
