"""Same-run A/B of the tile kernel's GELU epilogue on the H200: libdevice erf against the polynomial erf.

    python3 scripts/gelu_epilogue_ab.py OUTDIR            # parts 1 and 2
    python3 scripts/gelu_epilogue_ab.py OUTDIR --dense-w  # part 3
    python3 scripts/gelu_epilogue_ab.py OUTDIR --engine-dense  # part 4

1. FFN-in (K = 768, N = 3072), 128x64 tiles, M = 4096 and 16384, densities 1, 0.5, 0.25 (balanced random tiles, with
   a bias), graphs of 20 calls: the kernel with no activation; GELU by each erf at the tabled launch and at
   (128, 8, 4), (128, 8, 3) and (64, 4, 5); a dense weight read in place in 128x64 blocks with the fused GELU; cuBLAS with the
   bias, and cuBLAS then torch's GELU (what the engine runs for a dense FFN-in at scale). Every output is checked
   against the fp32 reference.
2. The whole BERT-base-shaped encoder, 50% tiles (128x64), B=32 and 128 at S=128: GPU time of the graphed forward
   with each erf, in alternating rounds, and the largest difference between their outputs.
3. A dense FFN-in weight read in place (DENSE_W, no tile copy) with the fused GELU at 4096 and 16384 rows, in
   128x64 blocks at the tile table's launch: with the bias fetched before the K loop (as the small-batch path does),
   in the epilogue, or no bias; against the same weight as 128x64 tiles at density 1 and cuBLAS + torch's GELU.
4. The dense BERT-base-shaped encoder with FFN-in on the tile kernel and the GELU fused (DENSE_ACT_KERNEL: since
   tile_sub_ab part b the dense weight read in place, earlier a density-1 tile copy; `kernel` in the rows) or on
   cuBLAS and torch's GELU, GPU time of the graphed forward in alternating rounds, at 4096 to 16384 tokens.
"""
import contextlib
import copy
import importlib
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, forms_ab, time_cuda
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.sparse.tiles import TileSparseWeight, atomic_write_json
from small_latency_ab import BiasLate  # scripts/: the tile kernel launched with BIAS_EARLY=False

T = importlib.import_module("etformer.kernels.tile_linear")
TILE = (128, 64)


@contextlib.contextmanager
def dense_blocks(M, N=0, tile=TILE, launch=None):
    """A dense weight read in place in `tile` blocks for M rows at `launch` (None: the tile table's launch for N
    outputs); the tables are restored after."""
    bucket = T._dense_bucket(M)
    saved = dict(T.DENSE_TILE), dict(T.DENSE_LAUNCH)
    try:
        T.DENSE_TILE[bucket] = tile
        T.DENSE_LAUNCH[bucket] = launch or T._launch_params(M, tile, True, True, N)
        yield
    finally:
        T.DENSE_TILE.clear(), T.DENSE_TILE.update(saved[0])
        T.DENSE_LAUNCH.clear(), T.DENSE_LAUNCH.update(saved[1])


def t20(fn):
    return round(time_cuda(fn, graph=True, per_graph=20, min_ms=40)["median_us"], 2)


def rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def kernel_rows():
    rows = []
    K, N = 768, 3072
    for M in (4096, 16384):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        b = torch.randn(N, device="cuda", dtype=torch.float16)
        for d in (1.0, 0.5, 0.25):
            W = random_tile_weight(K, N, TILE, d, torch.float16)
            w = TileSparseWeight.from_dense(W, TILE)
            ref = F.gelu(x.float() @ W.float().t() + b.float())
            row = {"M": M, "density": d, "table_launch": list(T._launch_params(M, TILE, True, True, N))}
            row["plain_us"] = t20(lambda: T.tile_linear(x, w, b))
            row["cublas_bias_us"] = t20(lambda: F.linear(x, W, b))
            row["cublas_gelu_us"] = t20(lambda: F.gelu(F.linear(x, W, b)))
            for erf in ("libdevice", "poly"):
                T.GELU_ERF = erf
                for cfg in (None, (128, 8, 4), (128, 8, 3), (64, 4, 5)):
                    key = f"gelu_{erf}_{'table' if cfg is None else '_'.join(map(str, cfg))}"
                    y = T.tile_linear(x, w, b, activation="gelu", _config=cfg)
                    row[key + "_err"] = rel(y, ref)
                    row[key + "_us"] = t20(lambda: T.tile_linear(x, w, b, activation="gelu", _config=cfg))
                if d == 1.0:  # the dense weight in place
                    with dense_blocks(M, N):
                        y = T.tile_linear(x, W, b, activation="gelu")
                        row[f"dense_w_gelu_{erf}_err"] = rel(y, ref)
                        row[f"dense_w_gelu_{erf}_us"] = t20(lambda: T.tile_linear(x, W, b, activation="gelu"))
            T.GELU_ERF = "poly"
            print(row, flush=True)
            rows.append(row)
    return rows


