"""Several rows a program for the add+LayerNorm kernel (layernorm.MULTI_ROW_LAUNCH): same-run A/Bs on the H200.

    python3 scripts/ln_rows_ab.py OUT_DIR [--parts k,e,m] [--launch ROWS,WARPS]

k. add_layernorm(x, residual) alone, fp16, N = 768 (BERT-base) and 384 (MiniLM), M = 128 ... 65536 rows, at each
   launch (ROWS, num_warps) in LAUNCHES; graphs of 20 calls cycling over enough input sets that they do not stay in
   L2 (as in the encoder, where each call reads a fresh GEMM output); every output compared with one row a program.
k also times the fp32 partial-sum form (split 1, with the linear's bias), as the deferred path calls it.
e. The BERT-base-shaped encoder (dense and 50% tiles, random weights, finite check off) at 1x128 ... 32x512: GPU time
   of the graphed forward with one row a program everywhere and with part k's best launch from each of MIN_ROWS rows,
   alternating, two rounds (tile_sub_ab.engine_ab); outputs compared.
m. The same with all-MiniLM-L6-v2 (d = 384), dense and 50% tiles.
Writes ln_rows_ab.json.
"""
import argparse
import importlib
import math
import os
import sys

import torch

from etformer.bench.timing import env_info, time_cuda
from etformer.kernels import add_layernorm
from etformer.sparse.tiles import atomic_write_json
from tile_sub_ab import bert_encoders, engine_ab  # scripts/

LN = importlib.import_module("etformer.kernels.layernorm")
LAUNCHES = ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8))
MS = (128, 1024, 4096, 16384, 65536)
MIN_ROWS = (1024, 4096)
SHAPES = ((1, 128), (8, 128), (32, 128), (128, 128), (8, 512), (32, 512))
L2_BYTES = 60 << 20


def time_launch(launch, M, N, partial):
    """(µs a call, outputs of the first input set) of add_layernorm under one launch, cycling over input sets."""
    per = M * N * (4 if partial else 2) * 3
    sets = max(1, min(20, math.ceil(3 * L2_BYTES / per)))
    g = torch.Generator(device="cuda").manual_seed(M + N)
    dt = torch.float32 if partial else torch.float16
    xs = [torch.randn((1, M, N) if partial else (M, N), device="cuda", dtype=dt, generator=g) for _ in range(sets)]
    rs = [torch.randn(M, N, device="cuda", dtype=torch.float16, generator=g) for _ in range(sets)]
    w = torch.rand(N, device="cuda", dtype=torch.float16, generator=g) + 0.5
    b = torch.randn(N, device="cuda", dtype=torch.float16, generator=g)
    xb = torch.randn(N, device="cuda", dtype=torch.float16, generator=g) if partial else None
    outs = [torch.empty(M, N, device="cuda", dtype=torch.float16) for _ in range(sets)]
    LN.MULTI_ROW_LAUNCH = ((1, *launch),)
    i = [0]

    def call():
        k = i[0] % sets
        i[0] += 1
        add_layernorm(xs[k], rs[k], w, b, 1e-12, out=outs[k], backend="triton", x_bias=xb)

    add_layernorm(xs[0], rs[0], w, b, 1e-12, out=outs[0], backend="triton", x_bias=xb)
    first = outs[0].clone()
    per_graph = 20 if sets == 1 else sets * max(1, 20 // sets)
    t = time_cuda(call, graph=True, per_graph=per_graph, min_ms=100)["median_us"]
    return round(t, 2), first, sets


def part_k():
    rows = []
    for partial in (False, True):
        for N in (768, 384):
            for M in MS:
                row = {"M": M, "N": N, "form": "partial sums" if partial else "x + residual"}
                base = None
                for launch in LAUNCHES:
                    t, y, sets = time_launch(launch, M, N, partial)
                    key = f"rows{launch[0]}_w{launch[1]}"
                    row[f"{key}_us"] = t
                    row["input_sets"] = sets
                    if base is None:
                        base = y
                    else:
                        row[f"{key}_max_abs_diff"] = (y.float() - base.float()).abs().max().item()
                bytes_ = M * N * ((4 if partial else 2) + 2 + 2)
                row["floor_us"] = round(bytes_ / 4.25e12 * 1e6, 2)
                rows.append(row)
                best = min((k for k in row if k.endswith("_us") and k.startswith("rows")), key=lambda k: row[k])
                print(f"k {row['form']} M={M} N={N}: " + ", ".join(f"{k[:-3]} {row[k]}" for k in row
                                                                   if k.endswith("_us") and k.startswith("rows"))
                      + f" | best {best} floor {row['floor_us']}", flush=True)
    return rows


def best_launch(rows):
    """The launch of best geometric mean over part k's rows of at least 4096 rows (N = 768)."""
    sel = [r for r in rows if r["M"] >= 4096 and r["N"] == 768]
    gm = {la: math.exp(sum(math.log(r[f"rows{la[0]}_w{la[1]}_us"]) for r in sel) / len(sel)) for la in LAUNCHES}
    return min(gm, key=gm.get), gm


def part_e(launch, model="bert-base"):
    encs = bert_encoders(model=model)
    forms = {"row": lambda: setattr(LN, "MULTI_ROW_LAUNCH", ())}
    for m in MIN_ROWS:
        forms[f"rows{launch[0]}_w{launch[1]}_from{m}"] = (lambda m=m: setattr(LN, "MULTI_ROW_LAUNCH",
                                                                               ((m, *launch),)))
    return engine_ab(f"ln {model}", encs, SHAPES, forms, 100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--parts", default="k,e,m")
    ap.add_argument("--launch", default=None, help="ROWS,WARPS for part e (default: part k's best)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    parts = a.parts.split(",")
    shipped = LN.MULTI_ROW_LAUNCH
    res = {"env": env_info(), "command": "python3 scripts/ln_rows_ab.py " + " ".join(sys.argv[1:])}
    la = tuple(map(int, a.launch.split(","))) if a.launch else None
    try:
        if "k" in parts:
            res["kernel"] = part_k()
            best, gm = best_launch(res["kernel"])
            res["best_launch"], res["geomean_us"] = best, {f"rows{k[0]}_w{k[1]}": round(v, 2) for k, v in gm.items()}
            print("best launch from 4096 rows:", best, res["geomean_us"], flush=True)
            la = la or best
        la = la or (2, 4)
        if "e" in parts:
            res["engine"] = part_e(la)
        if "m" in parts:
            res["engine_minilm"] = part_e(la, "minilm")
    finally:
        LN.MULTI_ROW_LAUNCH = shipped
        atomic_write_json(os.path.join(a.out, "ln_rows_ab.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
