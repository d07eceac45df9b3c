"""Launch sweep of the fused add+LayerNorm on the H200: rows a program and warps.

    python3 scripts/tune_layernorm.py OUT_DIR

1. add_layernorm(x, residual) at N = 768, fp16, M from 128 to 65536 rows, and the reduction of 3 fp32 split-K
   partial sums at 128 rows; every launch (rows a program, warps) timed as graphs of 20 back-to-back calls with PDL
   off, its output checked against the fp32 reference, beside torch's layer_norm(x + r).
2. The whole BERT-base-shaped encoder (50% tiles, 128x64) at 32x128 and 128x128 with LN_ROWS 1, 2 and 4 above
   LN_ROWS_MIN_M rows: GPU time of the graphed forward in alternating rounds, and the largest output difference.
Writes tune_layernorm.json.
"""
import copy
import importlib
import os
import sys

import torch
import torch.nn.functional as F

from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, graphed_forward, time_cuda
from etformer.engine import optimize
from etformer.kernels import _common
from etformer.pruning import PruningPlan, apply_plan
from etformer.sparse.tiles import atomic_write_json

LN = importlib.import_module("etformer.kernels.layernorm")
LAUNCHES = [(1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)]


def t20(fn):
    return round(time_cuda(fn, graph=True, per_graph=20, min_ms=30)["median_us"], 2)


def kernel_rows():
    rows, bad = [], []
    N = 768
    g = torch.rand(N, device="cuda", dtype=torch.float16) + 0.5
    beta = torch.randn(N, device="cuda", dtype=torch.float16)
    for M, split in ((128, 0), (128, 3), (1024, 0), (4096, 0), (16384, 0), (65536, 0)):
        r = torch.randn(M, N, device="cuda", dtype=torch.float16)
        if split:
            x = torch.randn(split, M, N, device="cuda", dtype=torch.float32)
            xb = torch.randn(N, device="cuda", dtype=torch.float16)
            h = x.sum(0) + xb.float() + r.float()
        else:
            x, xb = torch.randn(M, N, device="cuda", dtype=torch.float16), None
            h = x.float() + r.float()
        ref = F.layer_norm(h, (N,), g.float(), beta.float(), 1e-12)
        row = {"M": M, "split": split, "torch_us": None if split else t20(lambda: F.layer_norm(x + r, (N,), g, beta,
                                                                                                 1e-12))}
        for launch in LAUNCHES:
            y = LN.add_layernorm(x, r, g, beta, 1e-12, x_bias=xb, _launch=launch)
            err = float((y.float() - ref).abs().max())
            if not err < 2e-2:
                bad.append((M, split, launch, err))
            row[f"{launch[0]}x{launch[1]}"] = t20(lambda: LN.add_layernorm(x, r, g, beta, 1e-12, x_bias=xb,
                                                                           _launch=launch))
        print(row, flush=True)
        rows.append(row)
    return rows, bad


def engine_rows():
    base = model_shape("bert-base").cuda()
    plan = PruningPlan.uniform("tile", 0.5, (128, 64))
    enc = optimize(apply_plan(copy.deepcopy(base), plan), plan, dtype=torch.float16, device="cuda")
    enc.check_finite = False
    rows = []
    saved = LN.LN_ROWS
    try:
        for B, S in ((32, 128), (128, 128)):
            ids, mask = make_inputs(B, S, False, base.config.vocab_size)
            res, outs = {}, {}
            for _ in range(2):
                for n in (1, 2, 4):
                    LN.LN_ROWS = n
                    outs[n], us = graphed_forward(enc, ids, mask)
                    res.setdefault(str(n), []).append(round(us, 1))
            diff = max(float((outs[n] - outs[1]).abs().max()) for n in (2, 4))
            row = {"B": B, "S": S, "plan": "tile50", "gpu_us_by_ln_rows": res, "max_abs_diff": diff}
            print(row, flush=True)
            rows.append(row)
    finally:
        LN.LN_ROWS = saved
    return rows


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    _common.USE_PDL = False
    krows, bad = kernel_rows()
    _common.USE_PDL = True
    res = {"env": env_info(), "command": "python3 scripts/tune_layernorm.py OUT", "kernels": krows, "wrong": bad,
           "engine": engine_rows()}
    atomic_write_json(os.path.join(out_dir, "tune_layernorm.json"), res)
    if bad:
        print("WRONG:", bad)
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1])
