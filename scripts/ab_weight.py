"""Same-process A/B: the engine's layer-0 FFN-in tile weight against a synthetic one of the same shape and density."""
import copy
import torch
import torch.nn.functional as F
from etformer.bench.kernels import random_tile_weight
from etformer.bench.run import model_shape
from etformer.bench.timing import time_cuda
from etformer.engine import optimize
from etformer.kernels.tile_linear import tile_linear
from etformer.pruning import PruningPlan
from etformer.pruning.recipe import hard_masks
from etformer.sparse import TileSparseWeight

base = model_shape("bert-base").cuda()
plan = PruningPlan.uniform("tile_balanced", 0.5, (128, 64))
m = copy.deepcopy(base)
with torch.no_grad():
    for p, mk in hard_masks(m, plan).values():
        p.mul_(mk)
enc = optimize(m, plan, dtype=torch.float16, device="cuda")
L = enc.layers[0]
for M in (4096, 16384):
    x = torch.randn(M, 768, device="cuda", dtype=torch.float16)
    we = L.ffn_in.sparse
    ws = TileSparseWeight.from_dense(random_tile_weight(768, 3072, (128, 64), 0.5, torch.float16), (128, 64))
    wd = torch.randn(3072, 768, device="cuda", dtype=torch.float16)
    wsmall = TileSparseWeight.from_dense(ws.to_dense().ne(0).half() * 0.02 * torch.randn_like(wd), (128, 64))
    wbig = TileSparseWeight.from_dense(we.to_dense().ne(0).half() * torch.randn_like(wd) / 27.7, (128, 64))
    r = {}
    for rep in range(2):
        r[f"cublas{rep}"] = time_cuda(lambda: F.linear(x, wd), graph=True, min_ms=30)["median_us"]
        r[f"engine_w{rep}"] = time_cuda(lambda: tile_linear(x, we), graph=True, min_ms=30)["median_us"]
        r[f"engine_w_bias{rep}"] = time_cuda(lambda: tile_linear(x, we, L.ffn_in.bias), graph=True, min_ms=30)["median_us"]
        r[f"synthetic_w{rep}"] = time_cuda(lambda: tile_linear(x, ws), graph=True, min_ms=30)["median_us"]
        r[f"small_vals_synth_pattern{rep}"] = time_cuda(lambda: tile_linear(x, wsmall), graph=True, min_ms=30)["median_us"]
        r[f"engine_pattern_big_vals{rep}"] = time_cuda(lambda: tile_linear(x, wbig), graph=True, min_ms=30)["median_us"]
    print(M, {k: round(v, 1) for k, v in r.items()}, "vals", we.values.abs().mean().item(), ws.values.abs().mean().item())
