"""Launch sweep of the small-batch kernel path with PDL and the L2 weight prefetch, on a GPU.

    python3 scripts/small_batch_sweep.py OUT_DIR

BERT-base-shaped encoder (random weights, fp16), GPU time of one graphed forward (median of CUDA-graph replays), at
B x S in {1x128, 1x256, 2x128, 1x512}. For every combination of: which programs issue the prefetch (the first row
block's or all), the split-K program target of the partial sums (tile_linear.SPLIT_TARGET_PROGRAMS) and the
dense-weight launch at up to 128 rows (tile_linear.DENSE_LAUNCH[128]), the kernels (SMALL_PATH="triton") are timed
beside cuBLAS (SMALL_PATH="cublas") in the same process. Writes small_batch_sweep.json.
"""
import importlib
import itertools
import os
import sys

import torch

from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, time_cuda
from etformer.engine import encoder as E
from etformer.engine import optimize
from etformer.sparse.tiles import atomic_write_json

TL = importlib.import_module("etformer.kernels.tile_linear")
KC = importlib.import_module("etformer.kernels._common")

SHAPES = [(1, 128), (1, 256), (2, 128), (1, 512)]
ALL_BLOCKS = (False, True)
SPLIT_TARGETS = (32, 64, 128)
LAUNCH_128 = ((64, 4, 4), (128, 4, 4), (64, 4, 3))


def gpu_us(enc, ids, mask):
    enc._graphs.clear()
    return time_cuda(enc.graph_replay_fn(ids, mask), min_ms=80)["median_us"]


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    saved = (E.SMALL_PATH, KC.USE_PDL, TL.PREFETCH_MAX_ROWS, TL.PREFETCH_ALL_BLOCKS, TL.SPLIT_TARGET_PROGRAMS,
             dict(TL.DENSE_LAUNCH))
    enc = optimize(model_shape("bert-base").cuda(), None, dtype=torch.float16, device="cuda")
    rows = []
    try:
        KC.USE_PDL, TL.PREFETCH_MAX_ROWS = True, 1 << 30
        for B, S in SHAPES:
            ids, mask = make_inputs(B, S, False, 30522)
            E.SMALL_PATH = "cublas"
            cub = gpu_us(enc, ids, mask)
            E.SMALL_PATH = "triton"
            for all_blocks, target, launch in itertools.product(ALL_BLOCKS, SPLIT_TARGETS, LAUNCH_128):
                TL.PREFETCH_ALL_BLOCKS, TL.SPLIT_TARGET_PROGRAMS = all_blocks, target
                TL.DENSE_LAUNCH[128] = launch
                t = gpu_us(enc, ids, mask)
                rows.append({"B": B, "S": S, "prefetch_all_blocks": all_blocks, "split_target": target,
                             "launch_128": launch, "gpu_us": t, "cublas_gpu_us": cub})
                print(f"B={B} S={S} all_blocks={all_blocks!s:5} split_target={target:3d} launch128={launch}: "
                      f"{t:6.1f} us (cuBLAS {cub:6.1f}, x{cub / t:.2f})", flush=True)
            best = min((r for r in rows if (r["B"], r["S"]) == (B, S)), key=lambda r: r["gpu_us"])
            print(f"best B={B} S={S}: {best['gpu_us']:.1f} us vs cuBLAS {cub:.1f}", flush=True)
    finally:
        (E.SMALL_PATH, KC.USE_PDL, TL.PREFETCH_MAX_ROWS, TL.PREFETCH_ALL_BLOCKS, TL.SPLIT_TARGET_PROGRAMS,
         launch) = saved
        TL.DENSE_LAUNCH.clear()
        TL.DENSE_LAUNCH.update(launch)
    res = {"env": env_info(), "command": "python3 scripts/small_batch_sweep.py OUT_DIR", "rows": rows}

    atomic_write_json(os.path.join(out_dir, "small_batch_sweep.json"), res)


if __name__ == "__main__":
    main(sys.argv[1])
