"""Attention fused with the output projection, as per-head fp32 partial sums: ws[h] = Attn_h(X) W_O[:, h]^T.

For small batches. There every operator of a layer is latency-bound, and each launch costs a few µs whatever it
holds. Here one launch replaces two: attention, and the output projection's split-K GEMM. The attention output never
reaches memory. Each program takes (sequence b, row block mb, head h, column chunk nc):

  1. on-the-fly attention for its rows and head (an online softmax over key blocks, the attention kernel's own
     score and update helpers; one exact pass when one key block covers the sequence);
  2. that head's context, rounded to the input dtype as the attention kernel stores it, times columns
     nc*CW .. nc*CW+CW of W_O's head-h slice, into ws[h] (fp32).

The consumer sums the H partials: add_layernorm takes them as split-K partial sums, with the projection's bias and
the residual, so `LN(Attn(X) W_O^T + b_O + X)` is two launches. On the H200 that measured slower than attention
and the split-K projection as two PDL launches (benchmarks/results/h200/attn_proj/), so the engine keeps it off
(etformer.engine.encoder.ATTN_PROJ); the persistent layer kernel runs the same helper as its attention phase.

Column chunks (NCH) repeat a head's attention NCH times to give the GPU enough programs at a few hundred tokens; the
attention is the cheap part there. Rows that no sequence of cu_seqlens covers (the engine's graph-bucket ghost rows)
get no partial sums: their ws rows are left as they were.

Inputs as for attention(): the fused QKV buffer [T, 2*H*D + H*DV] (Q, K, V in that order, row-major, nothing else in
the row), cu_seqlens, causal masking, an additive key bias or a key mask. w_o: the dense output projection
[HID, H*DV].
"""
from __future__ import annotations

import math

import torch

from ..errors import EtformerError
from ._common import (HAS_TRITON, check_tensor, interpreting, next_pow2, pdl_kwargs, pdl_on, switch_module, tl, triton,
                      use_triton)
from .attention import LOG2E, attention_reference, check_attention_inputs, head_blocks, key_args

if HAS_TRITON:
    from ._common import pdl_enter, prefetch_l2
    from .attention import _normalize, _online_softmax, _query_block


def attention_proj_reference(qkv, cu_seqlens, num_heads, head_dim, w_o, *, v_head_dim=None, causal=False,
                             key_bias=None, key_mask=None, sm_scale=None):
    """[H, T, HID]: each head's context (rounded to qkv's dtype) times its slice of W_O, in fp32 (fp64 for fp64
    inputs). Rows outside every sequence are zero."""
    H, DV = num_heads, v_head_dim or head_dim
    ctx = attention_reference(qkv, cu_seqlens, H, head_dim, v_head_dim=DV, causal=causal, key_bias=key_bias,
                              key_mask=key_mask, sm_scale=sm_scale)
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    T, HID = ctx.shape[0], w_o.shape[0]
    return torch.einsum("thd,nhd->htn", ctx.to(acc).view(T, H, DV), w_o.to(acc).view(HID, H, DV))


