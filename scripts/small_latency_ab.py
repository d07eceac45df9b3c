"""Latency of the small-batch path, operator by operator: two same-run A/Bs and a profile, on a GPU.

    python3 scripts/small_latency_ab.py OUT_DIR [--bias]

BERT-base-shaped encoder (random weights, fp16), packed path (check_finite off, as in the bench), GPU time of one
graphed forward (median of CUDA-graph replays) at B x S in 1x32, 1x64, 1x128, 2x128, 1x256:

1. add+LayerNorm: the kernel as shipped (every load issued up front: the split-K partial sums unrolled, the
   parameters before the PDL wait) against the previous form (a run-time loop over the partial sums, then the bias
   and the residual, the LayerNorm weights after the statistics), defined here and swapped in;
2. attention: the one-pass kernel's query rows a program (attention.SHORT_BLOCK_M 16, 32, 64);
3. profile: per-kernel GPU time at 1x128 with PDL off (so that kernel times add up), small-batch kernels forced on.

Writes small_latency_ab.json.

--bias: instead, the tile kernel as shipped (its bias fetched before the PDL wait and the K loop) against the previous
form (the bias fetched after the K loop), defined here and swapped in, at the same shapes. Writes
small_latency_bias.json.
"""
import importlib
import os
import sys

import torch
import triton
import triton.language as tl

from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, forms_ab, graphed_forward as timed, profile_kernels
from etformer.engine import optimize
from etformer.kernels._common import pdl_enter
from etformer.sparse.tiles import atomic_write_json

E = importlib.import_module("etformer.engine.encoder")
TL = importlib.import_module("etformer.kernels.tile_linear")
LN = importlib.import_module("etformer.kernels.layernorm")
AT = importlib.import_module("etformer.kernels.attention")
KC = importlib.import_module("etformer.kernels._common")

SHAPES = [(1, 32), (1, 64), (1, 128), (2, 128), (1, 256)]


@triton.jit
def _add_ln_rolled(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, xb_ptr, M, N, stride_x, stride_r, stride_y, eps, stride_s,
                   rw_ptr, rb_ptr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
                   HAS_XB: tl.constexpr, PDL: tl.constexpr = False, ROWS: tl.constexpr = 1,
                   RES_LN: tl.constexpr = False):
    """The add+LayerNorm kernel before the change: the same arithmetic, its loads one after another (one row a
    program: the launcher's ROWS is 1 below 4096 rows; M, rw_ptr, rb_ptr and RES_LN, arguments of the shipped
    kernel's later forms, are taken and not used)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    for s in range(1, SPLIT + 0 * N):  # a run-time trip count, as the split count was
        h += tl.load(x_ptr + s * stride_s + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_XB:
        h += tl.load(xb_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(h, 0) / N
    d = tl.where(ok, h - mean, 0.0)
    var = tl.sum(d * d, 0) / N
    inv = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=1.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (d * inv * w + b).to(y_ptr.dtype.element_ty), mask=ok)


class BiasLate:
    """The tile kernel before the change, to swap in for it: the shipped kernel launched with BIAS_EARLY=False, so
    the bias is read in the epilogue, after the K loop, in every form (the tile kernels still read it there; only the
    dense-weight form of the small-batch path moved it)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kw: launch(*args, BIAS_EARLY=False, **kw)


def swap_ab(enc, module, attr, forms: dict, what: str) -> list[dict]:
    """Same-run A/B of kernel forms swapped in as module.attr (the launcher looks the kernel up there at each call):
    at every shape, each form timed twice, interleaved, and the largest difference between the two forms' outputs."""
    shipped = getattr(module, attr)
    (a, _), (b, _) = forms.items()
    rows = []
    try:
        for B, S in SHAPES:
            ids, mask = make_inputs(B, S, False, 30522)
            t, outs = forms_ab(enc, ids, mask, {n: (lambda k=k: setattr(module, attr, k)) for n, k in forms.items()})
            setattr(module, attr, shipped)
            diff = (outs[a] - outs[b]).abs().max().item()
            rows.append({"B": B, "S": S, **{f"{n}_us": t[n] for n in forms}, "max_abs_diff": diff})
            print(f"{what} {B}x{S}: {a} {t[a]} previous {t[b]} max|diff| {diff:.1e}", flush=True)
    finally:
        setattr(module, attr, shipped)
    return rows


def bias(out_dir):
    enc = optimize(model_shape("bert-base").cuda(), None, dtype=torch.float16, device="cuda")
    enc.check_finite = False
    rows = swap_ab(enc, TL, "_tile_linear_kernel",
                   {"shipped": TL._tile_linear_kernel, "bias_late": BiasLate(TL._tile_linear_kernel)}, "bias")
    atomic_write_json(os.path.join(out_dir, "small_latency_bias.json"),
                      {"env": env_info(), "command": "python3 scripts/small_latency_ab.py OUT_DIR --bias", "rows": rows})


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    enc = optimize(model_shape("bert-base").cuda(), None, dtype=torch.float16, device="cuda")
    enc.check_finite = False
    saved = (E.SMALL_PATH, AT.SHORT_BLOCK_M, KC.USE_PDL)
    res = {"env": env_info(), "command": "python3 scripts/small_latency_ab.py OUT_DIR", "add_ln": [],
           "attention_block_m": [], "profile_no_pdl": None}
    try:
        res["add_ln"] = swap_ab(enc, LN, "_add_ln_kernel", {"shipped": LN._add_ln_kernel, "rolled": _add_ln_rolled},
                                "add_ln")
        for B, S in SHAPES:
            if S > AT.SHORT_MAX:
                continue
            ids, mask = make_inputs(B, S, False, 30522)
            row = {"B": B, "S": S}
            ref = None
            for bm in (64, 32, 16, 64):
                AT.SHORT_BLOCK_M = bm
                out, us = timed(enc, ids, mask)
                ref = out if ref is None else ref
                row.setdefault(f"bm{bm}_us", []).append(us)
                row[f"bm{bm}_max_abs_diff"] = (out - ref).abs().max().item()
            AT.SHORT_BLOCK_M = saved[1]
            res["attention_block_m"].append(row)
            print(f"attention {B}x{S}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k.endswith("_us")),
                  flush=True)
        E.SMALL_PATH, KC.USE_PDL = "triton", False
        ids, mask = make_inputs(1, 128, False, 30522)
        enc._graphs.clear()
        res["profile_no_pdl"] = [[k, round(us, 1), n] for k, us, n in
                                 profile_kernels(enc.graph_replay_fn(ids, mask))]
        for k, us, n in res["profile_no_pdl"]:
            print(f"profile 1x128, no PDL: {us:7.1f} us in {n:3d} launches: {k}", flush=True)
    finally:
        E.SMALL_PATH, AT.SHORT_BLOCK_M, KC.USE_PDL = saved
    atomic_write_json(os.path.join(out_dir, "small_latency_ab.json"), res)


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    (bias if "--bias" in sys.argv else main)(sys.argv[1])
