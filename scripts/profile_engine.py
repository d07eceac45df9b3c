"""Kernel-level profile of the engine on a BERT-base-shaped encoder: where the GPU time goes, per plan.

    python3 scripts/profile_engine.py OUTDIR [B S] [--plans dense,tile50,tile_balanced50]

Per plan it records:
- the GPU time of one captured forward (the graph the engine replays);
- every kernel of one eager forward in launch order with its GPU time (torch.profiler), and their sum: the sum
  against the graph's time is the idle time between kernels;
- each layer-0 matrix on its own, graphs of 20 calls: as the engine calls it (bias, GELU), the same kernel with no
  epilogue, a random balanced weight of the same density (what `etformer.bench.kernels` times), and cuBLAS on the
  dense weight; "rotating" rows cycle through 12 layers' worth of distinct weights, as a forward does, so the
  weights come from HBM rather than from L2.
"""
import argparse
import copy

import torch
import torch.nn.functional as F

from etformer.bench.kernels import random_tile_weight
from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, time_cuda
from etformer.engine import optimize
from etformer.kernels.tile_linear import tile_linear
from etformer.pruning import PruningPlan, apply_plan
from etformer.sparse.tiles import TileSparseWeight, atomic_write_json

PLANS = {
    "dense": None,
    "tile50": lambda: PruningPlan.uniform("tile", 0.5, (128, 64)),
    "tile_balanced50": lambda: PruningPlan.uniform("tile_balanced", 0.5, (128, 64)),
    "tile75": lambda: PruningPlan.uniform("tile", 0.75, (128, 64)),
}
ROTATE = 12  # distinct weights cycled through in the "rotating" rows: one per layer of BERT-base


def kernel_sequence(run) -> list[tuple[str, float]]:
    """(name, GPU µs) of every kernel one call of run() launches, in launch order."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA" and getattr(e, "device_time", 0)]
    evs.sort(key=lambda e: e.time_range.start)
    return [(e.name[:70], float(e.device_time)) for e in evs]


def families(seq):
    fam: dict[str, list] = {}
    for name, us in seq:
        f = fam.setdefault(name[:60], [0.0, 0])
        f[0] += us
        f[1] += 1
    return sorted(([k, round(v[0], 1), v[1]] for k, v in fam.items()), key=lambda r: -r[1])


def time20(fn):
    return time_cuda(fn, graph=True, per_graph=20, min_ms=30)["median_us"]


def rotating(fns):
    """Time a graph that calls each of fns once, in turn (ROTATE calls), per call."""
    it = {"i": 0}

    def one():
        f = fns[it["i"] % len(fns)]
        it["i"] += 1
        return f()

    return time_cuda(one, graph=True, per_graph=len(fns), min_ms=30)["median_us"]


def matrices(L, T, act, dtype):
    x = torch.randn(T, 768, device="cuda", dtype=dtype)
    f = torch.randn(T, 3072, device="cuda", dtype=dtype)
    out = {}
    for kind, inp in (("qkv", x), ("o", x), ("ffn_in", x), ("ffn_out", f)):
        lin = getattr(L, kind)
        a = act if kind == "ffn_in" else None
        info = {"density": round(lin.density, 4), "engine_us": time20(lambda: lin(inp, activation=a))}
        N, K = lin.out_features, lin.in_features
        dense_w = lin.dense_weight if lin.dense_weight is not None else lin.sparse.to_dense()
        info["cublas_us"] = time20(lambda: F.linear(inp, dense_w))
        info["cublas_bias_us"] = time20(lambda: F.linear(inp, dense_w, lin.bias))
        ws = [torch.randn_like(dense_w) for _ in range(ROTATE)]
        info["cublas_rotating_us"] = rotating([lambda w=w: F.linear(inp, w, lin.bias) for w in ws])
        if lin.sparse is not None:
            w = lin.sparse
            tpr = w.tiles_per_row.float()
            info["tiles_per_row"] = [float(tpr.min()), float(tpr.mean()), float(tpr.max())]
            info["plain_us"] = time20(lambda: tile_linear(inp, w))
            rb = TileSparseWeight.from_dense(random_tile_weight(K, N, w.tile, w.density, dtype), w.tile)
            info["random_balanced_us"] = time20(lambda: tile_linear(inp, rb))
            copies = [TileSparseWeight.from_dense(random_tile_weight(K, N, w.tile, w.density, dtype, seed=s), w.tile)
                      for s in range(ROTATE)]
            info["random_balanced_rotating_us"] = rotating(
                [lambda c=c: tile_linear(inp, c, lin.bias, activation=a) for c in copies])
        out[kind] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in info.items()}
        print(f"  layer0 {kind}: {out[kind]}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("B", nargs="?", type=int, default=32)
    ap.add_argument("S", nargs="?", type=int, default=128)
    ap.add_argument("--plans", default="dense,tile50,tile_balanced50")
    args = ap.parse_args()
    B, S = args.B, args.S
    dtype = torch.float16
    base = model_shape("bert-base").cuda()
    ids, mask = make_inputs(B, S, False, base.config.vocab_size)
    res = {"env": env_info(), "command": f"python3 scripts/profile_engine.py OUT {B} {S} --plans {args.plans}",
           "B": B, "S": S, "plans": {}}
    for name in args.plans.split(","):
        plan = PLANS[name]() if PLANS[name] else None
        m = apply_plan(copy.deepcopy(base), plan) if plan else copy.deepcopy(base)
        enc = optimize(m, plan, dtype=dtype, device="cuda")
        enc.check_finite = False
        graph_us = time_cuda(enc.graph_replay_fn(ids, mask), min_ms=100)["median_us"]
        enc.use_graphs = False
        seq = kernel_sequence(lambda: enc(ids, mask))
        total = sum(us for _, us in seq)
        print(f"== {name}, B={B}, S={S}: graph {graph_us:.1f} us, eager kernels sum {total:.1f} us "
              f"({len(seq)} launches)", flush=True)
        for fam in families(seq)[:8]:
            print(f"  {fam[1]:9.1f} us  x{fam[2]:3d}  {fam[0]}")
        layer0 = matrices(enc.layers[0], B * S, enc.cfg.activation, dtype)
        res["plans"][name] = {"graph_us": round(graph_us, 1), "eager_kernel_sum_us": round(total, 1),
                              "families": families(seq), "sequence": [[n, round(u, 2)] for n, u in seq],
                              "layer0": layer0}
        enc = m = None
        torch.cuda.empty_cache()
    atomic_write_json(args.out + "/profile_engine.json", res)


if __name__ == "__main__":
    main()
