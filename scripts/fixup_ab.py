"""Two programs per work item in the grid tile kernel (tile_linear(fixup=True), FIXUP_MODE / FIXUP_AUTO): same-run
A/Bs on the H200.

    python3 scripts/fixup_ab.py OUTDIR [--parts k,e] [--shapes 32x128,8x512] [--sparsities 0.5,0.7]

k. Kernels: BERT-base's four matrices with their bias (FFN-in with GELU), 128x64 tiles at densities 1, 0.5 and 0.25
   (balanced random), 4096, 8192 and 16384 rows, graphs of 20 calls (kernels without PDL): cuBLAS on the dense
   weight, tile_linear's shipped launch, and each of LAUNCHES with and without the fixup; the output projection and
   FFN-out also in the engine's deferred-LayerNorm form (residual normalised on load, row moments out) up to 8192
   rows. Every output checked against fp32 math, and the fixup's output for bit-equality between two calls.
e. Engine, BERT-base-shaped (random weights) pruned to 50% and 70% tiles: GPU time of the graphed forward with the
   fixup off and under each rule of RULES (FIXUP_MODE "auto"), alternating rounds; outputs compared.
Writes fixup_ab.json.
"""
import copy
import importlib
import json
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.bench.run import model_shape
from etformer.bench.timing import env_info
from etformer.engine import optimize
from etformer.kernels import DeferredLN
from etformer.pruning import PruningPlan, apply_plan
from etformer.pruning.plan import DEFAULT_TILE
from etformer.sparse.tiles import TileSparseWeight, atomic_write_json
from gelu_epilogue_ab import rel, t20  # scripts/
from tile_sub_ab import engine_ab  # scripts/

T = importlib.import_module("etformer.kernels.tile_linear")
TILE = (128, 64)
D = 768
EPS = 1e-12
MATRICES = (("qkv", D, 2304, None), ("o", D, D, None), ("ffn_in", D, 3072, "gelu"), ("ffn_out", 3072, D, None))
LAUNCHES = ((128, 4, 4), (128, 8, 4), (128, 4, 3), (64, 4, 5))
# FIXUP_AUTO candidates for the engine: (up to rows, up to block-rows, launch)
RULES = {
    "narrow4096_128x4x4": ((4096, 8, (128, 4, 4)),),
    "narrow8192_128x4x4": ((8192, 8, (128, 4, 4)),),
    "narrow4096_128x8x4": ((4096, 8, (128, 8, 4)),),
    "all8192_128x4x4": ((8192, 64, (128, 4, 4)),),
}


def _check(fn, ref, what, bad):
    y = fn()
    y = y[0] if isinstance(y, tuple) else y
    e = rel(y, ref)
    if not e < 1e-2:
        bad.append(f"{what}: relative error {e:.2e}")
    return e


