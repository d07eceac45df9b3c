"""Launch sweep of the tile-sparse linear at 128 rows (the kernels bench's M=128 rows), or at --m rows, timed as graphs
of PER_GRAPH back-to-back calls with PDL off, beside cuBLAS timed the same way.

    python3 scripts/tune_small_m.py OUT_DIR [--m 4096] [--shapes o,ffn_out] [--epilogue bias|gelu|residual]

BERT-base shapes (QKV 2304x768, FFN-in 3072x768, FFN-out 768x3072), fp16, tiles 128x64 and 64x64, densities 1, 0.5
and 0.25. Candidates: the grid kernel at (BLOCK_M, 4 warps, stages) for BLOCK_M in {16, 32, 64} and 3-6 stages, and
split-K over 2, 3, 4 or 6 programs a block (the tabled launch, reduced by the split-K epilogue kernel); above 128 rows
128x64 tiles only, BLOCK_M 64 with 4 warps and 128 with 4 or 8, 3-6 stages, and no split-K; "table" is
the direct launch (split_k=1), whatever tile_linear would choose by itself. Every output
is checked against fp32 math. Prints each case's best and, per tile, the candidate with the best geometric-mean
speed-up over the tabled launch; JSON to OUT_DIR/tune_small_m.json.
--shapes picks among qkv, ffn_in, ffn_out and o (the attention output projection, 768x768); --epilogue fuses a bias,
a bias and GELU, or a bias and a residual into every candidate, and cuBLAS then runs the same in PyTorch ops (the
file name gets the shapes and the epilogue).
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

from etformer.bench.kernels import SHAPES, random_tile_weight
from etformer.bench.timing import env_info, time_cuda
from etformer.kernels import _common
from etformer.kernels.tile_linear import tile_linear
from etformer.sparse.tiles import TileSparseWeight, atomic_write_json

PER_GRAPH = 20


SHAPES_ALL = dict(SHAPES, o=(768, 768))


def main(out_dir, M=128, shapes=None, epilogue="none"):
    shapes = {k: SHAPES_ALL[k] for k in shapes} if shapes else SHAPES
    if M <= 128:
        GRID = [(bm, 4, st) for bm in (16, 32, 64) for st in (3, 4, 5, 6)]
        SPLITS = (2, 3, 4, 6)
    else:
        GRID = [(bm, w, st) for bm, w in ((64, 4), (128, 4), (128, 8)) for st in (3, 4, 5, 6)]
        SPLITS = ()
    _common.USE_PDL = False
    os.makedirs(out_dir, exist_ok=True)
    rows, bad = [], []
    for tile in ((128, 64), (64, 64)) if M <= 128 else ((128, 64),):
        for name, (K, N) in shapes.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            Wd = torch.randn(N, K, device="cuda", dtype=torch.float16) / math.sqrt(K)
            b = torch.randn(N, device="cuda", dtype=torch.float16) if epilogue != "none" else None
            r = torch.randn(M, N, device="cuda", dtype=torch.float16) if epilogue == "residual" else None
            act = "gelu" if epilogue == "gelu" else None
            epi = {"bias": b, "activation": act, "residual": r}

            def peer():
                y = F.linear(x, Wd, b)
                y = F.gelu(y) if act else y
                return y + r if r is not None else y

            cublas = time_cuda(peer, graph=True, min_ms=30, per_graph=PER_GRAPH)["median_us"]
            for d in (1.0, 0.5, 0.25):
                W = random_tile_weight(K, N, tile, d, torch.float16)
                w = TileSparseWeight.from_dense(W, tile)
                ref = F.linear(x.float(), W.float(), None if b is None else b.float())
                ref = F.gelu(ref) if act else ref
                ref = ref + r.float() if r is not None else ref
                cands = {"table": {"split_k": 1}}
                cands.update({f"grid {c[0]}/{c[1]}/{c[2]}": {"_config": c, "split_k": 1} for c in GRID})
                cands.update({f"split {s}": {"split_k": s} for s in SPLITS})
                res = {}
                for key, kw in cands.items():
                    try:
                        y = tile_linear(x, w, **epi, **kw)
                        torch.cuda.synchronize()
                        err = float((y.float() - ref).norm() / ref.norm())
                        us = time_cuda(lambda: tile_linear(x, w, **epi, **kw), graph=True, min_ms=15,
                                       per_graph=PER_GRAPH)["median_us"]
                    except Exception as e:  # out of resources: recorded
                        res[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                        continue
                    res[key] = {"us": us, "err": err}
                    if not err < 1e-2:
                        bad.append((tile, name, d, key, err))
                ok = {k: v["us"] for k, v in res.items() if "us" in v}
                best = min(ok, key=ok.get)
                rows.append({"tile": f"{tile[0]}x{tile[1]}", "matrix": name, "K": K, "N": N, "density": d,
                             "epilogue": epilogue,
                             "cublas_us": cublas, "results": res, "best": best})
                print(f"{tile} {name:7s} d={d:.2f}: cuBLAS {cublas:5.1f}  table {ok['table']:5.1f} "
                      f"(x{cublas / ok['table']:.2f})  best {best} {ok[best]:5.1f} (x{cublas / ok[best]:.2f})",
                      flush=True)
    summary = {}
    for tile in sorted({r["tile"] for r in rows}):
        sel = [r for r in rows if r["tile"] == tile]
        keys = set.intersection(*[{k for k, v in r["results"].items() if "us" in v} for r in sel])
        gm = {k: math.exp(sum(math.log(r["results"]["table"]["us"] / r["results"][k]["us"]) for r in sel) / len(sel))
              for k in keys}
        b = max(gm, key=gm.get)
        summary[tile] = {"best": b, "geomean_vs_table": gm[b], "all": gm}
        print(f"{tile}: best by geometric mean {b} ({gm[b]:.3f}x the tabled launch)", flush=True)
    stem = "tune_small_m" if M == 128 else f"tune_m{M}"
    if shapes is not SHAPES:
        stem += "_" + "_".join(shapes)
    if epilogue != "none":
        stem += "_" + epilogue
    atomic_write_json(os.path.join(out_dir, stem + ".json"),
                      {"env": env_info(), "command": "python3 scripts/tune_small_m.py " + " ".join(sys.argv[1:]),
                       "M": M, "epilogue": epilogue, "per_graph": PER_GRAPH, "pdl": False, "rows": rows,
                       "summary": summary, "wrong": bad})
    if bad:
        print("WRONG:", bad)
        raise SystemExit(1)


if __name__ == "__main__":
    args = sys.argv[1:]

    def opt(name, default):
        return args[args.index(name) + 1] if name in args else default

    main(args[0], int(opt("--m", 128)), opt("--shapes", "").split(",") if "--shapes" in args else None,
         opt("--epilogue", "none"))
