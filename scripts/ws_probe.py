"""Does this Triton's automatic warp specialisation (`tl.range(..., warp_specialize=True)`) run on this GPU?

Each case runs in its own process under a timeout (a deadlocked kernel cannot be interrupted from inside) and reports
ok / wrong / error / hang, with the relative error against fp32 math and the time of a launch.

    python3 scripts/ws_probe.py OUT_DIR            all cases, one line each, JSON to OUT_DIR/ws_probe.json
    python3 scripts/ws_probe.py --case NAME        one case, in this process

Cases: a control (the dense GEMM below with its loop not specialised, which must come back ok within the timeout, so
a hang is the kernel's and not the harness's); a minimal dense TMA GEMM (M=4096, N=2304, K=768, 128x128 blocks, 64-deep steps, 4 warps, 3 stages) whose K
loop is warp-specialised with a constant trip count; the same over the kept tiles of a 50% TileSparseWeight
(128x64 tiles, data-dependent trip count, the tile loop of etformer's grid kernel); and that with one empty
block-row (a zero-trip loop). Triton 3.6 compiles all three for sm_90 into producer and consumer partitions; on the
H200 all three hang (benchmarks/results/h200/ws_probe/), and so did tile_linear's grid kernel with the same loop in
every form tried (dense and 50% tiles, with and without PDL), so the grid kernel keeps its plain loop.
"""
import json
import os
import subprocess
import sys
import time

import torch

from etformer.bench.timing import env_info, time_cuda
from etformer.sparse.tiles import atomic_write_json

CASES = ["control_dense_plain_loop", "minimal_dense", "minimal_tiles", "minimal_tiles_empty_row"]


def _minimal(case):
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def k(x_desc, w_desc, y_ptr, row_ptr, col_idx, N, K, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
        pid_m = tl.program_id(0)
        r = tl.program_id(1)
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        if MODE == 0:
            for t in tl.range(0, K // BK, warp_specialize=WS):
                acc = tl.dot(x_desc.load([pid_m * BLOCK_M, t * BK]), w_desc.load([r * BN, t * BK]).T, acc)
        else:
            lo = tl.load(row_ptr + r)
            hi = tl.load(row_ptr + r + 1)
            for i in tl.range(0, hi - lo, warp_specialize=WS):
                t = lo + i
                kc = tl.load(col_idx + t)
                acc = tl.dot(x_desc.load([pid_m * BLOCK_M, kc * BK]), w_desc.load([t * BN, 0]).T, acc)
        om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        on = r * BN + tl.arange(0, BN)
        tl.store(y_ptr + om[:, None] * N + on[None, :], acc.to(tl.float16))

    from etformer.bench.kernels import random_tile_weight
    from etformer.sparse.tiles import TileSparseWeight
    M, K, N, BM, BN, BK = 4096, 768, 2304, 128, 128, 64
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    dense = case in ("minimal_dense", "control_dense_plain_loop")
    W = random_tile_weight(K, N, (BN, BK), 1.0 if dense else 0.5, torch.float16)
    if case == "minimal_tiles_empty_row":
        W[:BN] = 0
    y = torch.empty(M, N, device="cuda", dtype=torch.float16)
    xd = TensorDescriptor(x, [M, K], [K, 1], [BM, BK])
    if dense:
        wd = TensorDescriptor(W, [N, K], [K, 1], [BN, BK])
        args = (xd, wd, y, x, x, N, K, 0)
    else:
        w = TileSparseWeight.from_dense(W, (BN, BK))
        vals = w.values.view(-1, BK)
        wd = TensorDescriptor(vals, [vals.shape[0], BK], [BK, 1], [BN, BK])
        args = (xd, wd, y, w.row_ptr, w.col_idx, N, K, 1)
    run = lambda: k[(M // BM, N // BN)](*args, BLOCK_M=BM, BN=BN, BK=BK,
                         WS=case != "control_dense_plain_loop", num_warps=4, num_stages=3)  # noqa: E731
    return run, y, x.float() @ W.float().t()


def one(case):
    run, y, ref = _minimal(case)
    run()
    torch.cuda.synchronize()
    err = float((y.float() - ref).norm() / ref.norm())
    us = time_cuda(run, warmup=1, reps=20, min_ms=5)["median_us"]
    print(json.dumps({"case": case, "status": "ok" if err < 1e-2 else "wrong", "rel_err": err, "us": us}))


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    res = []
    for case in CASES:
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, timeout=30)
            last = [l for l in p.stdout.splitlines() if l.startswith("{")]
            r = json.loads(last[-1]) if last else {"case": case, "status": "error", "rc": p.returncode,
                                                   "stderr": p.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            r = {"case": case, "status": "hang (30 s)"}
        r["wall_s"] = round(time.time() - t0, 1)
        res.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "stderr"}),
              ("\n" + r["stderr"][-600:]) if "stderr" in r else "", flush=True)
    atomic_write_json(os.path.join(out_dir, "ws_probe.json"),
                      {"env": env_info(), "command": "python3 scripts/ws_probe.py " + " ".join(sys.argv[1:]),
                       "cases": res})


if __name__ == "__main__":
    if sys.argv[1] == "--case":
        one(sys.argv[2])
    else:
        main(sys.argv[1])
