"""The warp-specialised Hopper tile kernel (kernels/tile_linear_ws.py) on the H200: correctness, then a same-run A/B.

    python3 scripts/ws_ab.py OUTDIR check   # every launch form against the fp32 reference (run under `timeout`)
    python3 scripts/ws_ab.py OUTDIR time    # BERT-base matrices: cuBLAS, tile_linear, the WS kernel at each launch

check: awkward row counts (1, 77, 300, 4096), a block-row with no kept tile, densities 0.25 / 0.5 / 1, bias, GELU,
ReLU, residual, a column slice of a wider output, fp16 and bf16, every launch form in CONFIGS (bf16: two of them). Prints one JSON line a
case and exits 1 on any failure.
time: QKV, O, FFN-in (GELU) and FFN-out with their bias, 128x64 tiles, M = 4096 and 16384, densities 1, 0.5
(balanced and random block-rows) and 0.25, graphs of 20 calls (kernels without PDL): cuBLAS on the dense weight
(+ torch's GELU), tile_linear's default launch, the WS kernel at each of CONFIGS. Every output checked. Writes
ws_ab.json.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.bench.timing import env_info
from etformer.kernels.tile_linear import tile_linear
from etformer.kernels import tile_linear_ws as WS
from etformer.sparse.tiles import TileSparseWeight, atomic_write_json
from gelu_epilogue_ab import rel, t20  # scripts/

TILE = (128, 64)
SHAPES = {"qkv": (768, 2304, None), "o": (768, 768, None), "ffn_in": (768, 3072, "gelu"), "ffn_out": (3072, 768, None)}
# (BLOCK_M, STAGES, CONSUMERS, programs per SM[, tile_linear_ws.WS_AHEAD]); the environment's WS_AHEAD_ALT adds the
# two-consumer launches again with that WS_AHEAD.
CONFIGS = ((128, 2, 1, 2), (128, 4, 1, 1), (128, 3, 2, 1), (128, 4, 2, 1), (128, 5, 2, 1), (64, 5, 2, 1))
if os.environ.get("WS_AHEAD_ALT"):
    CONFIGS += tuple(c + (int(os.environ["WS_AHEAD_ALT"]),) for c in CONFIGS if c[2] == 2 and c[0] == 128)


def ws(x, w, b, act, res, cfg, **kw):
    """tile_linear_ws at launch cfg (a fifth entry: its WS_AHEAD)."""
    WS.WS_AHEAD = cfg[4] if len(cfg) > 4 else 0
    return WS.tile_linear_ws(x, w, b, activation=act, residual=res, config=cfg[:4], **kw)


def ref_of(x, W, b, act, res=None):
    y = x.float() @ W.float().t()
    if b is not None:
        y = y + b.float()
    y = F.gelu(y) if act == "gelu" else (torch.relu(y) if act == "relu" else y)
    return y if res is None else y + res.float()


def time_forms(row, forms, ref, bad, what):
    """Each form's output checked against ref (relative error under 1e-2, else a line in bad) and timed into
    row[key + "_us"]."""
    for key, fn in forms.items():
        e = rel(fn(), ref)
        if not e < 1e-2:
            bad.append(f"{what} {key}: {e:.2e}")
        row[key + "_us"] = t20(fn)


def matrix_case(x, b, act, name, K, N, M, d, **weight_kw):
    """One timed case's weight (a random TileSparseWeight of density d), fp32 reference and row, with cuBLAS's time
    (F.linear on the dense weight, + GELU) already in it. weight_kw goes to random_tile_weight and into the row."""
    W = random_tile_weight(K, N, TILE, d, torch.float16, seed=M, **weight_kw)
    w = TileSparseWeight.from_dense(W, TILE)
    row = {"matrix": name, "M": M, "density": round(w.density, 4), **weight_kw}
    row["cublas_us"] = t20((lambda: F.gelu(F.linear(x, W, b))) if act else (lambda: F.linear(x, W, b)))
    return w, ref_of(x, W, b, act), row


def fastest(row, prefix):
    """The fastest timed form whose name starts with prefix: (its name without the prefix, its µs)."""
    times = {k: v for k, v in row.items() if k.startswith(prefix) and k.endswith("_us")}
    best = min(times, key=times.get)
    return best[len(prefix):-3], times[best]


def geomean_ratio(rows, base, key, M):
    """Geometric mean over the rows at M rows of row[base] / row[key]."""
    sel = [r for r in rows if r["M"] == M]
    return round(math.exp(sum(math.log(r[base] / r[key]) for r in sel) / len(sel)), 3)


def check_case(K, N, d, M, dtype):
    """The inputs of one correctness case: a random weight of density d whose block-row 0 keeps no tile (dense and
    as a TileSparseWeight), X [M, K], a bias and a residual [M, N]."""
    W = random_tile_weight(K, N, TILE, d, dtype, balanced=False, seed=M + N)
    W[:TILE[0]] = 0  # block-row 0 keeps no tile
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) * 0.1
    return W, TileSparseWeight.from_dense(W, TILE), x, b, torch.randn(M, N, device="cuda", dtype=dtype)


def check():
    bad, n = [], 0
    for dtype in (torch.float16, torch.bfloat16):
        for M in (1, 77, 300, 4096):
            for (K, N), d in (((768, 2304), 0.5), ((3072, 768), 0.25), ((768, 768), 1.0), ((256, 384), 0.5)):
                W, w, x, b, r = check_case(K, N, d, M, dtype)
                for cfg in (CONFIGS if dtype == torch.float16 else CONFIGS[:1] + CONFIGS[3:4]):
                    for act, res, slice_ in ((None, None, False), ("gelu", None, False), ("relu", r, False),
                                             (None, r, True)):
                        if slice_:
                            wide = torch.zeros(M, N + 2 * 64, device="cuda", dtype=dtype)
                            ws(x, w, b, act, res, cfg, out=wide, out_col=64)
                            y = wide[:, 64:64 + N]
                            outside = float(wide[:, :64].abs().max() + wide[:, 64 + N:].abs().max())
                        else:
                            y = ws(x, w, b, act, res, cfg)
                            outside = 0.0
                        torch.cuda.synchronize()
                        e = rel(y, ref_of(x, W, b, act, res))
                        n += 1
                        ok = e < 1e-2 and outside == 0.0
                        line = {"dtype": str(dtype)[6:], "M": M, "K": K, "N": N, "density": d, "config": cfg,
                                "act": act, "residual": res is not None, "slice": slice_, "rel_err": e, "ok": ok}
                        if not ok:
                            bad.append(line)
                            print(json.dumps(line), flush=True)
    print(json.dumps({"cases": n, "failed": len(bad)}), flush=True)
    return not bad


def time_all(outdir):
    rows, bad = [], []
    for name, (K, N, act) in SHAPES.items():
        for M in (4096, 16384):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            b = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
            for d, balanced in ((1.0, True), (0.5, True), (0.5, False), (0.25, True)):
                w, ref, row = matrix_case(x, b, act, name, K, N, M, d, balanced=balanced)
                forms = {"tile_linear": lambda: tile_linear(x, w, b, activation=act)}
                for cfg in CONFIGS:
                    forms["ws_" + "_".join(map(str, cfg))] = (lambda c: lambda: ws(x, w, b, act, None, c))(cfg)
                time_forms(row, forms, ref, bad, f"{name} M={M} d={d}")
                row["ws_best"], best_us = fastest(row, "ws_")
                row["ws_best_vs_tile_linear"] = round(row["tile_linear_us"] / best_us, 3)
                row["tile_linear_vs_cublas"] = round(row["cublas_us"] / row["tile_linear_us"], 3)
                row["ws_best_vs_cublas"] = round(row["cublas_us"] / best_us, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for cfg in CONFIGS:
        key = "ws_" + "_".join(map(str, cfg)) + "_us"
        for M in (4096, 16384):
            summary[f"{key[:-3]} M={M} geomean vs tile_linear"] = geomean_ratio(rows, "tile_linear_us", key, M)
    out = {"env": env_info(), "command": "python3 scripts/ws_ab.py OUTDIR time", "rows": rows, "summary": summary,
           "failures": bad}
    atomic_write_json(f"{outdir}/ws_ab.json", out)
    print(json.dumps(summary, indent=1))
    print("failures:", bad)


if __name__ == "__main__":
    outdir, part = sys.argv[1], sys.argv[2]
    if part == "check":
        sys.exit(0 if check() else 1)
    time_all(outdir)
