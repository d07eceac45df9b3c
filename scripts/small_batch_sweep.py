"""Launch sweep of the small-batch kernel path with PDL and the L2 weight prefetch, on a GPU.

    python3 scripts/small_batch_sweep.py OUT_DIR [--deep [--tiles 32x128,64x64] [--launches 64:4:4,64:4:3]
                                                         [--name small_batch_deep] [--shapes 1x64,1x128]
                                                         [--bucket 128]]

BERT-base-shaped encoder (random weights, fp16), GPU time of one graphed forward (median of CUDA-graph replays), at
B x S in {1x128, 1x256, 2x128, 1x512}. For every combination of: which programs issue the prefetch (the first row
block's or all), the split-K program target of the partial sums (tile_linear.SPLIT_TARGET_PROGRAMS) and the
dense-weight launch at up to 128 rows (tile_linear.DENSE_LAUNCH[128]), the kernels (SMALL_PATH="triton") are timed
beside cuBLAS (SMALL_PATH="cublas") in the same process. Writes small_batch_sweep.json.

--deep: with the prefetch from the first row block and the tabled split target, sweep the dense-weight block and
launch of one row bucket (tile_linear.DENSE_TILE[bucket]: BN x BK, DENSE_LAUNCH[bucket]; --bucket 128 or 256) at
B x S = 1 x bucket, every output checked against the current defaults'; the five best are re-timed beside the
defaults at --shapes (default 2x128, 1x256, 1x128). Writes NAME.json (default small_batch_deep.json).
"""
import importlib
import itertools
import os
import sys

import torch

from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, graphed_forward
from etformer.engine import encoder as E
from etformer.engine import optimize
from etformer.sparse.tiles import atomic_write_json

TL = importlib.import_module("etformer.kernels.tile_linear")
KC = importlib.import_module("etformer.kernels._common")

SHAPES = [(1, 128), (1, 256), (2, 128), (1, 512)]
ALL_BLOCKS = (False, True)
SPLIT_TARGETS = (32, 64, 128)
LAUNCH_128 = ((64, 4, 4), (128, 4, 4), (64, 4, 3))


def _arg(name, default, parse):
    return [parse(v) for v in sys.argv[sys.argv.index(name) + 1].split(",")] if name in sys.argv else default


DEEP_TILES = _arg("--tiles", [(64, 64), (64, 128), (32, 128), (128, 64)], lambda v: tuple(map(int, v.split("x"))))
DEEP_LAUNCH = _arg("--launches", [(64, 4, 4), (64, 4, 5), (64, 4, 6), (64, 4, 8), (64, 8, 6), (128, 8, 5)],
                   lambda v: tuple(map(int, v.split(":"))))
DEEP_SHAPES = _arg("--shapes", [(2, 128), (1, 256), (1, 128)], lambda v: tuple(map(int, v.split("x"))))
DEEP_NAME = _arg("--name", ["small_batch_deep"], str)[0]
BUCKET = _arg("--bucket", [128], int)[0]


def gpu_us(enc, ids, mask):
    return graphed_forward(enc, ids, mask)[1]


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


def deep(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    saved = (E.SMALL_PATH, KC.USE_PDL, dict(TL.DENSE_TILE), dict(TL.DENSE_LAUNCH))
    enc = optimize(model_shape("bert-base").cuda(), None, dtype=torch.float16, device="cuda")
    enc.sync_free_max_tokens = 0  # the packed path, as in the bench's B=1 figure
    rows = []
    default = (TL.DENSE_TILE[BUCKET], TL.DENSE_LAUNCH[BUCKET])
    ref = {}

    def timed(B, S, tile, launch, cub):
        """GPU time of one configuration, and its output's largest difference from the default configuration's."""
        TL.DENSE_TILE[BUCKET], TL.DENSE_LAUNCH[BUCKET] = tile, launch
        ids, mask = make_inputs(B, S, False, 30522)
        err = t = None
        try:
            out, t = graphed_forward(enc, ids, mask)
            if (B, S) not in ref:
                assert (tile, launch) == default, "the default configuration runs first at every shape"
                ref[(B, S)] = out
            err = (out - ref[(B, S)]).abs().max().item()
        except Exception as e:  # a launch that does not fit (shared memory) is recorded, not fatal
            print(f"B={B} S={S} tile={tile} launch={launch}: {type(e).__name__}: {str(e)[:100]}", flush=True)
        rows.append({"B": B, "S": S, "bucket": BUCKET, "dense_tile": tile, "launch": launch, "gpu_us": t,
                     "cublas_gpu_us": cub,
                     "max_abs_diff_vs_default": err, "default": (tile, launch) == default})
        if t:
            print(f"B={B} S={S} tile={tile} launch={launch}: {t:6.1f} us (cuBLAS {cub:6.1f}, x{cub / t:.2f}) "
                  f"max|diff| vs default {err:.2e}", flush=True)
        return t

    def cublas(B, S):
        E.SMALL_PATH = "cublas"
        c = gpu_us(enc, *make_inputs(B, S, False, 30522))
        E.SMALL_PATH = "triton"
        return c

    try:
        KC.USE_PDL = True
        cub = cublas(1, BUCKET)
        timed(1, BUCKET, *default, cub)
        for tile, launch in itertools.product(DEEP_TILES, DEEP_LAUNCH):
            if (tile, launch) != default:
                timed(1, BUCKET, tile, launch, cub)
        best = sorted((r for r in rows if r["gpu_us"]), key=lambda r: r["gpu_us"])[:5]
        for B, S in DEEP_SHAPES:
            cub = cublas(B, S)
            for cand in [default] + [(r["dense_tile"], r["launch"]) for r in best if
                                     (r["dense_tile"], r["launch"]) != default]:
                timed(B, S, *cand, cub)
    finally:
        E.SMALL_PATH, KC.USE_PDL, tiles, launch = saved
        TL.DENSE_TILE.update(tiles)
        TL.DENSE_LAUNCH.update(launch)
    res = {"env": env_info(), "command": "python3 scripts/small_batch_sweep.py OUT_DIR " + " ".join(sys.argv[2:]),
           "bucket": BUCKET, "default": {"dense_tile": default[0], "launch": default[1]}, "rows": rows}
    atomic_write_json(os.path.join(out_dir, DEEP_NAME + ".json"), res)


if __name__ == "__main__":
    (deep if "--deep" in sys.argv else main)(sys.argv[1])
