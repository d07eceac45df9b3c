"""Operator benchmarks on the GPU, each side by side with its peer in one process.

    python -m etformer.bench.kernels --out DIR [--quick]

Tile-sparse linear at BERT-base shapes (d=768, FFN 3072) against cuBLAS dense (F.linear) and torch's block-sparse
path (to_sparse_bsr + F.linear) with the same mask; attention against SDPA (flash backend), fixed and variable
length. Writes kernels.json and kernels.md.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

from ..kernels.attention import attention, attention_flops
from ..kernels.tile_linear import flops as tl_flops
from ..kernels.tile_linear import min_bytes, tile_linear
from ..sparse.tiles import TileSparseWeight, atomic_write_json, atomic_write_text
from .timing import env_info, floor_us, measure_peaks, time_cuda

SHAPES = {"qkv": (768, 2304), "ffn_in": (768, 3072), "ffn_out": (3072, 768)}


def random_tile_weight(K, N, tile, density, dtype, balanced=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nbr, nbc = N // tile[0], K // tile[1]
    if balanced:  # every block-row keeps the same count (the tile_balanced pattern)
        k = max(0, round(density * nbc))
        scores = torch.rand(nbr, nbc, device="cuda", generator=g)
        keep = torch.zeros(nbr, nbc, dtype=torch.bool, device="cuda")
        if k:
            keep.scatter_(1, scores.topk(k, dim=1).indices, True)
    else:
        keep = torch.rand(nbr, nbc, device="cuda", generator=g) < density
    W = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float32).to(dtype) / math.sqrt(K)
    W = W * keep.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1).to(dtype)
    return W


def bench_linear(peaks, Ms, tiles, densities, shapes, dtype=torch.float16, per_graph=1):
    rows = []
    for name, (K, N) in shapes.items():
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            Wd = torch.randn(N, K, device="cuda", dtype=dtype) / math.sqrt(K)
            dense = time_cuda(lambda: F.linear(x, Wd), graph=True, per_graph=per_graph)
            for tile in tiles:
                for d in densities:
                    W = random_tile_weight(K, N, tile, d, dtype)
                    w = TileSparseWeight.from_dense(W, tile)
                    y = tile_linear(x, w)
                    ref = F.linear(x.float(), W.float())
                    err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)) if d > 0 else float((y.float() - ref).abs().max())
                    ours = time_cuda(lambda: tile_linear(x, w), graph=True, per_graph=per_graph)
                    bsr = {"median_us": None, "error": None}
                    try:
                        Wb = W.to_sparse_bsr(tile)
                        F.linear(x, Wb)
                        bsr = time_cuda(lambda: F.linear(x, Wb), graph=False, reps=20, min_ms=50)
                    except Exception as e:  # recorded, not fatal
                        bsr = {"median_us": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                    fl = floor_us(tl_flops(M, w), min_bytes(M, w), peaks)
                    rows.append({"op": "tile_linear", "matrix": name, "M": M, "K": K, "N": N, "tile": f"{tile[0]}x{tile[1]}",
                                 "density": d, "ours_us": ours["median_us"], "ours_p10_us": ours["p10_us"],
                                 "ours_p90_us": ours["p90_us"], "cublas_dense_us": dense["median_us"],
                                 "bsr_us": bsr.get("median_us"), "bsr_error": bsr.get("error"),
                                 "speedup_vs_cublas": dense["median_us"] / ours["median_us"],
                                 "speedup_vs_bsr": (bsr["median_us"] / ours["median_us"]) if bsr.get("median_us") else None,
                                 "floor_us": fl, "frac_of_floor": fl / ours["median_us"], "rel_err": err})
                    print(f"linear {name:7s} M={M:6d} tile={tile} d={d:.2f}: ours {ours['median_us']:8.1f} us  "
                          f"cuBLAS {dense['median_us']:8.1f}  x{dense['median_us'] / ours['median_us']:.2f}  "
                          f"bsr {bsr.get('median_us') or float('nan'):8.1f}  floor {fl:6.1f}  err {err:.1e}", flush=True)
    return rows


def bench_attention(peaks, cases, H=12, D=64, dtype=torch.float16, per_graph=1):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for B, S, varlen in cases:
        g = torch.Generator().manual_seed(B * 1000 + S)
        lens = (torch.randint(1, S + 1, (B,), generator=g).tolist() if varlen else [S] * B)
        T = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        qkv = torch.randn(T, 3 * H * D, device="cuda", dtype=dtype)
        out = torch.empty(T, H * D, device="cuda", dtype=dtype)
        ours = time_cuda(lambda: attention(qkv, cu, max(lens), H, D, out=out), graph=True, per_graph=per_graph)
        q = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
        k, v = torch.randn_like(q), torch.randn_like(q)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            peer = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v), graph=True, per_graph=per_graph)
        fl = floor_us(attention_flops(lens, H, D), 2 * T * 4 * H * D, peaks)
        # correctness on this very input, against fp32 math
        from ..kernels.attention import attention_reference

        idx = 0 if B == 1 else 1
        ref = attention_reference(qkv[: int(cu[idx + 1])].float(), cu[: idx + 2], H, D)
        err = float((out[: ref.shape[0]].float() - ref).norm() / ref.norm())
        rows.append({"op": "attention", "B": B, "S": S, "varlen": varlen, "mean_len": T / B, "H": H, "D": D,
                     "ours_us": ours["median_us"], "ours_p10_us": ours["p10_us"], "ours_p90_us": ours["p90_us"],
                     "sdpa_flash_us": peer["median_us"], "speedup_vs_sdpa": peer["median_us"] / ours["median_us"],
                     "floor_us": fl, "frac_of_floor": fl / ours["median_us"], "rel_err": err})
        print(f"attention B={B:3d} S={S:4d} varlen={varlen!s:5s}: ours {ours['median_us']:8.1f} us  "
              f"SDPA flash (padded) {peer['median_us']:8.1f}  x{peer['median_us'] / ours['median_us']:.2f}  "
              f"floor {fl:6.1f}  err {err:.1e}", flush=True)
    return rows


def replay_floor(per_graph: int) -> dict:
    """µs a call of a trivial kernel (one 4-byte add) in graphs of 1 and of per_graph calls."""
    t = torch.zeros(1, device="cuda")
    return {str(r): time_cuda(lambda: t.add_(1.0), graph=True, per_graph=r, min_ms=50)["median_us"]
            for r in sorted({1, per_graph})}


def to_markdown(res: dict) -> str:
    e = res["env"]
    lines = [f"# etformer kernels on {e['gpu']}", "",
             f"torch {e['torch']}, Triton {e['triton']}, CUDA {e['cuda']}, {e['date']}. "
             f"Measured peaks this run: {res['peaks']['matmul_tflops']:.0f} TFLOP/s fp16 matmul, "
             f"{res['peaks']['copy_tbs']:.2f} TB/s copy.", "", f"Command: `{res['command']}`", "",
             f"Times are medians of CUDA-event-timed CUDA-graph replays (µs), each replay {res['per_graph']} "
             f"back-to-back calls of the operation, divided by {res['per_graph']}; etformer's kernels launched "
             f"{'with' if res['pdl'] else 'without'} programmatic dependent launch. A graph of one trivial kernel "
             f"replays in {res['replay_floor']['1']:.1f} µs when it holds one call and "
             f"{res['replay_floor'][str(res['per_graph'])]:.1f} µs a call when it holds {res['per_graph']}: the "
             "host's submission cost, which one-call graphs would add to every short operation. Speed-ups are "
             "ratios measured side by side in this process. Floor = max(FLOPs / peak, bytes / bandwidth) with the "
             "peaks above.", "",
             "## Tile-sparse linear (fp16, X[M,K] · W[N,K]ᵀ)", "",
             "| matrix | M | tile | density | etformer µs | cuBLAS dense µs | × cuBLAS | BSR µs | × BSR | floor µs | % floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["linear"]:
        bsr = f"{r['bsr_us']:.1f}" if r["bsr_us"] else "failed"
        sb = f"{r['speedup_vs_bsr']:.2f}" if r["speedup_vs_bsr"] else "–"
        lines.append(f"| {r['matrix']} | {r['M']} | {r['tile']} | {r['density']:.2f} | {r['ours_us']:.1f} | "
                     f"{r['cublas_dense_us']:.1f} | {r['speedup_vs_cublas']:.2f} | {bsr} | {sb} | {r['floor_us']:.1f} | "
                     f"{100 * r['frac_of_floor']:.0f}% |")
    lines += ["", "## Attention (fp16, 12 heads of 64)", "",
              "| B | S | varlen (mean len) | etformer µs | SDPA flash (padded) µs | × SDPA | floor µs | % floor |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["attention"]:
        vl = f"yes ({r['mean_len']:.0f})" if r["varlen"] else "no"
        lines.append(f"| {r['B']} | {r['S']} | {vl} | {r['ours_us']:.1f} | {r['sdpa_flash_us']:.1f} | "
                     f"{r['speedup_vs_sdpa']:.2f} | {r['floor_us']:.1f} | {100 * r['frac_of_floor']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiles", default="16x16,32x32,64x64")
    ap.add_argument("--densities", default="1.0,0.5,0.25")
    ap.add_argument("--ms", default="128,4096,16384")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--per-graph", type=int, default=20,
                    help="calls of the operation in each timed CUDA graph (1: one call a graph)")
    ap.add_argument("--pdl", action="store_true",
                    help="launch etformer's kernels with programmatic dependent launch (off: each call waits for the "
                         "previous one, as the peers' kernels do)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("etformer.bench.kernels needs a CUDA GPU; nothing was timed.")
        return 1
    tiles = [tuple(int(v) for v in t.split("x")) for t in a.tiles.split(",")]
    dens = [float(v) for v in a.densities.split(",")]
    Ms = [int(v) for v in a.ms.split(",")]
    shapes = {"ffn_in": SHAPES["ffn_in"]} if a.quick else SHAPES
    if a.per_graph < 1:
        ap.error("--per-graph must be at least 1")
    from ..kernels import _common
    _common.USE_PDL = a.pdl
    peaks = measure_peaks()
    print(f"peaks: {peaks}", flush=True)
    res = {"env": env_info(), "peaks": peaks, "command": "python -m etformer.bench.kernels " + " ".join(argv or sys.argv[1:]),
           "per_graph": a.per_graph, "pdl": a.pdl, "replay_floor": replay_floor(a.per_graph)}
    print(f"replay of a trivial kernel, us a call by calls a graph: {res['replay_floor']}", flush=True)
    res["linear"] = [] if a.skip_linear else bench_linear(peaks, Ms, tiles, dens, shapes, per_graph=a.per_graph)
    cases = [(32, 128, False), (64, 128, False), (128, 128, False), (32, 384, False), (32, 512, False),
             (1, 128, False), (8, 512, False), (32, 128, True), (32, 384, True), (32, 512, True)]
    res["attention"] = [] if a.skip_attention else bench_attention(peaks, cases, per_graph=a.per_graph)
    os.makedirs(a.out, exist_ok=True)

    atomic_write_json(os.path.join(a.out, "kernels.json"), res)
    md = to_markdown(res)

    atomic_write_text(os.path.join(a.out, "kernels.md"), md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
