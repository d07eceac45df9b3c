"""Hardware counters of the tile kernel at 4096 rows (BERT-base matrices, 128x64 tiles), for Nsight Compute:

    ncu --nvtx --nvtx-include "profile/" --clock-control none --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
        --csv --page details python3 scripts/profile_tile_ncu.py > ncu.csv

Each case runs once to compile and warm up, then once inside the NVTX range "profile" (the launch ncu records), in the
order printed. Cases: QKV, FFN-in with and without its GELU, FFN-out (the narrow 64-row launch) and the output
projection at half density with the shipped launches; QKV and FFN-in dense tiles; cuBLAS on the dense QKV and FFN-in
weights; the warp-specialised kernel on QKV at half density.
"""
import importlib

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.sparse.tiles import TileSparseWeight

T = importlib.import_module("etformer.kernels.tile_linear")
WS = importlib.import_module("etformer.kernels.tile_linear_ws")
C = importlib.import_module("etformer.kernels._common")
TILE = (128, 64)
M = 4096


def cases():
    out = []
    for name, K, N, act in (("qkv", 768, 2304, None), ("ffn_in", 768, 3072, "gelu"), ("ffn_out", 3072, 768, None),
                            ("o", 768, 768, None)):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        b = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
        for d in (0.5, 1.0) if name in ("qkv", "ffn_in") else (0.5,):
            W = random_tile_weight(K, N, TILE, d, torch.float16, seed=M + N)
            w = TileSparseWeight.from_dense(W, TILE)
            out.append((f"tile {name} d={d}" + (" gelu" if act else ""),
                        (lambda x=x, w=w, b=b, act=act: T.tile_linear(x, w, b, activation=act))))
            if act:
                out.append((f"tile {name} d={d} no activation", (lambda x=x, w=w, b=b: T.tile_linear(x, w, b))))
            if d == 1.0:
                out.append((f"cublas {name} dense", (lambda x=x, W=W, b=b: F.linear(x, W, b))))
            if name == "qkv" and d == 0.5:
                out.append((f"ws {name} d={d}", (lambda x=x, w=w, b=b: WS.tile_linear_ws(x, w, b))))
    return out


def main():
    C.USE_PDL = False  # as the kernels bench times them
    todo = cases()
    for _, fn in todo:
        fn()
    torch.cuda.synchronize()
    for i, (name, fn) in enumerate(todo):
        print(f"{i}: {name}", flush=True)
        torch.cuda.nvtx.range_push("profile")
        fn()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
