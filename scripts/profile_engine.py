"""Kernel-level profile of the engine on a BERT-base-shaped encoder: where the GPU time goes, per plan.

    python3 scripts/profile_engine.py OUTDIR [B S]
Prints, per plan, the GPU time of each kernel family summed over one forward (torch.profiler), and times each
layer-0 matrix on its own (as the engine holds it) against cuBLAS on the same dense weight.
"""
import sys

import torch
import torch.nn.functional as F

from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import time_cuda
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.kernels.tile_linear import tile_linear
from etformer.sparse.tiles import atomic_write_json

out_dir = sys.argv[1]
B, S = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (32, 128)
base = model_shape("bert-base").cuda()
ids, mask = make_inputs(B, S, False, base.config.vocab_size)
res = {}
for name, plan in (("dense", None), ("tile50", PruningPlan.uniform("tile", 0.5, (128, 64))),
                   ("tile_balanced50", PruningPlan.uniform("tile_balanced", 0.5, (128, 64)))):
    import copy
    m = apply_plan(copy.deepcopy(base), plan)
    enc = optimize(m, plan, dtype=torch.float16, device="cuda")
    enc.check_finite = False
    enc.use_graphs = False
    for _ in range(3):
        enc(ids, mask)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            enc(ids, mask)
        torch.cuda.synchronize()
    fam = {}
    for e in prof.key_averages():
        if e.device_type.name != "CUDA" and getattr(e, "self_device_time_total", 0) == 0:
            continue
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        fam[e.key[:60]] = fam.get(e.key[:60], 0) + t / 5
    top = sorted(fam.items(), key=lambda kv: -kv[1])[:12]
    print(f"== {name}: GPU us per forward by kernel (B={B}, S={S})")
    for k, v in top:
        print(f"  {v:9.1f}  {k}")
    L = enc.layers[0]
    x = torch.randn(B * S, 768, device="cuda", dtype=torch.float16)
    f = torch.randn(B * S, 3072, device="cuda", dtype=torch.float16)
    mats = {}
    for kind, inp in (("qkv", x), ("o", x), ("ffn_in", x), ("ffn_out", f)):
        lin = getattr(L, kind)
        t = time_cuda(lambda: lin(inp), graph=True, min_ms=20)["median_us"]
        info = {"engine_us": t, "density": lin.density}
        if lin.sparse is not None:
            w = lin.sparse
            dense = w.to_dense()
            info["cublas_us"] = time_cuda(lambda: F.linear(inp, dense), graph=True, min_ms=20)["median_us"]
            tpr = w.tiles_per_row.float()
            info["tiles_per_row"] = [float(tpr.min()), float(tpr.mean()), float(tpr.max())]
            info["tma_store_us"] = time_cuda(lambda: tile_linear(inp, w, lin.bias, tma_store=True), graph=True, min_ms=20)["median_us"]
        mats[kind] = info
        print(f"  layer0 {kind}: {info}")
    res[name] = {"kernels": top, "layer0": mats}
atomic_write_json(out_dir + "/profile.json", res)
