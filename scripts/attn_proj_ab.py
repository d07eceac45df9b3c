"""Attention fused with the output projection on the small-batch path: launch sweep, same-run A/B, and two probes.

    python3 scripts/attn_proj_ab.py OUT_DIR [--no-sweep]

BERT-base-shaped encoder (random weights, fp16), GPU time of one graphed forward (median of CUDA-graph replays):

1. sweep: attention_proj.GPU_LAUNCH (rows a program, column chunks, projection step, warps) at B=1, S=128 and 256 on
   the packed path, each output's largest difference from the unfused path's;
2. A/B: encoder.ATTN_PROJ off and on (the sweep's best launch) at B x S in 1x32, 1x64, 1x128, 2x128, 1x256 on the
   packed path (check_finite off, as in the bench) and at 1x128, 2x128 and 66 + 127 tokens on the padded path (the
   default with the finite check); the cuBLAS small path (encoder.SMALL_PATH = "cublas") beside them;
3. rows: the graphs' row rounding (encoder.GRAPH_ROW_MULTIPLE 64 against 1) on the padded path, one full sequence of
   each length in LENGTHS, with the A/B's winner;
4. floor: a chain of N trivial kernels (wait for the previous one, one store), N = 12 layers x 6 or 7 launches,
   captured in a CUDA graph, with and without programmatic dependent launch: what a launch costs by itself.

Writes attn_proj_ab.json.
"""
import importlib
import itertools
import os
import sys

import torch

from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, graphed_forward as timed, time_cuda
from etformer.engine import optimize
from etformer.sparse.tiles import atomic_write_json

E = importlib.import_module("etformer.engine.encoder")
AP = importlib.import_module("etformer.kernels.attention_proj")
KC = importlib.import_module("etformer.kernels._common")

SWEEP = [dict(BM=bm, NCH=nch, BNO=bno, num_warps=w, num_stages=2)
         for bm, nch, bno, w in itertools.product((32, 64), (2, 3, 4, 6), (64, 128), (4, 8))]
AB_PACKED = [(1, 32), (1, 64), (1, 128), (2, 128), (1, 256)]
LENGTHS = [72, 88, 96, 104, 112, 120, 129, 136, 152, 160, 168, 176, 184, 193, 213, 240, 255]


def varlen(lens, S=128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30521, (len(lens), S), generator=g).cuda()
    return ids, (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).long().cuda()


