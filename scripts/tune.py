"""Sweep launch parameters of the tile-sparse linear and attention kernels on the GPU; print the best per case.

    python3 scripts/tune.py OUTDIR [--no-attention] [--store-only] [--no-store] [--tiles 256x64,128x64] [--m 4096,16384]
The winners go into the TUNED table of etformer/kernels/tile_linear.py and _blocks() of attention.py by hand,
with the sweep's JSON committed beside the benchmark results.
"""
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.bench.timing import time_cuda
from etformer.kernels.attention import attention
from etformer.kernels.tile_linear import tile_linear
from etformer.sparse import TileSparseWeight
from etformer.sparse.tiles import atomic_write_json

def _opt(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


ATTN = "--no-attention" not in sys.argv
SWEEP = "--store-only" not in sys.argv
STORE = "--no-store" not in sys.argv
TILES = [tuple(int(v) for v in t.split("x")) for t in _opt("--tiles", "64x64,128x64,128x128").split(",")]
MS = [int(m) for m in _opt("--m", "128,4096,16384").split(",")]
out = {"linear": [], "attention": [], "splitk": []}


def save():
    atomic_write_json(sys.argv[1] + "/tune.json", out)


def sweep(x, w, M, tma):
    """Best (us, BLOCK_M, warps, stages). Pointer loads: only the tabled launch (the baseline). TMA: the compiler puts
    the col_idx load in the first pipeline stage, so the bulk copies get num_stages - 2 buffers: sweep deeper."""
    if not tma:
        t = time_cuda(lambda: tile_linear(x, w, tma=False, split_k=1), graph=True, min_ms=15)["median_us"]
        return (t, "table")
    best = None
    for bm in (64, 128, 256):
        if (M <= 128 and bm == 256) or (M > 128 and bm == 64):
            continue
        for warps in ((4,) if bm == 64 else (4, 8)):
            for stages in (4, 5, 6):
                try:
                    t = time_cuda(lambda: tile_linear(x, w, _config=(bm, warps, stages), tma=tma, split_k=1),
                                  graph=True, min_ms=15)["median_us"]
                except Exception:  # out of shared memory etc.
                    continue
                if best is None or t < best[0]:
                    best = (t, bm, warps, stages)
    return best


for tile in (TILES if SWEEP else ()):
    for M in MS:
        for (K, N) in ((768, 3072), (3072, 768), (768, 768)):
            if M == 128 and (K, N) == (768, 768):
                continue
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            Wd = torch.randn(N, K, device="cuda", dtype=torch.float16)
            dense = time_cuda(lambda: F.linear(x, Wd), graph=True, min_ms=30)["median_us"]
            for d in (1.0, 0.5, 0.25):
                w = TileSparseWeight.from_dense(random_tile_weight(K, N, tile, d, torch.float16), tile)
                for tma in (False, True):
                    best = sweep(x, w, M, tma)
                    row = {"tile": tile, "M": M, "K": K, "N": N, "density": d, "tma": tma, "best_us": best[0],
                           "config": best[1:], "cublas_us": dense, "x_cublas": dense / best[0]}
                    out["linear"].append(row)
                    save()
                    print(f"linear tile={tile} M={M} K={K} N={N} d={d} tma={tma}: {best[0]:.1f} us cfg={best[1:]} "
                          f"cuBLAS {dense:.1f} -> x{dense / best[0]:.2f}", flush=True)
                if M == 128:  # same-run A/B: split-K against the direct launch and cuBLAS
                    for tma in (False, True):
                        sk = time_cuda(lambda: tile_linear(x, w, tma=tma), graph=True, min_ms=30)["median_us"]
                        one = time_cuda(lambda: tile_linear(x, w, tma=tma, split_k=1), graph=True,
                                        min_ms=30)["median_us"]
                        out["splitk"].append({"tile": tile, "K": K, "N": N, "density": d, "tma": tma,
                                              "splitk_us": sk, "direct_us": one, "cublas_us": dense})
                        print(f"  M=128 tma={tma} split-K {sk:.1f} direct {one:.1f} cuBLAS {dense:.1f}", flush=True)

# same-run A/B: tensor-descriptor stores of Y against pointer stores, tabled config (the persistent-launch A/B that
# ran beside it is in benchmarks/results/h200/tune_persistent.json; the launch mode lost and was removed)
out["store"] = []
for tile in (((128, 64), (64, 64)) if STORE else ()):
    for M in (4096, 16384):
        for (K, N) in ((768, 3072), (3072, 768)):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            for d in (1.0, 0.5, 0.25):
                w = TileSparseWeight.from_dense(random_tile_weight(K, N, tile, d, torch.float16), tile)
                ts = {("tma" if st else "ptr"): time_cuda(lambda: tile_linear(x, w, tma_store=st), graph=True,
                                                          min_ms=20)["median_us"] for st in (False, True)}
                out["store"].append({"tile": tile, "M": M, "K": K, "N": N, "density": d, "us": ts})
                print(f"store tile={tile} M={M} K={K} N={N} d={d}: " + " ".join(f"{k}={t:.1f}" for k, t in ts.items()),
                      flush=True)
                save()

H, D = 12, 64
for S in ((128, 192, 256, 384, 512) if ATTN else ()):
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

save()
