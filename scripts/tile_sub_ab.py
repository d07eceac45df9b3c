"""Sub-block-row programs for tiles at few rows, and the dense weight read in place at scale: same-run A/Bs on the H200.

    python3 scripts/tile_sub_ab.py OUTDIR [--parts a,b,c]

a. Tile kernel with each block-row of 128x64 tiles split over `sub` programs (tile_linear(sub=...)), BERT-base shapes
   (QKV 2304x768, O 768x768, FFN-in 3072x768 with GELU, FFN-out 768x3072) with their bias, M = 128 ... 2048 rows,
   densities 1, 0.5, 0.25 (balanced random tiles), sub = 1, 2, 4, 8, at the table's launch and at (64, 4, 4); at up
   to 256 rows O and FFN-out as the engine's small-batch path calls them (tile_linear_partials, automatic split).
   Beside them cuBLAS on the dense weight and the dense weight read in place (the small-batch path's DENSE_W).
   Graphs of 20 calls; every output checked against the fp32 reference. Picks the sub of best geometric mean over
   shapes and the two sparse densities at each M.
b. The dense weight read in place (DENSE_W) at 4096 and 16384 rows, in 128x64 and 64x64 blocks at several launches
   (the 4-stage launch keeps 128 KB of buffers, one program an SM), against the same values as density-1 128x64
   tiles at the table's launch and cuBLAS (+ torch's GELU for FFN-in).
c. The BERT-base-shaped encoder pruned to 50% and 75% tiles, B x S from 1 x 128 to 16 x 128 and 4 x 512: GPU time
   of the graphed forward with sparse matrices on their dense copies under the shipped thresholds, on their tiles
   (sub 1), and on their tiles with part a's sub table, in alternating rounds; outputs compared.
d. Two kept tiles a K-loop trip (tile_linear(pair=True)) against one, with the shipped sub table: the four matrices
   at 128 ... 1024 rows, densities 0.5, 0.3, 0.25 (graphs of 20 calls, outputs checked); then the encoder with 50% and
   75% tiles at 1 x 128 ... 8 x 128, 3 x 128, 1 x 512, 2 x 256 and 1 x 384 on the shipped routes, on tiles at every
   batch, and on tiles with pairs (up to 1024 rows).
Writes tile_sub_ab.json (part d alone: tile_pair_ab.json).
"""
import contextlib
import copy
import importlib
import math
import os
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, forms_ab, graphed_forward, time_cuda
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.pruning.plan import DEFAULT_TILE
from etformer.sparse.tiles import TileSparseWeight, atomic_write_json

T = importlib.import_module("etformer.kernels.tile_linear")
E = importlib.import_module("etformer.engine.encoder")
TILE = (128, 64)
SHAPES = {"qkv": (768, 2304, None), "o": (768, 768, None), "ffn_in": (768, 3072, "gelu"), "ffn_out": (3072, 768, None)}
SMALL_MS = (128, 256, 512, 1024, 2048)
SUBS = (1, 2, 4, 8)


def t20(fn):
    return round(time_cuda(fn, graph=True, per_graph=20, min_ms=40)["median_us"], 2)


def rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def ref_of(x, W, b, act):
    y = x.float() @ W.float().t() + b.float()
    return F.gelu(y) if act else y


@contextlib.contextmanager
def dense_blocks(M, tile, launch):
    """The dense weight read in place in `tile` blocks at `launch` for M rows (tables restored after)."""
    bucket = T._dense_bucket(M)
    saved = dict(T.DENSE_TILE), dict(T.DENSE_LAUNCH)
    try:
        T.DENSE_TILE[bucket], T.DENSE_LAUNCH[bucket] = tile, launch
        yield
    finally:
        T.DENSE_TILE.clear(), T.DENSE_TILE.update(saved[0])
        T.DENSE_LAUNCH.clear(), T.DENSE_LAUNCH.update(saved[1])


def checked(fn, ref, what, bad, post=None):
    """fn's time; its output (through post) checked against ref."""
    y = fn() if post is None else post(fn())
    e = rel(y, ref)
    if not e < 1e-2:
        bad.append(f"{what}: relative error {e:.2e}")
    return t20(fn), e