def part_k(bad):
    rows = []
    g = (1 + 0.2 * torch.randn(D, device="cuda")).half()
    be = (0.1 * torch.randn(D, device="cuda")).half()
    for M in (4096, 8192, 16384):
        raw = (torch.randn(M, D, device="cuda") * 2 + torch.randn(M, 1, device="cuda")).half()
        n = DeferredLN(T.row_stats_reference(raw).contiguous(), D, EPS, g, be)
        ln = F.layer_norm(raw.float(), (D,), g.float(), be.float(), EPS)
        for name, K, N, act in MATRICES:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            b = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
            for d in (1.0, 0.5, 0.25):
                W = random_tile_weight(K, N, TILE, d, torch.float16, seed=M + K + N)
                w = TileSparseWeight.from_dense(W, TILE)
                base = x.float() @ W.float().t() + b.float()
                ref = F.gelu(base) if act else base
                forms = {"deferred": False} if name in ("o", "ffn_out") and M <= 8192 else {}
                for mode in ("plain", *forms):
                    dfr = mode == "deferred"
                    kw = dict(residual=raw, residual_norm=n, row_stats=True) if dfr else dict(activation=act)
                    want = base + ln if dfr else ref
                    row = {"matrix": name, "M": M, "density": round(w.density, 4), "epilogue": mode}
                    what = f"k {name} M={M} d={d} {mode}"
                    if not dfr:
                        cub = (lambda: F.gelu(F.linear(x, W, b))) if act else (lambda: F.linear(x, W, b))
                        row["cublas_us"] = t20(cub)
                    run = {"table": lambda: T.tile_linear(x, w, b, fixup=False, **kw),
                           "table_fixup": lambda: T.tile_linear(x, w, b, fixup=True, **kw)}
                    for cfg in LAUNCHES:
                        c = "_".join(map(str, cfg))
                        run[c] = (lambda cf: lambda: T.tile_linear(x, w, b, fixup=False, _config=cf, **kw))(cfg)
                        run[c + "_fixup"] = (lambda cf: lambda: T.tile_linear(x, w, b, fixup=True, _config=cf,
                                                                              **kw))(cfg)
                    for key, fn in run.items():
                        _check(fn, want, f"{what} {key}", bad)
                        row[key + "_us"] = t20(fn)
                    y1, y2 = run["table_fixup"](), run["table_fixup"]()
                    y1, y2 = (y1[0], y2[0]) if dfr else (y1, y2)
                    if not torch.equal(y1, y2):
                        bad.append(f"{what}: the fixup's output differs between two calls")
                    t = {k: v for k, v in row.items() if k.endswith("_us") and k != "cublas_us"}
                    row["best"] = min(t, key=t.get)[:-3]
                    row["best_fixup"] = min((k for k in t if "fixup" in k), key=t.get)[:-3]
                    row["best_plain"] = min((k for k in t if "fixup" not in k), key=t.get)[:-3]
                    row["fixup_gain"] = round(t[row["best_plain"] + "_us"] / t[row["best_fixup"] + "_us"], 3)
                    row["table_vs_best"] = round(t["table_us"] / t[row["best"] + "_us"], 3)
                    rows.append(row)
                    print("k", json.dumps(row), flush=True)
    left = [int(b.abs().sum()) for b in T._FIX_EAGER.values()]
    if any(left):
        bad.append(f"arrival counters left non-zero: {left}")
    return rows


def _models(sparsities):
    base = model_shape("bert-base").cuda()
    out = {}
    for s in sparsities:
        plan = PruningPlan.uniform("tile", s, DEFAULT_TILE)
        hf = apply_plan(copy.deepcopy(base), plan).eval()
        enc = optimize(hf, plan, dtype=torch.float16, device="cuda")
        enc.check_finite = False
        out[f"tile{int(s * 100)}"] = enc
    return out


def rule(entries):
    def put():
        T.FIXUP_MODE = "auto" if entries else "off"
        T.FIXUP_AUTO = entries or ()
    return put


SHIPPED = (T.FIXUP_MODE, T.FIXUP_AUTO)
SHAPES = ((32, 128), (8, 512), (64, 128), (16, 512))


def part_e(models, shapes=SHAPES):
    forms = {"off": rule(None), **{k: rule(v) for k, v in RULES.items()}}
    try:
        return engine_ab("fixup", models, shapes, forms, 100)
    finally:
        T.FIXUP_MODE, T.FIXUP_AUTO = SHIPPED


def main(out, parts, shapes=SHAPES, sparsities=(0.5, 0.7)):
    bad = []
    res = {"env": env_info(), "command": "python3 scripts/fixup_ab.py " + " ".join(sys.argv[1:]),
           "launches": LAUNCHES, "rules": RULES}
    if "k" in parts:
        res["kernels"] = part_k(bad)
        atomic_write_json(f"{out}/fixup_ab.json", {**res, "failures": bad})
    if "e" in parts:
        res["engine"] = part_e(_models(sparsities), shapes)
    res["failures"] = bad
    atomic_write_json(f"{out}/fixup_ab.json", res)
    print("failures:", bad)
    return not bad


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--")}
    parts = opts.get("--parts", "k,e").split(",")
    shapes = tuple(tuple(map(int, s.split("x"))) for s in opts["--shapes"].split(",")) if "--shapes" in opts \
        else SHAPES
    sps = tuple(float(s) for s in opts["--sparsities"].split(",")) if "--sparsities" in opts else (0.5, 0.7)
    sys.exit(0 if main(args[0], parts, shapes, sps) else 1)