if HAS_TRITON:

    @triton.jit
    def _attend_project(qkv_ptr, cu_ptr, wo_ptr, ws_ptr, bias_row, T, b, mb, h, nc, qk_scale,
                        H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, QKV_W: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                        CW: tl.constexpr, BNO: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        KEY_MASK: tl.constexpr, FP32_DOT: tl.constexpr, CACHE: tl.constexpr):
        """Rows mb*BM.. of sequence b, head h: online-softmax attention, then columns nc*CW..+CW of ctx_h W_O[:, h]^T
        into ws[h] (fp32, [H, T, HID]). bias_row: sequence b's key bias or key mask (HAS_BIAS / KEY_MASK as in
        attention's _scores). CACHE: the cache modifier of the qkv loads (".cg" where this launch wrote qkv)."""
        start = tl.load(cu_ptr + b)
        L = tl.load(cu_ptr + b + 1) - start
        if mb * BM < L:  # the attention kernel's query block and online softmax
            offs_m, offs_d, offs_dv, offs_n, m_ok, rows, q = _query_block(qkv_ptr, start, L, mb, 0, h, QKV_W, D, BM,
                                                                          BN, BD, BDV, CACHE)
            k_base = qkv_ptr + H * D + h * D
            v_base = qkv_ptr + 2 * H * D + h * DV
            l_i, acc = _online_softmax(q, k_base, v_base, start, L, mb, offs_m, offs_n, offs_d, offs_dv, D, DV, QKV_W,
                                       bias_row, qk_scale, BM, BN, BDV, CAUSAL, HAS_BIAS, FP32_DOT, KEY_MASK, CACHE)
            o = _normalize(l_i, acc).to(qkv_ptr.dtype.element_ty)  # rounded as the attention kernel stores it
            offs_o = tl.arange(0, BNO)
            for n0 in range(nc * CW, nc * CW + CW, BNO):
                oc = n0 + offs_o
                w = tl.load(wo_ptr + oc[:, None].to(tl.int64) * (H * DV) + h * DV + offs_dv[None, :],
                            mask=(oc[:, None] < HID) & (offs_dv[None, :] < DV), other=0.0)
                if FP32_DOT:
                    part = tl.dot(o, tl.trans(w), input_precision="ieee")
                else:
                    part = tl.dot(o, tl.trans(w))
                dst = ws_ptr + (h * T).to(tl.int64) * HID + rows[:, None] * HID + oc[None, :]
                tl.store(dst, part, mask=m_ok[:, None] & (oc[None, :] < HID))

    @triton.jit
    def _attn_proj_kernel(qkv_ptr, cu_ptr, wo_ptr, ws_ptr, bias_ptr, T, stride_bb, qk_scale,
                          H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr,
                          QKV_W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                          BDV: tl.constexpr, NCH: tl.constexpr, BNO: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_BIAS: tl.constexpr, KEY_MASK: tl.constexpr, FP32_DOT: tl.constexpr,
                          PDL: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr, LINE: tl.constexpr):
        mb = tl.program_id(0)
        h = tl.program_id(1)
        t = tl.program_id(2)
        b = t // NCH
        nc = t % NCH
        CW: tl.constexpr = ((HID + NCH * BNO - 1) // (NCH * BNO)) * BNO
        if PREFETCH:  # the first row block's programs ask L2 for their W_O slice before waiting (no earlier output)
            if (mb == 0) & (b == 0):
                offs = tl.arange(0, LINES) * LINE
                cols = tl.minimum(h * DV + offs, H * DV - 1)
                for n0 in range(nc * CW, nc * CW + CW, BNO):
                    r = tl.minimum(n0 + tl.arange(0, BNO), HID - 1).to(tl.int64)
                    prefetch_l2(wo_ptr + r[:, None] * (H * DV) + cols[None, :])
        pdl_enter(PDL)
        _attend_project(qkv_ptr, cu_ptr, wo_ptr, ws_ptr, bias_ptr + b * stride_bb, T, b, mb, h, nc, qk_scale,
                        H, D, DV, HID, QKV_W, BM, BN, BD, BDV, CW, BNO, CAUSAL, HAS_BIAS, KEY_MASK, FP32_DOT, "")


# GPU launch shape: BM query rows a program, NCH column chunks of W_O's output side (each program projects about
# HID / NCH columns in BNO-wide steps), warps, stages; one key block (BN) covers sequences up to 128 tokens, 64-key
# blocks beyond. Module table, for sweeps. Swept on the H200 in the 12-layer BERT-base chain (scripts/attn_proj_ab.py,
# benchmarks/results/h200/attn_proj/attn_proj_ab.json; BM 32/64, NCH 2/3/4/6, BNO 64/128, 4/8 warps): best at both
# B=1, S=128 and 256 was 64 rows, 6 chunks of 128-wide steps, 4 warps (338 / 455 us; the layer kernel's 64, 4, 64
# took 345 / 479). Even so the engine keeps it off (encoder.ATTN_PROJ).
GPU_LAUNCH = dict(BM=64, NCH=6, BNO=128, num_warps=4, num_stages=2)


def _launch(max_seqlen: int, on_gpu: bool) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, NCH, BNO, num_warps, num_stages); the interpreter gets small blocks, to keep the CPU tests quick."""
    if not on_gpu:
        return 16, 32, 2, 32, 4, 1
    c = GPU_LAUNCH
    bn = max(16, next_pow2(max_seqlen)) if max_seqlen <= 128 else 64
    return c["BM"], bn, c["NCH"], c["BNO"], c["num_warps"], c["num_stages"]


def attention_proj_partials(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                            head_dim: int, w_o: torch.Tensor, *, v_head_dim: int | None = None, causal: bool = False,
                            key_bias: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                            sm_scale: float | None = None, out: torch.Tensor | None = None, backend: str = "auto",
                            _config: tuple | None = None) -> torch.Tensor:
    """Per-head partial sums of Attn(qkv) W_O^T: fp32 [H, T, HID], for add_layernorm (with W_O's bias and the
    residual) to reduce. qkv: [T, 2*H*D + H*DV], Q, K, V and nothing else, row-major; w_o: [HID, H*DV] dense.
    out: an fp32 [H, T, HID] buffer to write (rows outside every sequence are left as they are)."""
    H, D, DV, _, _, B = check_attention_inputs(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, 0, None, None,
                                               v_head_dim, key_bias, key_mask)
    T, QKV_W = qkv.shape
    if QKV_W != 2 * H * D + H * DV or qkv.stride(0) != QKV_W:
        raise EtformerError(f"qkv must be a row-major [T, {2 * H * D + H * DV}] buffer of Q, K and V only, "
                            f"got {tuple(qkv.shape)} with strides {qkv.stride()}")
    check_tensor("w_o", w_o, dims=2, device=qkv.device)
    if w_o.shape[1] != H * DV or w_o.dtype != qkv.dtype:
        raise EtformerError(f"w_o must be [HID, {H * DV}] in {qkv.dtype}, got {tuple(w_o.shape)} {w_o.dtype}")
    HID = w_o.shape[0]
    if out is not None:
        check_tensor("out", out, dims=3, dtypes=(torch.float32,), device=qkv.device)
        if tuple(out.shape) != (H, T, HID) or not out.is_contiguous():
            raise EtformerError(f"out must be a contiguous fp32 [{H}, {T}, {HID}] tensor, got {tuple(out.shape)}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    if not use_triton(qkv, backend):
        y = attention_proj_reference(qkv, cu_seqlens, H, D, w_o, v_head_dim=DV, causal=causal, key_bias=key_bias,
                                     key_mask=key_mask, sm_scale=scale).float()
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty(H, T, HID, device=qkv.device, dtype=torch.float32)
    if T == 0 or max_seqlen == 0:
        return out
    w_o = w_o.contiguous()
    bm, bn, nch, bno, warps, stages = _config or _launch(max_seqlen, qkv.is_cuda)
    cw = triton.cdiv(HID, max(1, nch) * bno) * bno  # the kernel's chunk width; no chunk is left empty
    nch = triton.cdiv(HID, cw)
    bd, bdv = head_blocks(D, DV, qkv.is_cuda)
    pdl = pdl_on(qkv)
    prefetch = qkv.is_cuda and not interpreting()
    line = 128 // qkv.element_size()
    kb, stride_bb, has_bias, is_mask = key_args(qkv, key_bias, key_mask)
    grid = (triton.cdiv(max_seqlen, bm), H, B * nch)
    _attn_proj_kernel[grid](
        qkv, cu_seqlens, w_o, out, kb, T, stride_bb, scale * LOG2E,
        H=H, D=D, DV=DV, HID=HID, QKV_W=QKV_W, BM=bm, BN=bn, BD=bd, BDV=bdv, NCH=nch, BNO=bno,
        CAUSAL=causal, HAS_BIAS=has_bias, KEY_MASK=is_mask,
        FP32_DOT=qkv.dtype == torch.float32 and not qkv.is_cuda, PDL=pdl, PREFETCH=prefetch,
        LINES=max(1, bdv // line), LINE=line, num_warps=warps, num_stages=stages, **pdl_kwargs(pdl),
    )
    return out


switch_module(__name__)  # its upper-case settings are switches: see _common.switch_module
