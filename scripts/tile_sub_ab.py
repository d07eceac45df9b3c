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
import copy
import importlib
import math
import os
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, forms_ab, graphed_forward
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.pruning.plan import DEFAULT_TILE
from etformer.sparse.tiles import TileSparseWeight, atomic_write_json
from gelu_epilogue_ab import dense_blocks, rel, t20  # scripts/

T = importlib.import_module("etformer.kernels.tile_linear")
E = importlib.import_module("etformer.engine.encoder")
TILE = (128, 64)
SHAPES = {"qkv": (768, 2304, None), "o": (768, 768, None), "ffn_in": (768, 3072, "gelu"), "ffn_out": (3072, 768, None)}
SMALL_MS = (128, 256, 512, 1024, 2048)
SUBS = (1, 2, 4, 8)


def ref_of(x, W, b, act):
    y = x.float() @ W.float().t() + b.float()
    return F.gelu(y) if act else y


def checked(fn, ref, what, bad, post=None):
    """fn's time; its output (through post) checked against ref."""
    y = fn() if post is None else post(fn())
    e = rel(y, ref)
    if not e < 1e-2:
        bad.append(f"{what}: relative error {e:.2e}")
    return t20(fn), e


def matrix_cases(Ms, densities):
    """Each BERT-base matrix at each row count and density, as the engine calls it there: O and FFN-out up to
    SMALL_KERNEL_MAX_TOKENS rows as partial sums (their bias is add+LayerNorm's, added to the check only), the others
    with bias and activation. Yields (row, W, w, run, post, ref, cublas): run(weight, **tile_linear kwargs) makes the
    timed call."""
    for name, (K, N, act) in SHAPES.items():
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            b = torch.randn(N, device="cuda", dtype=torch.float16) * 0.1
            partials = name in ("o", "ffn_out") and M <= E.SMALL_KERNEL_MAX_TOKENS
            for d in densities:
                W = random_tile_weight(K, N, TILE, d, torch.float16, seed=M)
                row = {"matrix": name, "M": M, "density": d, "mode": "partials" if partials else "direct"}

                def run(wt, **kw):  # the consumer uses each case before the generator moves on
                    if partials:
                        return lambda: T.tile_linear_partials(x, wt, **kw)
                    return lambda: T.tile_linear(x, wt, b, activation=act, **kw)

                def post(p):
                    return p.sum(0) + b

                def cublas():
                    y = F.linear(x, W, b)
                    return F.gelu(y) if act else y

                yield (row, W, TileSparseWeight.from_dense(W, TILE), run, post if partials else None,
                       ref_of(x, W, b, act), cublas)


def encoders(sparsities, dense=False):
    """BERT-base-shaped encoders (random weights) pruned to each sparsity in the default tiles, finite check off."""
    base = model_shape("bert-base").cuda()
    encs = {"dense": optimize(base, None, dtype=torch.float16, device="cuda")} if dense else {}
    for s in sparsities:
        plan = PruningPlan.uniform("tile", s, DEFAULT_TILE)
        encs[f"tile{int(s * 100)}"] = optimize(apply_plan(copy.deepcopy(base), plan), plan, dtype=torch.float16,
                                               device="cuda")
    for enc in encs.values():
        enc.check_finite = False
    return encs


SHIPPED = None  # a route() argument: keep the shipped setting


def route(rows=SHIPPED, sub=SHIPPED, pair_rows=SHIPPED,
          _shipped=(E.SPARSE_TIERS, dict(T.TILE_SUB), T.TILE_PAIR_ROWS)):
    """A no-argument function that puts one engine form in place: every density tier's rows at rows (0: sparse
    matrices on their tiles at every batch; capped by SPARSE_MIN_TOKENS), TILE_SUB's entry for the default tile (sub:
    a table, {} for one program a block-row), two tiles a trip up to pair_rows rows (0: never); each left out keeps
    the shipped setting, so route()() restores everything."""
    def put():
        E.SPARSE_TIERS = _shipped[0] if rows is SHIPPED else tuple((d, rows) for d, _ in _shipped[0])
        T.TILE_SUB.clear()
        T.TILE_SUB.update(_shipped[1] if sub is SHIPPED else ({TILE: sub} if sub else {}))
        T.TILE_PAIR_ROWS = _shipped[2] if pair_rows is SHIPPED else ((1, pair_rows) if pair_rows else (0, 0))
    return put


def bert_encoders(sparsities=(0.0, 0.5), model="bert-base"):
    """Engines of a bench model (bert-base: BERT-base-shaped, random weights; minilm: the real all-MiniLM-L6-v2), fp16,
    finite check off as the bench runs them: "dense" and "tile<percent>" for each uniform tile sparsity."""
    base = model_shape(model).cuda()
    out = {}
    for s in sparsities:
        plan = PruningPlan.uniform("tile", s, DEFAULT_TILE)
        hf = apply_plan(copy.deepcopy(base), plan).eval() if s else base.eval()
        enc = optimize(hf, plan if s else None, dtype=torch.float16, device="cuda")
        enc.check_finite = False
        out["dense" if not s else f"tile{int(s * 100)}"] = enc
    return out