def launch_floor(n_launches=(72, 84), programs=132):
    import triton
    import triton.language as tl

    @triton.jit
    def _noop(x_ptr, PDL: tl.constexpr):
        KC.pdl_enter(PDL)
        tl.store(x_ptr + tl.program_id(0), tl.program_id(0))

    x = torch.zeros(programs, dtype=torch.int32, device="cuda")
    rows = []
    for n, pdl in itertools.product(n_launches, (True, False)):
        def chain():
            for _ in range(n):
                _noop[(programs,)](x, PDL=pdl, **KC.pdl_kwargs(pdl))
        t = time_cuda(chain, graph=True, min_ms=80)["median_us"]
        rows.append({"launches": n, "pdl": pdl, "programs": programs, "gpu_us": t, "us_per_launch": t / n})
        print(f"floor: {n} trivial launches, PDL={pdl}: {t:.1f} us ({t / n:.2f} a launch)", flush=True)
    return rows


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    enc = optimize(model_shape("bert-base").cuda(), None, dtype=torch.float16, device="cuda")
    saved = (E.ATTN_PROJ, E.SMALL_PATH, E.GRAPH_ROW_MULTIPLE, dict(AP.GPU_LAUNCH), enc.check_finite)
    res = {"env": env_info(), "command": "python3 scripts/attn_proj_ab.py OUT_DIR " + " ".join(sys.argv[2:]),
           "default_launch": dict(AP.GPU_LAUNCH), "sweep": [], "ab": [], "rows": [], "floor": []}
    try:
        E.SMALL_PATH = "triton"
        enc.check_finite = False
        refs = {}
        for S in (128, 256):  # unfused reference outputs and times
            E.ATTN_PROJ = False
            refs[S] = timed(enc, *make_inputs(1, S, False, 30522))
        best = dict(AP.GPU_LAUNCH)
        if "--no-sweep" not in sys.argv:
            E.ATTN_PROJ = True
            for cfg in SWEEP:
                AP.GPU_LAUNCH.clear()
                AP.GPU_LAUNCH.update(cfg)
                row = dict(cfg)
                for S in (128, 256):
                    try:
                        out, t = timed(enc, *make_inputs(1, S, False, 30522))
                        row[f"gpu_us_1x{S}"] = t
                        row[f"max_abs_diff_1x{S}"] = (out - refs[S][0]).abs().max().item()
                    except Exception as e:  # a launch that does not fit is recorded, not fatal
                        row[f"error_1x{S}"] = f"{type(e).__name__}: {str(e)[:160]}"
                res["sweep"].append(row)
                print(f"sweep {cfg}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in row.items() if k not in cfg), flush=True)
            ok = [r for r in res["sweep"] if "gpu_us_1x128" in r and "gpu_us_1x256" in r]
            top = min(ok, key=lambda r: r["gpu_us_1x128"] + r["gpu_us_1x256"])
            best = {k: top[k] for k in saved[3]}
        AP.GPU_LAUNCH.clear()
        AP.GPU_LAUNCH.update(best)
        res["best_launch"] = best
        print(f"unfused: 1x128 {refs[128][1]:.1f} us, 1x256 {refs[256][1]:.1f} us; best launch {best}", flush=True)

        cases = [("packed", (B, S), make_inputs(B, S, False, 30522)) for B, S in AB_PACKED]
        cases += [("padded", (1, 128), make_inputs(1, 128, False, 30522)),
                  ("padded", (2, 128), make_inputs(2, 128, False, 30522)),
                  ("padded", (66, 127), varlen([66, 127]))]
        for path, shape, (ids, mask) in cases:
            enc.check_finite = path == "padded"
            E.SMALL_PATH = "cublas"
            _, cub = timed(enc, ids, mask)
            E.SMALL_PATH = "triton"
            got = {}
            for on in (False, True, False, True):  # twice each, interleaved
                E.ATTN_PROJ = on
                out, t = timed(enc, ids, mask)
                got.setdefault(on, []).append((out, t))
            diff = (got[True][0][0] - got[False][0][0]).abs().max().item()
            row = {"path": path, "shape": shape, "off_us": [t for _, t in got[False]],
                   "on_us": [t for _, t in got[True]], "cublas_path_us": cub, "max_abs_diff": diff}
            res["ab"].append(row)
            print(f"A/B {path} {shape}: off {row['off_us']} on {row['on_us']} (cuBLAS path {cub:.1f}) "
                  f"max|diff| {diff:.2e}", flush=True)
        on_wins = sum(min(r["on_us"]) < min(r["off_us"]) for r in res["ab"]) * 2 > len(res["ab"])
        E.ATTN_PROJ = on_wins
        res["rows_attn_proj"] = on_wins

        enc.check_finite = True  # the padded path
        for L in LENGTHS:
            ids, mask = make_inputs(1, L, False, 30522)
            t = {}
            for m in (1, 64, 1, 64):
                E.GRAPH_ROW_MULTIPLE = m
                t.setdefault(m, []).append(timed(enc, ids, mask)[1])
            res["rows"].append({"tokens": L, "exact_us": t[1], "rounded_us": t[64]})
            print(f"rows padded 1x{L} (last block {L % 64} of 64): exact {t[1]} rounded {t[64]}", flush=True)
        res["floor"] = launch_floor()
    finally:
        E.ATTN_PROJ, E.SMALL_PATH, E.GRAPH_ROW_MULTIPLE, launch, enc.check_finite = saved
        AP.GPU_LAUNCH.clear()
        AP.GPU_LAUNCH.update(launch)
    atomic_write_json(os.path.join(out_dir, "attn_proj_ab.json"), res)


if __name__ == "__main__":
    main(sys.argv[1])