def engine_rows():
    base = model_shape("bert-base").cuda()
    plan = PruningPlan.uniform("tile", 0.5, TILE)
    enc = optimize(apply_plan(copy.deepcopy(base), plan), plan, dtype=torch.float16, device="cuda")
    enc.check_finite = False
    rows = []
    for B in (32, 128):
        ids, mask = make_inputs(B, 128, False, base.config.vocab_size)
        try:
            res, outs = forms_ab(enc, ids, mask, {e: (lambda e=e: setattr(T, "GELU_ERF", e))
                                                  for e in ("libdevice", "poly")})
        finally:
            T.GELU_ERF = "poly"
        res = {k: [round(u, 1) for u in v] for k, v in res.items()}
        diff = float((outs["poly"] - outs["libdevice"]).abs().max())
        row = {"B": B, "S": 128, "plan": "tile50", "gpu_us": res, "max_abs_diff": diff}
        print(row, flush=True)
        rows.append(row)
    return rows


def dense_w_rows():
    rows = []
    K, N = 768, 3072
    shipped = T._tile_linear_kernel
    for M in (4096, 16384):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        b = torch.randn(N, device="cuda", dtype=torch.float16)
        W = torch.randn(N, K, device="cuda", dtype=torch.float16) / K ** 0.5
        w = TileSparseWeight.from_dense(W, TILE)
        ref = F.gelu(x.float() @ W.float().t() + b.float())
        row = {"M": M, "cublas_gelu_us": t20(lambda: F.gelu(F.linear(x, W, b))),
               "tiles_gelu_us": t20(lambda: T.tile_linear(x, w, b, activation="gelu"))}
        with dense_blocks(M, N):
            row["dense_w_bias_early_err"] = rel(T.tile_linear(x, W, b, activation="gelu"), ref)
            row["dense_w_bias_early_us"] = t20(lambda: T.tile_linear(x, W, b, activation="gelu"))
            row["dense_w_no_bias_us"] = t20(lambda: T.tile_linear(x, W, None, activation="gelu"))
            T._tile_linear_kernel = BiasLate(shipped)  # the launcher looks the kernel up in the module
            try:
                row["dense_w_bias_late_err"] = rel(T.tile_linear(x, W, b, activation="gelu"), ref)
                row["dense_w_bias_late_us"] = t20(lambda: T.tile_linear(x, W, b, activation="gelu"))
            finally:
                T._tile_linear_kernel = shipped
        print(row, flush=True)
        rows.append(row)
    return rows


def engine_dense_rows():
    from etformer.engine import encoder as E

    base = model_shape("bert-base").cuda()
    enc = optimize(copy.deepcopy(base), None, dtype=torch.float16, device="cuda")
    enc.check_finite = False
    rows = []
    for B, S in ((32, 128), (8, 512), (128, 128), (32, 512)):
        ids, mask = make_inputs(B, S, False, base.config.vocab_size)
        try:
            res, outs = forms_ab(enc, ids, mask, {"cublas": lambda: setattr(E, "DENSE_ACT_KERNEL", False),
                                                  "tiles": lambda: setattr(E, "DENSE_ACT_KERNEL", True)})
        finally:
            E.DENSE_ACT_KERNEL = True
        res = {k: [round(u, 1) for u in v] for k, v in res.items()}
        diff = float((outs["tiles"] - outs["cublas"]).abs().max())
        row = {"B": B, "S": S, "plan": "dense", "kernel": "dense weight in place", "gpu_us": res, "max_abs_diff": diff}
        print(row, flush=True)
        rows.append(row)
    return rows


def main():
    out = sys.argv[1]
    if "--engine-dense" in sys.argv:
        res = {"env": env_info(), "command": "python3 scripts/gelu_epilogue_ab.py OUT --engine-dense",
               "engine_dense": engine_dense_rows()}
        atomic_write_json(out + "/gelu_engine_dense.json", res)
        return
    if "--dense-w" in sys.argv:
        res = {"env": env_info(), "command": "python3 scripts/gelu_epilogue_ab.py OUT --dense-w",
               "dense_w": dense_w_rows()}
        atomic_write_json(out + "/gelu_dense_w.json", res)
        return
    res = {"env": env_info(), "command": "python3 scripts/gelu_epilogue_ab.py OUT", "kernels": kernel_rows()}
    res["engine"] = engine_rows()
    atomic_write_json(out + "/gelu_epilogue_ab.json", res)


if __name__ == "__main__":
    main()
