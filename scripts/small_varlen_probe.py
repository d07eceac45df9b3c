"""Why a short, variable-length batch can take longer on the GPU than the full one (H200, small-batch path).

    python3 scripts/small_varlen_probe.py OUT_DIR [--paths | --fixed]

BERT-base-shaped encoder (random weights, fp16) on the packed path (check_finite off, as in the bench), B=2, S=128,
with the two sequences' lengths varied: GPU time of the graphed forward (median of CUDA-graph replays) for each, with
the kernels launched with and without programmatic dependent launch; then a per-kernel profile, launched without
PDL, of the full batch against the bench's variable-length one (66 + 127 tokens). Without PDL the engine's default
SMALL_PATH ("auto") takes cuBLAS, so the times without PDL and that profile are of the cuBLAS path.
Writes small_varlen_probe.json.

--paths: the kernel names and counts of the same two batches (and 65 + 64 tokens) with PDL (times include waits), and
their GPU time with the small-batch path forced to the kernels and to cuBLAS (encoder.SMALL_PATH). Writes
small_varlen_paths.json.

--fixed: a same-run A/B of the graphs' row rounding (encoder.GRAPH_ROW_MULTIPLE 1 against 64) on one unpadded
sequence (B=1) of each length from 120 to 256 and on the bench's two variable-length batches, packed path and padded
path. Writes small_rows_ab.json. (The version of commit e00b6e1 timed the lengths alone, before the rounding existed:
small_varlen_fixed.json.)
"""
import importlib
import os
import sys

import torch

from etformer.bench.run import model_shape
from etformer.bench.timing import env_info, profile_kernels, time_cuda
from etformer.engine import optimize
from etformer.sparse.tiles import atomic_write_json

KC = importlib.import_module("etformer.kernels._common")
E = importlib.import_module("etformer.engine.encoder")

LENGTHS = [(128, 128), (66, 127), (127, 66), (96, 97), (128, 65), (64, 64), (65, 64), (128, 1), (120, 120), (112, 128)]


def batch(lens, S=128, vocab=30522):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab - 1, (len(lens), S), generator=g).cuda()
    mask = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).long().cuda()
    return ids, mask


def profile(enc, ids, mask):
    enc._graphs.clear()
    return [[k, round(us, 1), n] for k, us, n in profile_kernels(enc.graph_replay_fn(ids, mask))]


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    enc = optimize(model_shape("bert-base").cuda(), None, dtype=torch.float16, device="cuda")
    enc.check_finite = False  # the packed path, as in the bench
    rows = []
    saved = KC.USE_PDL
    try:
        for lens in LENGTHS:
            ids, mask = batch(lens)
            row = {"lengths": lens, "tokens": sum(lens)}
            for pdl in (True, False):
                KC.USE_PDL = pdl
                enc._graphs.clear()
                row["gpu_us_pdl" if pdl else "gpu_us_no_pdl"] = time_cuda(enc.graph_replay_fn(ids, mask),
                                                                         min_ms=80)["median_us"]
            rows.append(row)
            print(f"lengths {lens} ({row['tokens']} tokens): {row['gpu_us_pdl']:.1f} us with PDL, "
                  f"{row['gpu_us_no_pdl']:.1f} without", flush=True)
        KC.USE_PDL = False
        prof = {}
        for lens in ((128, 128), (66, 127)):
            prof[str(lens)] = profile(enc, *batch(lens))
            print(f"== {lens}: " + "; ".join(f"{k[:40]} {v} us x{n}" for k, v, n in prof[str(lens)][:12]), flush=True)
    finally:
        KC.USE_PDL = saved
    atomic_write_json(os.path.join(out_dir, "small_varlen_probe.json"),
                      {"env": env_info(), "command": "python3 scripts/small_varlen_probe.py OUT_DIR", "rows": rows,
                       "profile_no_pdl": prof})


def paths(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    enc = optimize(model_shape("bert-base").cuda(), None, dtype=torch.float16, device="cuda")
    enc.check_finite = False
    res = {"env": env_info(), "command": "python3 scripts/small_varlen_probe.py OUT_DIR --paths", "rows": [],
           "profile_pdl": {}}
    saved = E.SMALL_PATH
    try:
        for lens in ((128, 128), (66, 127), (65, 64)):
            ids, mask = batch(lens)
            for path in ("auto", "triton", "cublas"):
                E.SMALL_PATH = path
                enc._graphs.clear()
                t = time_cuda(enc.graph_replay_fn(ids, mask), min_ms=80)["median_us"]
                res["rows"].append({"lengths": lens, "small_path": path, "gpu_us": t})
                print(f"lengths {lens} SMALL_PATH={path}: {t:.1f} us", flush=True)
            E.SMALL_PATH = saved
            res["profile_pdl"][str(lens)] = profile(enc, ids, mask)
            print(f"== {lens}: " + "; ".join(f"{k[:40]} {v} us x{n}" for k, v, n in res["profile_pdl"][str(lens)][:14]),
                  flush=True)
    finally:
        E.SMALL_PATH = saved
    atomic_write_json(os.path.join(out_dir, "small_varlen_paths.json"), res)


def fixed(out_dir):
    """Before the row rounding (GRAPH_ROW_MULTIPLE = 1) against after (64), same run: one sequence of each length
    with no padding, and the bench's two variable-length batches; packed path (check off) and padded path (check
    on, the default)."""
    os.makedirs(out_dir, exist_ok=True)
    enc = optimize(model_shape("bert-base").cuda(), None, dtype=torch.float16, device="cuda")
    rows = []
    saved = E.GRAPH_ROW_MULTIPLE
    cases = [[S] for S in (120, 128, 129, 136, 160, 192, 193, 208, 224, 255, 256)] + [[66, 127], [213]]
    try:
        for lens in cases:
            S = max(128, max(lens)) if len(lens) > 1 else (256 if lens == [213] else lens[0])
            ids, mask = batch(lens, S=S)
            row = {"lengths": lens, "S": S}
            for mult in (1, 64):
                for check in (False, True):
                    E.GRAPH_ROW_MULTIPLE, enc.check_finite = mult, check
                    enc._graphs.clear()
                    out = enc(ids, mask).last_hidden_state
                    row[f"gpu_us_rows{mult}_{'padded' if check else 'packed'}"] = t = time_cuda(
                        enc.graph_replay_fn(ids, mask), min_ms=60)["median_us"]
                    if mult == 1 and not check:
                        ref = out.float()
                    row[f"max_abs_diff_rows{mult}_{'padded' if check else 'packed'}"] = d = (
                        out.float() - ref).abs().max().item()
                    print(f"lengths {lens} S={S} rows x{mult} {'padded' if check else 'packed'}: {t:.1f} us "
                          f"(max|diff| {d:.1e})", flush=True)
            rows.append(row)
    finally:
        E.GRAPH_ROW_MULTIPLE, enc.check_finite = saved, True
    atomic_write_json(os.path.join(out_dir, "small_rows_ab.json"),
                      {"env": env_info(), "command": "python3 scripts/small_varlen_probe.py OUT_DIR --fixed",
                       "rows": rows})


if __name__ == "__main__":
    mode = next((a for a in sys.argv[2:] if a.startswith("--")), "")
    {"--paths": paths, "--fixed": fixed}.get(mode, main)(sys.argv[1])
