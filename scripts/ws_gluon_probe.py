"""Which part of the warp-specialised Gluon tile kernel fails on this GPU: one case a process (run each under timeout).

    python3 scripts/ws_gluon_probe.py CASE

CASE: "ws_copy" (a minimal Gluon warp_specialize: a 1-warp partition signals an mbarrier that the default partition
waits on, then copies a block), or "kernel:M:density:BLOCK_M:STAGES:CONSUMERS:PER_SM[:maxnreg]" (tile_linear_ws on a
BERT-base QKV-shaped 128x64-tile weight, fp16, bias, no activation; maxnreg overrides the launch's; the
environment's WS_AHEAD sets tile_linear_ws.WS_AHEAD). Prints one JSON
line: the case, ok, relative error or the error.
"""
import json
import os
import sys

import torch


def ws_copy():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    @gluon.jit
    def _signal(bar, flag_ptr):
        gl.store(flag_ptr, 1)
        mbarrier.arrive(bar)

    @gluon.jit
    def _copy(bar, src, dst, BLOCK: gl.constexpr):
        mbarrier.wait(bar, 0)
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        offs = gl.arange(0, BLOCK, layout=layout)
        gl.store(dst + offs, gl.load(src + offs))

    @gluon.jit
    def kernel(src, dst, flag_ptr, BLOCK: gl.constexpr):
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=1)
        gl.warp_specialize([(_copy, (bar, src, dst, BLOCK)), (_signal, (bar, flag_ptr))], [1], [24])

    src = torch.arange(512, device="cuda", dtype=torch.float32)
    dst = torch.zeros_like(src)
    flag = torch.zeros(1, device="cuda", dtype=torch.int32)
    kernel[(1,)](src, dst, flag, BLOCK=512, num_warps=4)
    torch.cuda.synchronize()
    return float((dst - src).abs().max()), int(flag.item())


def kernel_case(M, d, bm, st, cons, per_sm, maxnreg=None):
    from etformer.bench.kernels import random_tile_weight
    from etformer.kernels import tile_linear_ws as W
    from etformer.sparse.tiles import TileSparseWeight
    if maxnreg is not None:
        W._maxnreg = lambda consumers: maxnreg
    W.WS_AHEAD = int(os.environ.get("WS_AHEAD", W.WS_AHEAD))
    Wt = random_tile_weight(768, 2304, (128, 64), d, torch.float16, seed=1)
    w = TileSparseWeight.from_dense(Wt, (128, 64))
    x = torch.randn(M, 768, device="cuda", dtype=torch.float16)
    b = torch.randn(2304, device="cuda", dtype=torch.float16)
    y = W.tile_linear_ws(x, w, b, config=(bm, st, cons, per_sm))
    torch.cuda.synchronize()
    ref = x.float() @ Wt.float().t() + b.float()
    return float((y.float() - ref).norm() / ref.norm())


if __name__ == "__main__":
    case = sys.argv[1]
    try:
        if case == "ws_copy":
            res = ws_copy()
        else:
            parts = case.split(":")[1:]
            args = [int(parts[0]), float(parts[1])] + [int(p) for p in parts[2:]]
            res = kernel_case(*args)
        print(json.dumps({"case": case, "ahead": os.environ.get("WS_AHEAD"), "ok": True, "result": res}))
    except Exception as e:
        print(json.dumps({"case": case, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}))
