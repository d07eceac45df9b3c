"""Fused residual add + LayerNorm: y = LN(x + residual) * weight + bias, statistics in fp32.

A program normalizes one row, or two from 4096 rows (MULTI_ROW_LAUNCH); BERT's hidden sizes, 384 to 1024, fit one
block. The sum x + residual is never written to memory. x may also be the fp32 split-K partial sums of a linear
layer, [splits, M, N], with that layer's bias: the split-K reduction, the bias, the residual and the LayerNorm are
then one pass (tile_linear_partials). The residual may itself be a LayerNorm's un-normalised input (residual_ln):
the kernel normalises it on the way, from its own row, so that LayerNorm needs no pass of its own (the small-batch
path's deferred LayerNorm, engine.encoder.SMALL_DEFERRED_LN).
"""
from __future__ import annotations

import torch

from ..errors import EtformerError
from ._common import HAS_TRITON, check_tensor, next_pow2, pdl_kwargs, pdl_on, switch_module, tl, triton, use_triton

if HAS_TRITON:
    from ._common import pdl_enter


def add_layernorm_reference(x, residual, weight, bias, eps=1e-12, x_bias=None, out_dtype=None, residual_ln=None):
    h = x.float().sum(0) if x.dim() == 3 else x.float()
    if x_bias is not None:
        h = h + x_bias.float()
    if residual is not None:
        r = residual.float()
        if residual_ln is not None:
            r = torch.nn.functional.layer_norm(r, (r.shape[-1],), residual_ln[0].float(), residual_ln[1].float(), eps)
        h = h + r
    y = torch.nn.functional.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(out_dtype or x.dtype)