def part_a(bad):
    rows = []
    for name, (K, N, act) in SHAPES.items():
        for M in SMALL_MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            b = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
            partials = name in ("o", "ffn_out") and M <= E.SMALL_KERNEL_MAX_TOKENS
            for d in (1.0, 0.5, 0.25):
                W = random_tile_weight(K, N, TILE, d, torch.float16, seed=M)
                w = TileSparseWeight.from_dense(W, TILE)
                ref = ref_of(x, W, b, act)
                row = {"matrix": name, "M": M, "density": d, "mode": "partials" if partials else "direct"}
                post = (lambda p: p.sum(0) + b) if partials else None  # the bias: add+LayerNorm's, not timed
                if partials:
                    def run(wt, **kw):
                        return lambda: T.tile_linear_partials(x, wt, **kw)
                    row["cublas_us"] = t20(lambda: F.linear(x, W, b))
                else:
                    def run(wt, **kw):
                        return lambda: T.tile_linear(x, wt, b, activation=act, **kw)
                    row["cublas_us"] = t20(lambda: F.gelu(F.linear(x, W, b)) if act else F.linear(x, W, b))
                row["dense_w_us"], _ = checked(run(W), ref, f"a {name} M={M} d={d} dense W", bad, post)
                for sub in SUBS:
                    for cfg in (None, (64, 4, 4)):
                        key = f"sub{sub}_{'table' if cfg is None else '_'.join(map(str, cfg))}"
                        row[key], _ = checked(run(w, sub=sub, _config=cfg), ref, f"a {name} M={M} d={d} {key}", bad,
                                              post)
                rows.append(row)
                best = min((k for k in row if k.startswith("sub")), key=lambda k: row[k])
                print(f"a {name} M={M} d={d} {row['mode']}: cuBLAS {row['cublas_us']} dense-W {row['dense_w_us']} "
                      f"sub1 {row['sub1_table']} best {best} {row[best]}", flush=True)
    chosen = []
    for M in SMALL_MS:
        sel = [r for r in rows if r["M"] == M and r["density"] < 1]
        gm = {s: math.exp(sum(math.log(r[f"sub{s}_table"]) for r in sel) / len(sel)) for s in SUBS}
        s = min(gm, key=gm.get)
        chosen.append((M, s))
        print(f"a M={M}: geometric mean us by sub {({k: round(v, 2) for k, v in gm.items()})} -> sub {s}", flush=True)
    return rows, tuple(chosen)


def part_b(bad):
    rows = []
    launches = {(128, 64): ((128, 4, 2), (128, 4, 3), (128, 4, 4), (64, 4, 3), (64, 4, 4), (64, 4, 5)),
                (64, 64): ((128, 4, 3), (128, 4, 4), (128, 4, 5))}
    for name, (K, N, act) in SHAPES.items():
        for M in (4096, 16384):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            b = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
            W = random_tile_weight(K, N, TILE, 1.0, torch.float16, seed=M)
            w = TileSparseWeight.from_dense(W, TILE)
            ref = ref_of(x, W, b, act)
            row = {"matrix": name, "M": M, "table_launch": list(T._launch_params(M, TILE, True, True, N))}
            row["cublas_us"] = t20(lambda: F.gelu(F.linear(x, W, b)) if act else F.linear(x, W, b))
            row["tiles_d1_us"], _ = checked(lambda: T.tile_linear(x, w, b, activation=act), ref, f"b {name} tiles",
                                            bad)
            for blk, cfgs in launches.items():
                for cfg in cfgs:
                    with dense_blocks(M, blk, cfg):
                        key = f"dense_w_{blk[0]}x{blk[1]}_{'_'.join(map(str, cfg))}"
                        row[key], _ = checked(lambda: T.tile_linear(x, W, b, activation=act), ref,
                                              f"b {name} M={M} {key}", bad)
            rows.append(row)
            best = min((k for k in row if k.startswith("dense_w")), key=lambda k: row[k])
            print(f"b {name} M={M}: cuBLAS {row['cublas_us']} tiles {row['tiles_d1_us']} best {best} {row[best]}",
                  flush=True)
    return rows


def part_c(sub_table):
    base = model_shape("bert-base").cuda()
    encs = {"dense": optimize(base, None, dtype=torch.float16, device="cuda")}
    for s in (0.5, 0.75):
        plan = PruningPlan.uniform("tile", s, DEFAULT_TILE)
        encs[f"tile{int(s * 100)}"] = optimize(apply_plan(copy.deepcopy(base), plan), plan, dtype=torch.float16,
                                               device="cuda")
    for enc in encs.values():
        enc.check_finite = False
    saved = E.SPARSE_TIERS, dict(T.TILE_SUB)

    def form(tiles, table):
        def put():
            E.SPARSE_TIERS = tuple((d, 0) for d, _ in saved[0]) if tiles else saved[0]
            T.TILE_SUB.clear()
            T.TILE_SUB.update(table)
        return put

    forms = {"shipped": form(False, saved[1]), "tiles_sub1": form(True, {}),
             "tiles_sub": form(True, {TILE: sub_table})}
    rows = []
    try:
        for B, S in ((1, 128), (2, 128), (4, 128), (8, 128), (16, 128), (4, 512)):
            ids, mask = make_inputs(B, S, False, 30522)
            form(False, saved[1])()
            _, dense = graphed_forward(encs["dense"], ids, mask, min_ms=100)
            for name in ("tile50", "tile75"):
                t, outs = forms_ab(encs[name], ids, mask, forms, rounds=2, min_ms=100)
                diff = max((outs[k] - outs["shipped"]).abs().max().item() for k in outs)
                rows.append({"B": B, "S": S, "variant": name, "dense_model_us": dense, "max_abs_diff": diff,
                             **{f"{k}_us": v for k, v in t.items()}})
                print(f"c {B}x{S} {name}: dense model {dense:.1f}, " +
                      ", ".join(f"{k} {v}" for k, v in t.items()) + f", max|diff| {diff:.2e}", flush=True)
    finally:
        form(False, saved[1])()
    return rows