def engine_ab(tag, encs, shapes, forms, min_ms, dense=None):
    """forms_ab of each encoder at each (B, S), shipped form restored after; outputs compared with the first form's."""
    rows = []
    first = next(iter(forms))
    try:
        for B, S in shapes:
            ids, mask = make_inputs(B, S, False, 30522)
            route()()
            extra = {}
            if dense is not None:
                extra["dense_model_us"] = graphed_forward(dense, ids, mask, min_ms=min_ms)[1]
            for name, enc in encs.items():
                t, outs = forms_ab(enc, ids, mask, forms, rounds=2, min_ms=min_ms)
                diff = max((outs[k] - outs[first]).abs().max().item() for k in outs)
                rows.append({"B": B, "S": S, "variant": name, **extra, "max_abs_diff": diff,
                             **{f"{k}_us": v for k, v in t.items()}})
                print(f"{tag} {B}x{S} {name}: " + ", ".join(f"{k} {v}" for k, v in t.items()) +
                      f", max|diff| {diff:.2e}", flush=True)
    finally:
        route()()
    return rows


def part_a(bad):
    rows = []
    for row, W, w, run, post, ref, cublas in matrix_cases(SMALL_MS, (1.0, 0.5, 0.25)):
        what = f"a {row['matrix']} M={row['M']} d={row['density']}"
        row["cublas_us"] = t20(cublas)
        row["dense_w_us"], _ = checked(run(W), ref, f"{what} dense W", bad, post)
        for sub in SUBS:
            for cfg in (None, (64, 4, 4)):
                key = f"sub{sub}_{'table' if cfg is None else '_'.join(map(str, cfg))}"
                row[key], _ = checked(run(w, sub=sub, _config=cfg), ref, f"{what} {key}", bad, post)
        rows.append(row)
        best = min((k for k in row if k.startswith("sub")), key=lambda k: row[k])
        print(f"{what} {row['mode']}: cuBLAS {row['cublas_us']} dense-W {row['dense_w_us']} "
              f"sub1 {row['sub1_table']} best {best} {row[best]}", flush=True)
    chosen = []
    for M in SMALL_MS:
        sel = [r for r in rows if r["M"] == M and r["density"] < 1]
        gm = {s: math.exp(sum(math.log(r[f"sub{s}_table"]) for r in sel) / len(sel)) for s in SUBS}
        s = min(gm, key=gm.get)
        chosen.append((M, 1.0, s))  # a TILE_SUB entry: up to M rows, any density
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
                    with dense_blocks(M, tile=blk, launch=cfg):
                        key = f"dense_w_{blk[0]}x{blk[1]}_{'_'.join(map(str, cfg))}"
                        row[key], _ = checked(lambda: T.tile_linear(x, W, b, activation=act), ref,
                                              f"b {name} M={M} {key}", bad)
            rows.append(row)
            best = min((k for k in row if k.startswith("dense_w")), key=lambda k: row[k])
            print(f"b {name} M={M}: cuBLAS {row['cublas_us']} tiles {row['tiles_d1_us']} best {best} {row[best]}",
                  flush=True)
    return rows


def part_c(sub_table):
    encs = encoders((0.5, 0.75), dense=True)
    dense = encs.pop("dense")
    forms = {"shipped": route(), "tiles_sub1": route(0, sub={}), "tiles_sub": route(0, sub=sub_table)}
    return engine_ab("c", encs, ((1, 128), (2, 128), (4, 128), (8, 128), (16, 128), (4, 512)), forms, 100, dense)


def part_d(bad):
    rows = []
    for row, W, w, run, post, ref, cublas in matrix_cases((128, 256, 512, 1024), (0.5, 0.3, 0.25)):
        what = f"d {row['matrix']} M={row['M']} d={row['density']}"
        for pair in (False, True):
            row[f"pair_{pair}"], _ = checked(run(w, pair=pair), ref, f"{what} pair={pair}", bad, post)
        rows.append(row)
        print(f"{what}: one {row['pair_False']} two {row['pair_True']}", flush=True)
    forms = {"shipped": route(), "tiles": route(0, pair_rows=0), "tiles_pair": route(0, pair_rows=1024)}
    shapes = ((1, 128), (2, 128), (4, 128), (8, 128), (3, 128), (1, 512), (2, 256), (1, 384))
    return rows, engine_ab("d", encoders((0.5, 0.75)), shapes, forms, 80)


def main(out_dir, parts):
    os.makedirs(out_dir, exist_ok=True)
    res = {"env": env_info(), "command": "python3 scripts/tile_sub_ab.py OUTDIR --parts " + ",".join(parts),
           "tile": TILE, "bad": []}
    path = os.path.join(out_dir, "tile_pair_ab.json" if parts == ["d"] else "tile_sub_ab.json")
    sub_table = T.TILE_SUB[TILE]  # part c's table when part a is not run
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