if HAS_TRITON:

    @triton.jit
    def _add_ln_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, xb_ptr, M, N, stride_x, stride_r, stride_y, eps,
                       stride_s, rw_ptr, rb_ptr, SPLIT: tl.constexpr,
                       BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_XB: tl.constexpr, PDL: tl.constexpr = False,
                       ROWS: tl.constexpr = 1, RES_LN: tl.constexpr = False):
        # ROWS rows a program, as one [ROWS, BLOCK] block. Every load is issued before any is used: the split-K
        # partial sums (SPLIT a compile-time count, so the loop unrolls into one basic block), the biases, the
        # residual and the LayerNorm weights are one round trip to memory, not one each (a 128-token forward is a
        # chain of latency-bound launches). RES_LN: the residual is normalised first (its own row's statistics,
        # weight rw, bias rb, the same eps).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        ok2 = (rows < M)[:, None] & ok[None, :]
        w = tl.load(w_ptr + cols, mask=ok, other=1.0).to(tl.float32)  # parameters: no earlier kernel's output
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_XB:
            xb = tl.load(xb_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if RES_LN:
            rw = tl.load(rw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            rb = tl.load(rb_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        pdl_enter(PDL)
        xo = rows[:, None] * stride_x + cols[None, :]
        h = tl.load(x_ptr + xo, mask=ok2, other=0.0).to(tl.float32)
        for s in tl.static_range(1, SPLIT):  # further split-K partial sums
            h += tl.load(x_ptr + s * stride_s + xo, mask=ok2, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=ok2, other=0.0).to(tl.float32)
            if RES_LN:
                r_mean = tl.sum(r, 1) / N
                rd = tl.where(ok2, r - r_mean[:, None], 0.0)
                r_inv = 1.0 / tl.sqrt(tl.sum(rd * rd, 1) / N + eps)
                r = rd * r_inv[:, None] * rw[None, :] + rb[None, :]
            h += r
        if HAS_XB:
            h += xb[None, :]
        mean = tl.sum(h, 1) / N
        d = tl.where(ok2, h - mean[:, None], 0.0)
        var = tl.sum(d * d, 1) / N
        inv = 1.0 / tl.sqrt(var + eps)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :],
                 (d * inv[:, None] * w[None, :] + b[None, :]).to(y_ptr.dtype.element_ty), mask=ok2)


# Rows a program and warps, by row count: (min rows, ROWS, num_warps), the last entry whose min rows M reaches. One
# row a program (4 warps; 8 past 1024 features) below MULTI_ROW_LAUNCH's first entry: the small-batch path's
# latency-bound launches. Same-run on the H200 (benchmarks/results/h200/layernorm_rows/, graphs of 20 calls over input
# sets that do not stay in L2): x + residual, 2 rows a program with 4 warps against one, N = 768: 6.12 against 6.44 us
# at 4096 rows, 19.08 against 20.94 at 16384, 69.8 against 80.5 at 65536; N = 384 (MiniLM), where one row leaves 4
# warps 512 lanes: 4.27 against 5.68, 11.67 against 20.66, 41.4 against 79.7. 4 and 8 warps with 4-16 rows did no
# better at 768 features; at 1024 rows every launch was within 3% of one row. The encoder (graphed forward, GPU time): all-MiniLM-L6-v2
# 128x128 1195 -> 1117 us dense, 993 -> 887 with 50% tiles, 32x512 1252 -> 1138 with tiles; BERT-base unchanged
# within the spread (its large batches normalise in the GEMM epilogues: deferred LayerNorm); from 1024 rows MiniLM's
# 8x128 was 2% slower, hence 4096.
MULTI_ROW_LAUNCH: tuple[tuple[int, int, int], ...] = ((4096, 2, 4),)


def _launch(M: int, block: int) -> tuple[int, int]:
    """(ROWS, num_warps) of the add+LayerNorm launch for M rows of `block` (padded) features."""
    rows, warps = 1, 4 if block <= 1024 else 8
    for min_rows, r, w in MULTI_ROW_LAUNCH:
        if M >= min_rows:
            rows, warps = r, w
    return rows, warps


def add_layernorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float = 1e-12, out: torch.Tensor | None = None, backend: str = "auto", *,
                  x_bias: torch.Tensor | None = None, residual_ln: tuple | None = None) -> torch.Tensor:
    """LN(x (+ x_bias) (+ residual)). x: [M, N], or fp32 partial sums [splits, M, N] (summed first; the output then
    takes the residual's dtype, or the weight's without a residual). residual_ln: (weight, bias) of a LayerNorm
    (same eps) the residual has not been through yet: LN(x (+ x_bias) + LN'(residual)) is returned."""
    partial = isinstance(x, torch.Tensor) and x.dim() == 3
    if partial:
        check_tensor("x", x, dims=3, dtypes=(torch.float32,))
        M, N = x.shape[1:]
        if x.shape[0] < 1:
            raise EtformerError("x holds no partial sums")
    else:
        check_tensor("x", x, dims=2)
        M, N = x.shape
    if residual is not None:
        check_tensor("residual", residual, dims=2, device=x.device)
        if tuple(residual.shape) != (M, N):
            raise EtformerError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    named = [("weight", weight), ("bias", bias)] + ([("x_bias", x_bias)] if x_bias is not None else [])
    if residual_ln is not None:
        if residual is None:
            raise EtformerError("residual_ln without a residual")
        if not (isinstance(residual_ln, (tuple, list)) and len(residual_ln) == 2):
            raise EtformerError("residual_ln must be the residual's LayerNorm (weight, bias)")
        named += [("residual_ln weight", residual_ln[0]), ("residual_ln bias", residual_ln[1])]
    for n, t in named:
        check_tensor(n, t, dims=1, device=x.device)
        if t.shape[0] != N:
            raise EtformerError(f"{n} has {t.shape[0]} entries, x has {N} features")
    out_dtype = (residual.dtype if residual is not None else weight.dtype) if partial else x.dtype
    if not use_triton(x, backend):
        y = add_layernorm_reference(x, residual, weight, bias, eps, x_bias, out_dtype, residual_ln)
        return y if out is None else out.copy_(y)
    if x.stride(-1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise EtformerError("x and residual must have unit stride along features")
    out = torch.empty(M, N, device=x.device, dtype=out_dtype) if out is None else out
    if M == 0:
        return out
    block = next_pow2(N)
    split, stride_s = (x.shape[0], x.stride(0)) if partial else (1, 0)
    stride_x = x.stride(1) if partial else x.stride(0)
    pdl = pdl_on(x)
    rows, warps = _launch(M, block)
    rw, rb = residual_ln if residual_ln is not None else (weight, bias)
    _add_ln_kernel[(triton.cdiv(M, rows),)](x, residual if residual is not None else x, weight, bias, out,
                                            x_bias if x_bias is not None else weight, M, N, stride_x,
                                            residual.stride(0) if residual is not None else 0, out.stride(0), eps,
                                            stride_s, rw, rb, SPLIT=split, BLOCK=block, HAS_RES=residual is not None,
                                            HAS_XB=x_bias is not None, num_warps=warps, PDL=pdl, ROWS=rows,
                                            RES_LN=residual_ln is not None, **pdl_kwargs(pdl))
    return out


switch_module(__name__)  # MULTI_ROW_LAUNCH is a switch: see _common.switch_module