def part_d(bad):
    rows = []
    for name, (K, N, act) in SHAPES.items():
        for M in (128, 256, 512, 1024):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            b = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
            partials = name in ("o", "ffn_out") and M <= E.SMALL_KERNEL_MAX_TOKENS
            post = (lambda p: p.sum(0) + b) if partials else None
            for d in (0.5, 0.3, 0.25):
                W = random_tile_weight(K, N, TILE, d, torch.float16, seed=M)
                w = TileSparseWeight.from_dense(W, TILE)
                ref = ref_of(x, W, b, act)
                row = {"matrix": name, "M": M, "density": d, "mode": "partials" if partials else "direct"}
                for pair in (False, True):
                    if partials:
                        fn = lambda: T.tile_linear_partials(x, w, pair=pair)  # noqa: E731
                    else:
                        fn = lambda: T.tile_linear(x, w, b, activation=act, pair=pair)  # noqa: E731
                    row[f"pair_{pair}"], _ = checked(fn, ref, f"d {name} M={M} d={d} pair={pair}", bad, post)
                rows.append(row)
                print(f"d {name} M={M} d={d}: one {row['pair_False']} two {row['pair_True']}", flush=True)
    base = model_shape("bert-base").cuda()
    encs = {}
    for s in (0.5, 0.75):
        plan = PruningPlan.uniform("tile", s, DEFAULT_TILE)
        encs[f"tile{int(s * 100)}"] = optimize(apply_plan(copy.deepcopy(base), plan), plan, dtype=torch.float16,
                                               device="cuda")
        encs[f"tile{int(s * 100)}"].check_finite = False
    saved = E.SPARSE_TIERS, T.TILE_PAIR_ROWS

    def form(tiles, pair_rows):
        def put():
            E.SPARSE_TIERS = tuple((d, 0) for d, _ in saved[0]) if tiles else saved[0]
            T.TILE_PAIR_ROWS = saved[1] if pair_rows is None else (1, pair_rows) if pair_rows else (0, 0)
        return put

    forms = {"shipped": form(False, None), "tiles": form(True, 0), "tiles_pair": form(True, 1024)}
    erows = []
    try:
        for B, S in ((1, 128), (2, 128), (4, 128), (8, 128), (3, 128), (1, 512), (2, 256), (1, 384)):
            ids, mask = make_inputs(B, S, False, 30522)
            for name, enc in encs.items():
                t, outs = forms_ab(enc, ids, mask, forms, rounds=2, min_ms=80)
                diff = max((outs[k] - outs["shipped"]).abs().max().item() for k in outs)
                erows.append({"B": B, "S": S, "variant": name, "max_abs_diff": diff,
                              **{f"{k}_us": v for k, v in t.items()}})
                print(f"d {B}x{S} {name}: " + ", ".join(f"{k} {v}" for k, v in t.items()) +
                      f", max|diff| {diff:.2e}", flush=True)
    finally:
        E.SPARSE_TIERS, T.TILE_PAIR_ROWS = saved
    return rows, erows


def main(out_dir, parts):
    os.makedirs(out_dir, exist_ok=True)
    res = {"env": env_info(), "command": "python3 scripts/tile_sub_ab.py OUTDIR --parts " + ",".join(parts),
           "tile": TILE, "bad": []}
    path = os.path.join(out_dir, "tile_pair_ab.json" if parts == ["d"] else "tile_sub_ab.json")
    sub_table = ((128, 4), (256, 4), (512, 2), (1024, 2), (2048, 1))
    if "a" in parts:
        res["a"], sub_table = part_a(res["bad"])
        res["a_chosen"] = sub_table
        atomic_write_json(path, res)
    if "b" in parts:
        res["b"] = part_b(res["bad"])
        atomic_write_json(path, res)
    if "c" in parts:
        res["c_sub_table"] = sub_table
        res["c"] = part_c(sub_table)
    if "d" in parts:
        res["d_kernels"], res["d_engine"] = part_d(res["bad"])
    atomic_write_json(path, res)
    print("failed checks:", res["bad"] or "none")
    return 1 if res["bad"] else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    parts = args[args.index("--parts") + 1].split(",") if "--parts" in args else ["a", "b", "c"]
    sys.exit(main(args[0], parts))
