"""The warp-specialised Gluon tile kernel with cooperative consumers (tile_linear_ws(coop=True): the two consumer
warpgroups share each item, one row block each, and each stage's tile) against its ping-pong form and the grid
kernel: same-run on the H200.

    python3 scripts/ws_coop_ab.py OUTDIR check   # each cooperative launch against fp32 math (run under `timeout`)
    python3 scripts/ws_coop_ab.py OUTDIR time    # BERT-base matrices, 4096 and 16384 rows

check: row counts 1, 77 (the second consumer's rows all past the end), 300 and 4096; densities 0.25, 0.5 and 1 with a
block-row keeping no tile; bias, GELU, residual, a column slice; fp16 and bf16. Exits 1 on any failure.
time: QKV, O, FFN-in (GELU) and FFN-out with their bias, 128x64 tiles at densities 1, 0.5 and 0.25, graphs of 20
calls (kernels without PDL): cuBLAS (+ torch's GELU), tile_linear's grid kernel, the ping-pong kernel (WS_DEFAULT) and
each of COOP. Every output checked. Writes ws_coop_ab.json.
"""
import json
import sys

import torch

from etformer.bench.timing import env_info
from etformer.kernels import _common as C
from etformer.kernels import tile_linear_ws as WS
from etformer.kernels.tile_linear import tile_linear
from etformer.sparse.tiles import atomic_write_json
from gelu_epilogue_ab import rel  # scripts/
from ws_ab import SHAPES, check_case, fastest, geomean_ratio, matrix_case, ref_of, time_forms  # scripts/

# (BLOCK_M, STAGES, CONSUMERS, programs per SM): items of CONSUMERS x BLOCK_M rows
COOP = ((128, 3, 2, 1), (64, 5, 2, 1), (64, 4, 2, 1))


def check():
    bad, n = [], 0
    for dtype in (torch.float16, torch.bfloat16):
        for M in (1, 77, 300, 4096):
            for (K, N), d in (((768, 2304), 0.5), ((3072, 768), 0.25), ((768, 768), 1.0)):
                W, w, x, b, r = check_case(K, N, d, M, dtype)
                for cfg in COOP if dtype == torch.float16 else COOP[:1]:
                    for act, res, slice_ in ((None, None, False), ("gelu", None, False), (None, r, True)):
                        if slice_:
                            wide = torch.zeros(M, N + 128, device="cuda", dtype=dtype)
                            WS.tile_linear_ws(x, w, b, activation=act, residual=res, out=wide, out_col=64,
                                              config=cfg, coop=True)
                            y = wide[:, 64:64 + N]
                            outside = float(wide[:, :64].abs().max() + wide[:, 64 + N:].abs().max())
                        else:
                            y = WS.tile_linear_ws(x, w, b, activation=act, residual=res, config=cfg, coop=True)
                            outside = 0.0
                        torch.cuda.synchronize()
                        e = rel(y, ref_of(x, W, b, act, res))
                        n += 1
                        line = {"dtype": str(dtype)[6:], "M": M, "K": K, "N": N, "density": d, "config": cfg,
                                "act": act, "residual": res is not None, "slice": slice_, "rel_err": e}
                        if not (e < 1e-2 and outside == 0.0):
                            bad.append(line)
                            print(json.dumps(line), flush=True)
    print(json.dumps({"cases": n, "failed": len(bad)}), flush=True)
    return not bad


def time_all(outdir):
    C.USE_PDL = False
    rows, bad = [], []
    for name, (K, N, act) in SHAPES.items():
        for M in (4096, 16384):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            b = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
            for d in (1.0, 0.5, 0.25):
                w, ref, row = matrix_case(x, b, act, name, K, N, M, d)
                forms = {"grid": lambda: tile_linear(x, w, b, activation=act),
                         "pingpong": lambda: WS.tile_linear_ws(x, w, b, activation=act)}
                for cfg in COOP:
                    forms["coop_" + "_".join(map(str, cfg))] = (
                        lambda c: lambda: WS.tile_linear_ws(x, w, b, activation=act, config=c, coop=True))(cfg)
                time_forms(row, forms, ref, bad, f"{name} M={M} d={d}")
                row["coop_best"], best_us = fastest(row, "coop_")
                row["coop_best_vs_grid"] = round(row["grid_us"] / best_us, 3)
                row["pingpong_vs_grid"] = round(row["grid_us"] / row["pingpong_us"], 3)
                row["coop_best_vs_cublas"] = round(row["cublas_us"] / best_us, 3)
                row["grid_vs_cublas"] = round(row["cublas_us"] / row["grid_us"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for key in ["pingpong"] + ["coop_" + "_".join(map(str, c)) for c in COOP]:
        for M in (4096, 16384):
            summary[f"{key} M={M} geomean vs grid"] = geomean_ratio(rows, "grid_us", key + "_us", M)
    out = {"env": env_info(), "command": "python3 scripts/ws_coop_ab.py OUTDIR time", "rows": rows,
           "summary": summary, "failures": bad}
    atomic_write_json(f"{outdir}/ws_coop_ab.json", out)
    print(json.dumps(summary, indent=1))
    print("failures:", bad)
    return not bad


if __name__ == "__main__":
    outdir, part = sys.argv[1], sys.argv[2]
    sys.exit(0 if (check() if part == "check" else time_all(outdir)) else 1)
