"""Where a tile-pruned matrix should leave its dense copy for its tiles: same-run A/B of encoder.SPARSE_MIN_TOKENS.

    python3 scripts/sparse_min_tokens_ab.py OUT_DIR [--sparsities 0.5,0.75] [--shapes 4x128,8x128,32x128v,...]

BERT-base-shaped encoder (random weights), every matrix pruned to each sparsity (default 50% and 75%) in the plan's
default tiles, fp16. At B x S from 512 to 8192 tokens (fixed length; a trailing v: variable length), or the shapes
given, GPU time of one graphed forward (median of CUDA-graph replays) with the sparse matrices on their dense copies
(every SPARSE_TIERS entry's rows above the batch: cuBLAS, or the small-batch kernels on the dense weight) and on their
tiles (all 0; SPARSE_MIN_TOKENS keeps its value, so the small-batch path's split-K partial sums serve the tiles
too), beside the dense model through the same engine; outputs of the two routes compared. The finite check is off
(the packed path, no host read). Writes sparse_min_tokens_ab.json.
--sub4: a third form, the tiles with 4 programs a block-row up to 256 rows at any density (TILE_SUB takes 4 at 128
rows only up to a density of 0.3).
"""
import importlib
import os
import sys

from etformer.bench.run import make_inputs
from etformer.bench.timing import env_info, forms_ab, graphed_forward
from etformer.pruning.plan import DEFAULT_TILE
from etformer.sparse.tiles import atomic_write_json
from tile_sub_ab import encoders, route  # scripts/

E = importlib.import_module("etformer.engine.encoder")

SHAPES = [(4, 128), (8, 128), (16, 128), (4, 512), (32, 128), (8, 512), (64, 128), (16, 512)]


def main(out_dir, sparsities=(0.5, 0.75), shapes=tuple((B, S, False) for B, S in SHAPES), sub4=False):
    os.makedirs(out_dir, exist_ok=True)
    tiers = E.SPARSE_TIERS
    E.SPARSE_TIERS = ()  # every sparse matrix keeps a dense copy (none is kept where its tier's rows are 0)
    try:
        encs = encoders(sparsities, dense=True)
    finally:
        E.SPARSE_TIERS = tiers

    forms = {"dense_copy": route(1 << 30), "tiles": route(0)}
    if sub4:
        forms["tiles_sub4"] = route(0, sub=((256, 1.0, 4), (512, 1.0, 2)))

    rows = []
    try:
        for B, S, varlen in shapes:
            ids, mask = make_inputs(B, S, varlen, 30522)
            route()()
            _, dense = graphed_forward(encs["dense"], ids, mask, min_ms=100)
            for name in (n for n in encs if n != "dense"):
                t, outs = forms_ab(encs[name], ids, mask, forms, min_ms=100)
                diff = max((outs[k] - outs["dense_copy"]).abs().max().item() for k in outs)
                density = min(L.density for lay in encs[name].layers for L in (lay.qkv, lay.o, lay.ffn_in, lay.ffn_out))
                row = {"B": B, "S": S, "varlen": varlen, "tokens": int(mask.sum()), "variant": name,
                       "min_density": round(density, 4), "dense_model_us": dense,
                       **{f"{k}_us": v for k, v in t.items()}, "max_abs_diff": diff}
                rows.append(row)
                print(f"{B}x{S}{' varlen' if varlen else ''} {name} (density >= {density:.3f}): dense model "
                      f"{dense:.1f} us, " + ", ".join(f"{k} {v}" for k, v in t.items()) +
                      f" (x{dense / min(t['tiles']):.2f} over the dense model on tiles), max|diff| {diff:.2e}",
                      flush=True)
    finally:
        route()()
    atomic_write_json(os.path.join(out_dir, "sparse_min_tokens_ab.json"),
                      {"env": env_info(),
                       "command": "python3 scripts/sparse_min_tokens_ab.py " + " ".join(sys.argv[1:]),
                       "tile": DEFAULT_TILE, "sparse_min_tokens": E.SPARSE_MIN_TOKENS, "rows": rows})


if __name__ == "__main__":
    a = sys.argv[1:]
    kw = {}
    if "--sparsities" in a:
        kw["sparsities"] = tuple(float(v) for v in a[a.index("--sparsities") + 1].split(","))
    if "--shapes" in a:
        kw["shapes"] = tuple((int(b), int(s.rstrip("v")), s.endswith("v"))
                             for b, s in (t.split("x") for t in a[a.index("--shapes") + 1].split(",")))
    main(a[0], sub4="--sub4" in a, **kw)
