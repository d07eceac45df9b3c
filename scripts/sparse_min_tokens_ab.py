"""Where a tile-pruned matrix should leave its dense copy for its tiles: same-run A/B of encoder.SPARSE_MIN_TOKENS.

    python3 scripts/sparse_min_tokens_ab.py OUT_DIR

BERT-base-shaped encoder (random weights), every matrix pruned to 50% and to 75% in the plan's default tiles, fp16.
At B x S from 512 to 8192 tokens (fixed length), GPU time of one graphed forward (median of CUDA-graph replays) with
the sparse matrices on their dense copies (cuBLAS: SPARSE_MIN_TOKENS, _MID and _LOW above the batch) and
on their tiles (all 0), beside the dense model through the same engine; outputs of the two routes compared. The
finite check is off (the packed path, no host read). Writes sparse_min_tokens_ab.json.
"""
import copy
import importlib
import os
import sys

import torch

from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, forms_ab, graphed_forward
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.pruning.plan import DEFAULT_TILE
from etformer.sparse.tiles import atomic_write_json

E = importlib.import_module("etformer.engine.encoder")

SHAPES = [(4, 128), (8, 128), (16, 128), (4, 512), (32, 128), (8, 512), (64, 128), (16, 512)]


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    base = model_shape("bert-base").cuda()
    encs = {"dense": optimize(base, None, dtype=torch.float16, device="cuda")}
    low = E.SPARSE_MIN_TOKENS_LOW
    E.SPARSE_MIN_TOKENS_LOW = 1 << 30  # every sparse matrix keeps a dense copy (none is kept where the threshold is 0)
    try:
        for s in (0.5, 0.75):
            plan = PruningPlan.uniform("tile", s, DEFAULT_TILE)
            encs[f"tile{int(s * 100)}"] = optimize(apply_plan(copy.deepcopy(base), plan), plan, dtype=torch.float16,
                                                   device="cuda")
    finally:
        E.SPARSE_MIN_TOKENS_LOW = low
    for enc in encs.values():
        enc.check_finite = False
    names = ("SPARSE_MIN_TOKENS", "SPARSE_MIN_TOKENS_MID", "SPARSE_MIN_TOKENS_LOW")
    saved = [getattr(E, n) for n in names]

    def route(rows):  # every threshold at rows, or back to the shipped ones (None)
        for n, v in zip(names, saved if rows is None else [rows] * 3):
            setattr(E, n, v)

    rows = []
    try:
        for B, S in SHAPES:
            ids, mask = make_inputs(B, S, False, 30522)
            route(None)
            _, dense = graphed_forward(encs["dense"], ids, mask, min_ms=100)
            for name in ("tile50", "tile75"):
                t, outs = forms_ab(encs[name], ids, mask, {"dense_copy": lambda: route(1 << 30),
                                                           "tiles": lambda: route(0)}, min_ms=100)
                diff = (outs["tiles"] - outs["dense_copy"]).abs().max().item()
                row = {"B": B, "S": S, "tokens": B * S, "variant": name, "dense_model_us": dense,
                       "dense_copy_us": t["dense_copy"], "tiles_us": t["tiles"], "max_abs_diff": diff}
                rows.append(row)
                print(f"{B}x{S} {name}: dense model {dense:.1f} us, dense copy {t['dense_copy']}, tiles {t['tiles']} "
                      f"(x{dense / min(t['tiles']):.2f} over the dense model on tiles), max|diff| {diff:.2e}",
                      flush=True)
    finally:
        route(None)
    atomic_write_json(os.path.join(out_dir, "sparse_min_tokens_ab.json"),
                      {"env": env_info(), "command": "python3 scripts/sparse_min_tokens_ab.py OUT_DIR",
                       "tile": DEFAULT_TILE, "sparse_min_tokens": saved[0], "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1])
