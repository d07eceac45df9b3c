"""On-the-fly self-attention over packed (varlen) tokens, reading heads straight from the fused QKV buffer.

Inputs: qkv [T, *] holds, for every real token of every sequence (no padding), Q at columns
q_col + h*D, K at k_col + h*D and V at v_col + h*DV for head h; cu_seqlens [B+1] (int32) marks where each
sequence starts. The output [T, H*DV] puts head h at columns h*DV — the layout the O projection reads, so no
transpose is ever made. The scores (S x S per head) live only in registers and shared memory.

Two kernels, picked by the longest sequence of the batch:
  * short (max_seqlen <= SHORT_MAX): one block of keys covers the whole sequence, so each program computes its
    row block of scores once and does a single exact softmax, with no running rescale;
  * long: FlashAttention's online softmax over key blocks.
The switch point is measured on the H200 (benchmarks/results/h200/kernels.md).

Options: causal masking; an additive key bias [B, max_seqlen] (e.g. 0 / -inf for a key-padding mask), or a key mask
[B, max_seqlen] of booleans or integers read as is (nonzero: attend; what a padded batch's attention_mask is); a V head dim
DV different from D (the pruned-V operator uses DV = the kept V columns per head); head dims that are not powers
of two (padded to the next power of two inside the kernel, masked on load and store).
"""
from __future__ import annotations

import math

import torch

from ..errors import EtformerError
from ._common import (HAS_TRITON, TensorDescriptor, capability, check_tensor, next_pow2, pdl_kwargs, pdl_on,
                      switch_module, tl, triton, use_triton)

if HAS_TRITON:
    from ._common import pdl_enter

# Longest sequence the one-pass kernel takes. Swept on the H200 (B=32, 12 heads of 64, fp16; tune.json): at S=128
# the one-pass and online kernels are within 2% (13.6 vs 13.3 us), at S=192 and 256 one-pass is 1.4-1.6x slower
# (a 256-wide score block spills), so the switch sits at 128.
SHORT_MAX = 128
# Query rows a program of the one-pass kernel takes on the GPU (module switch, for sweeps).
SHORT_BLOCK_M = 64
# On the GPU a V block is never narrower than the Q/K block (compact pruned V heads are masked up to it). On the
# H200 with Triton 3.6 the one-pass kernel (S <= 128, 128-key blocks) with 64-wide Q/K blocks and a 16- or 32-wide
# V block hit an illegal memory access; a 64-wide V block ran correctly (DV = 16 and 32, B = 8, S = 128: relative
# error 2.9e-4; benchmarks/results/h200/reorder/narrow_v_diag.log). Equal widths are every dense model's case. The
# interpreter keeps the narrow blocks (MIN_BLOCK_DV), so the CPU tests still exercise them.
MIN_BLOCK_DV = 16
# Ragged short batches: when packed sequences fill at most RAGGED_SHORT_FILL of B x max_seqlen (max_seqlen <=
# SHORT_MAX, heads up to 64 wide), the online kernel with 32-key blocks replaces the one-pass kernel, whose 128-key
# score block costs a short sequence as much as a full one. Swept on the H200 (attention_varlen/
# tune_attention_varlen.json: 12 heads of 64, fp16, graphs of 20 calls, PDL off), this launch against one pass:
# B=32, lengths uniform in 1..128 (fill 0.50): 7.44 us against 7.88 (SDPA flash on the padded batch 12.9); B=8
# (fill 0.51): 4.18 against 4.34; fill 0.79: 9.76 against 9.24; 0.87: 10.46 against 9.37; full: 10.63 against 9.66.
RAGGED_SHORT_FILL = 0.6
RAGGED_SHORT_LAUNCH = (False, 64, 32, 4, 3)
# Full batches of short sequences from SHORT_ONLINE_MIN_TOKENS packed tokens on: the online kernel's 64x64 launch
# instead of one pass. Same-run sweeps on the H200 (12 heads of 64, fp16, graphs of 20 calls, PDL off; S = 128, full
# lengths): at 128x128 tokens 36.98 us against 40.57 for one pass (SDPA flash 40.0), at 64x128 20.3 against 21.48
# (SDPA 19.55), at 32x128 9.71 against 9.66 (benchmarks/results/h200/attention_short/; 36.76 against 40.29 at
# 128x128 in attention_tma/). In the BERT-base encoder the two launches measured within that run's spread (GPU
# time of the graphed forward, 50% tiles: 64x128 2255/2262 -> 2228/2238 us, 128x128 4361/4377 -> 4396/4558).
SHORT_ONLINE_MIN_TOKENS = 8192
SHORT_ONLINE_LAUNCH = (False, 64, 64, 4, 3)


def head_blocks(D: int, DV: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DV): the blocks a program holds for Q/K heads of D columns and V heads of DV."""
    bd = max(16, next_pow2(D))
    return bd, max(bd if on_gpu else MIN_BLOCK_DV, next_pow2(DV))


def key_args(qkv: torch.Tensor, key_bias, key_mask) -> tuple:
    """The attention kernels' key arguments: (bias or mask pointer, its row stride, HAS_BIAS, KEY_MASK); without
    either, qkv stands in for the pointer the kernel never reads."""
    kb = key_bias if key_bias is not None else key_mask
    return (kb if kb is not None else qkv, kb.stride(0) if kb is not None else 0, kb is not None,
            key_mask is not None)


MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- reference
def attention_reference(qkv, cu_seqlens, num_heads, head_dim, *, q_col=0, k_col=None, v_col=None, v_head_dim=None,
                        causal=False, key_bias=None, sm_scale=None, key_mask=None):
    D, H = head_dim, num_heads
    DV = v_head_dim or D
    k_col = H * D if k_col is None else k_col
    v_col = 2 * H * D if v_col is None else v_col
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    out = qkv.new_zeros(qkv.shape[0], H * DV)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        L = e - s
        q = qkv[s:e, q_col:q_col + H * D].float().view(L, H, D).transpose(0, 1)
        k = qkv[s:e, k_col:k_col + H * D].float().view(L, H, D).transpose(0, 1)
        v = qkv[s:e, v_col:v_col + H * DV].float().view(L, H, DV).transpose(0, 1)
        sc = q @ k.transpose(1, 2) * scale  # (H, L, L)
        if key_bias is not None:
            sc = sc + key_bias[b, :L].float()
        if key_mask is not None:
            sc = sc.masked_fill(key_mask[b, :L] == 0, float("-inf"))
        if causal:
            sc = sc.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool, device=qkv.device), 1), float("-inf"))
        p = torch.softmax(sc, -1).nan_to_num(0.0)
        out[s:e] = (p @ v).transpose(0, 1).reshape(L, H * DV).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _masked_scores(q, k, cols, n_ok, offs_m, bias_row, qk_scale, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       FP32_DOT: tl.constexpr, KEY_MASK: tl.constexpr):
        """q k (k as [D, BLOCK_N]) scaled to base 2, key columns `cols` of which n_ok lie in the sequence; columns out
        of range, masked keys (HAS_BIAS and KEY_MASK: bias_row's zeros) and, when CAUSAL, later keys set to -inf; or
        (HAS_BIAS, not KEY_MASK) bias_row added as an additive key bias."""
        if FP32_DOT:
            s = tl.dot(q, k, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, k) * qk_scale
        keep = n_ok[None, :]
        if HAS_BIAS:
            if KEY_MASK:
                keep = keep & (tl.load(bias_row + cols, mask=n_ok, other=0) != 0)[None, :]
            else:
                s += tl.load(bias_row + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        return tl.where(keep, s, float("-inf"))

    @triton.jit
    def _scores(q, k_base, v_base, start, cols, offs_m, offs_d, offs_dv, L, D, DV, stride_t, bias_row, qk_scale,
                CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, KEY_MASK: tl.constexpr,
                CACHE: tl.constexpr):
        """Scores (base 2, masked to -inf) of a q block against key columns `cols`, and the matching V block.
        HAS_BIAS: bias_row is an additive key bias, or (KEY_MASK) a key mask whose zeros are not attended.
        CACHE: the loads' cache modifier (".cg" where K and V were written by the same launch)."""
        n_ok = cols < L
        krows = (start + cols).to(tl.int64)
        k = tl.load(k_base + krows[None, :] * stride_t + offs_d[:, None],
                    mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0, cache_modifier=CACHE)
        s = _masked_scores(q, k, cols, n_ok, offs_m, bias_row, qk_scale, CAUSAL, HAS_BIAS, FP32_DOT, KEY_MASK)
        v = tl.load(v_base + krows[:, None] * stride_t + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0, cache_modifier=CACHE)
        return s, v

    @triton.jit
    def _scores_tma(q, kv_desc, start, n0, k_off, v_off, cols, offs_m, L, bias_row, qk_scale, CAUSAL: tl.constexpr,
                    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, KEY_MASK: tl.constexpr):
        """_scores for a block of keys that lies inside the sequence, K and V read as bulk tensor copies (kv_desc:
        the packed buffer in [BLOCK_N, BLOCK_D] boxes) at columns k_off and v_off: every key lies in the sequence, so
        the range test of _masked_scores passes throughout. A block that reaches past the sequence takes _scores (masked
        pointer loads): its extra rows would be the next sequence's tokens, and a non-finite value there would
        reach this one's output through the zero weights of the PV product."""
        k = tl.trans(kv_desc.load([start + n0, k_off]))
        s = _masked_scores(q, k, cols, cols < L, offs_m, bias_row, qk_scale, CAUSAL, HAS_BIAS, FP32_DOT, KEY_MASK)
        return s, kv_desc.load([start + n0, v_off])

    @triton.jit
    def _one_block(q, kv_desc, k_base, v_base, start, full, k_off, v_off, offs_n, offs_m, offs_d, offs_dv, L, D, DV,
                   stride_t, bias_row, qk_scale, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
                   KEY_MASK: tl.constexpr, TMA: tl.constexpr):
        """The one-pass kernel's scores and V block: by bulk copies when TMA and the block lies inside the sequence
        (full > 0), else by masked pointer loads."""
        if TMA:
            if full > 0:
                s, v = _scores_tma(q, kv_desc, start, 0, k_off, v_off, offs_n, offs_m, L, bias_row, qk_scale, CAUSAL,
                                   HAS_BIAS, FP32_DOT, KEY_MASK)
            else:
                s, v = _scores(q, k_base, v_base, start, offs_n, offs_m, offs_d, offs_dv, L, D, DV, stride_t,
                               bias_row, qk_scale, CAUSAL, HAS_BIAS, FP32_DOT, KEY_MASK, "")
        else:
            s, v = _scores(q, k_base, v_base, start, offs_n, offs_m, offs_d, offs_dv, L, D, DV, stride_t, bias_row,
                           qk_scale, CAUSAL, HAS_BIAS, FP32_DOT, KEY_MASK, "")
        return s, v

    @triton.jit
    def _pv(p, v, FP32_DOT: tl.constexpr):
        if FP32_DOT:
            o = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            o = tl.dot(p.to(v.dtype), v)
        return o

    @triton.jit
    def _online_step(m, l, acc, s, v, FP32_DOT: tl.constexpr):
        """One key block of the online softmax: running max m, sum l and output acc updated by scores s and V block v."""
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _pv(p, v, FP32_DOT)
        return m_new, l, acc

    @triton.jit
    def _query_rows(start, L, blk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
        """Query block blk of a sequence starting at token `start` with L tokens: (offs_m, offs_d, offs_dv, offs_n,
        m_ok, rows)."""
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        return (offs_m, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_N), offs_m < L,
                (start + offs_m).to(tl.int64))

    @triton.jit
    def _query_block(qkv_ptr, start, L, blk, q_col, h, stride_t, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CACHE: tl.constexpr):
        """_query_rows and q, read from columns q_col + h*D of the packed buffer (rows past L as zeros)."""
        offs_m, offs_d, offs_dv, offs_n, m_ok, rows = _query_rows(start, L, blk, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        q = tl.load(qkv_ptr + rows[:, None] * stride_t + q_col + h * D + offs_d[None, :],
                    mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0, cache_modifier=CACHE)
        return offs_m, offs_d, offs_dv, offs_n, m_ok, rows, q

    @triton.jit
    def _online_softmax(q, k_base, v_base, start, L, blk, offs_m, offs_n, offs_d, offs_dv, D, DV, stride_t, bias_row,
                        qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, KEY_MASK: tl.constexpr,
                        CACHE: tl.constexpr):
        """Attention of query block blk over its keys (all L, or up to its own last row when CAUSAL) in BLOCK_N
        blocks, with an online softmax: (row sums l, output acc)."""
        m = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, (blk + 1) * BLOCK_M)
        for n0 in range(0, hi, BLOCK_N):
            s, v = _scores(q, k_base, v_base, start, n0 + offs_n, offs_m, offs_d, offs_dv, L, D, DV, stride_t,
                           bias_row, qk_scale, CAUSAL, HAS_BIAS, FP32_DOT, KEY_MASK, CACHE)
            m, l, acc = _online_step(m, l, acc, s, v, FP32_DOT)
        return l, acc

    @triton.jit
    def _normalize(l, acc):
        """acc / l by row; a row whose keys are all masked (l = 0) gives 0, not NaN."""
        l = tl.where(l == 0.0, 1.0, l)
        return acc / l[:, None]

    @triton.jit
    def _attn_kernel(
        qkv_ptr, out_ptr, cu_ptr, bias_ptr,
        stride_t, stride_o, stride_bb, q_col, k_col, v_col,
        D: tl.constexpr, DV: tl.constexpr, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        ONE_PASS: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
        PDL: tl.constexpr = False, KEY_MASK: tl.constexpr = False, q_desc=None, kv_desc=None,
        TMA: tl.constexpr = False,
    ):
        """TMA: Q, K and V come as bulk tensor copies through q_desc ([BLOCK_M, D] boxes of the packed buffer) and
        kv_desc ([BLOCK_N, D] boxes); D == DV == BLOCK_D. Otherwise pointer loads."""
        pdl_enter(PDL)
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        start = tl.load(cu_ptr + b)
        L = tl.load(cu_ptr + b + 1) - start
        if pid_m * BLOCK_M >= L:
            return
        bias_row = bias_ptr + b * stride_bb
        if TMA:  # query rows past the sequence are the next one's tokens: computed, never stored
            offs_m, offs_d, offs_dv, offs_n, m_ok, rows = _query_rows(start, L, pid_m, BLOCK_M, BLOCK_N, BLOCK_D,
                                                                      BLOCK_DV)
            q = q_desc.load([start + pid_m * BLOCK_M, q_col + h * D])
        else:
            offs_m, offs_d, offs_dv, offs_n, m_ok, rows, q = _query_block(qkv_ptr, start, L, pid_m, q_col, h,
                                                                          stride_t, D, BLOCK_M, BLOCK_N, BLOCK_D,
                                                                          BLOCK_DV, "")
        k_base = qkv_ptr + k_col + h * D
        v_base = qkv_ptr + v_col + h * DV
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        full = hi - hi % BLOCK_N  # key blocks wholly inside the sequence: with TMA, bulk copies and no range mask
        if ONE_PASS:  # the whole sequence in one block of keys: one exact softmax
            s, v = _one_block(q, kv_desc, k_base, v_base, start, full, k_col + h * D, v_col + h * DV, offs_n, offs_m,
                              offs_d, offs_dv, L, D, DV, stride_t, bias_row, qk_scale, CAUSAL, HAS_BIAS, FP32_DOT,
                              KEY_MASK, TMA)
            m = tl.maximum(tl.max(s, 1), -1e30)
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, 1)
            acc = _pv(p, v, FP32_DOT)
        elif TMA:  # online softmax: the whole key blocks by bulk copies, then the last, partial one masked
            m = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
            l = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
            for n0 in range(0, full, BLOCK_N):
                s, v = _scores_tma(q, kv_desc, start, n0, k_col + h * D, v_col + h * DV, n0 + offs_n, offs_m,
                                   L, bias_row, qk_scale, CAUSAL, HAS_BIAS, FP32_DOT, KEY_MASK)
                m, l, acc = _online_step(m, l, acc, s, v, FP32_DOT)
            if full < hi:
                s, v = _scores(q, k_base, v_base, start, full + offs_n, offs_m, offs_d, offs_dv, L, D, DV, stride_t,
                               bias_row, qk_scale, CAUSAL, HAS_BIAS, FP32_DOT, KEY_MASK, "")
                m, l, acc = _online_step(m, l, acc, s, v, FP32_DOT)
        else:  # online softmax over key blocks
            l, acc = _online_softmax(q, k_base, v_base, start, L, pid_m, offs_m, offs_n, offs_d, offs_dv, D, DV,
                                     stride_t, bias_row, qk_scale, BLOCK_M, BLOCK_N, BLOCK_DV, CAUSAL, HAS_BIAS,
                                     FP32_DOT, KEY_MASK, "")
        o = _normalize(l, acc)
        tl.store(out_ptr + rows[:, None] * stride_o + h * DV + offs_dv[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV))


# ----------------------------------------------------------------------------- launcher
def _blocks(max_seqlen: int, bd: int, on_gpu: bool, fill: float = 1.0,
            tokens: int = 0) -> tuple[bool, int, int, int, int]:
    """(one_pass, BLOCK_M, BLOCK_N, num_warps, num_stages). fill: tokens / (sequences x max_seqlen); tokens: the
    packed rows."""
    if bd > 128 and on_gpu:  # wide heads (E.T.'s Transformer: 200, padded to 256): scripts/tune_attention_wide.py,
        # H=4, causal, fp16 (tune_attention_wide.json): one pass with 32-row blocks at S <= 128 (11.1 us at B=1, SDPA
        # flash 12.6); online with 128x64 blocks, 8 warps, 2 stages beyond (31.7 / 104.6 us at 8x512 / 32x512)
        return (True, 32, 128, 4, 1) if max_seqlen <= SHORT_MAX else (False, 128, 64, 8, 2)
    if max_seqlen <= SHORT_MAX and on_gpu and bd <= 64 and fill <= RAGGED_SHORT_FILL:
        return RAGGED_SHORT_LAUNCH
    if max_seqlen <= SHORT_MAX and on_gpu and bd <= 64 and tokens >= SHORT_ONLINE_MIN_TOKENS:
        return SHORT_ONLINE_LAUNCH
    if max_seqlen <= SHORT_MAX:
        bn = max(16, next_pow2(max_seqlen))
        bm = SHORT_BLOCK_M if on_gpu else 16
        return True, min(bm, bn) if not on_gpu else bm, bn, 4, 1
    if not on_gpu:
        return False, 16, 32, 4, 1
    if bd > 64:
        return False, 64, 32 if bd > 128 else 64, 4, 2
    if max_seqlen <= 384:  # best of the sweep at S=192..384: 64x64 blocks, 4 warps, 3 stages
        return False, 64, 64, 4, 3
    return False, 128, 64, 8, 3  # best at S=512


# Q, K and V read as bulk tensor copies (TMA) where they can be (module switch; attention(tma=...) per call).
USE_TMA = False


def check_attention_inputs(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, q_col, k_col, v_col, v_head_dim,
                           key_bias, key_mask) -> tuple[int, int, int, int, int, int]:
    """The checks every attention operator makes of its inputs; returns (H, D, DV, k_col, v_col, B)."""
    check_tensor("qkv", qkv, dims=2)
    check_tensor("cu_seqlens", cu_seqlens, dims=1, dtypes=(torch.int32,), device=qkv.device)
    H, D = int(num_heads), int(head_dim)
    DV = int(v_head_dim or D)
    k_col = H * D if k_col is None else k_col
    v_col = 2 * H * D if v_col is None else v_col
    if H < 1 or D < 1 or D > 256 or DV > 256:
        raise EtformerError(f"need 1 <= head_dim <= 256 and at least one head, got H={H}, D={D}, DV={DV}")
    if max(q_col + H * D, k_col + H * D, v_col + H * DV) > qkv.shape[1] or qkv.stride(1) != 1:
        raise EtformerError(f"qkv {tuple(qkv.shape)} is too narrow for {H} heads of {D} (V {DV}) at these columns")
    B = cu_seqlens.numel() - 1
    if B < 1:
        raise EtformerError("cu_seqlens needs at least two entries (one sequence)")
    if key_bias is not None and key_mask is not None:
        raise EtformerError("give key_bias or key_mask, not both")
    for name, t, dtypes in (("key_bias", key_bias, None), ("key_mask", key_mask, MASK_DTYPES)):
        if t is None:
            continue
        check_tensor(name, t, dims=2, device=qkv.device, **({"dtypes": dtypes} if dtypes else {}))
        if t.shape[0] != B or t.shape[1] < max_seqlen or t.stride(1) != 1:
            raise EtformerError(f"{name} must be [B={B}, >= {max_seqlen}] row-major, got {tuple(t.shape)}")
    return H, D, DV, k_col, v_col, B


def attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, head_dim: int, *,
              q_col: int = 0, k_col: int | None = None, v_col: int | None = None, v_head_dim: int | None = None,
              causal: bool = False, key_bias: torch.Tensor | None = None, sm_scale: float | None = None,
              out: torch.Tensor | None = None, backend: str = "auto", _config: tuple | None = None,
              key_mask: torch.Tensor | None = None, tma: bool | None = None) -> torch.Tensor:
    """Varlen multi-head attention out of a fused QKV buffer; returns [T, H*DV]. key_bias (float, added) or key_mask
    (bool or integer, zeros not attended): [B, >= max_seqlen], row-major, indexed by position within each sequence.
    tma: read Q, K and V as bulk tensor copies (None: USE_TMA where _tma_ok allows; True where it does not raises)."""
    H, D, DV, k_col, v_col, B = check_attention_inputs(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, q_col,
                                                       k_col, v_col, v_head_dim, key_bias, key_mask)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    if not use_triton(qkv, backend):
        y = attention_reference(qkv, cu_seqlens, H, D, q_col=q_col, k_col=k_col, v_col=v_col, v_head_dim=DV,
                                causal=causal, key_bias=key_bias, sm_scale=scale, key_mask=key_mask)
        if out is not None:
            out.copy_(y)
            return out
        return y
    T = qkv.shape[0]
    if out is None:
        out = torch.empty(T, H * DV, device=qkv.device, dtype=qkv.dtype)
    if T == 0 or max_seqlen == 0:
        return out
    bd, bdv = head_blocks(D, DV, qkv.is_cuda)
    one, bm, bn, warps, stages = _config or _blocks(max_seqlen, max(bd, bdv), qkv.is_cuda, T / (B * max_seqlen), T)
    grid = (triton.cdiv(max_seqlen, bm), H, B)
    pdl = pdl_on(qkv)
    kb, stride_bb, has_bias, is_mask = key_args(qkv, key_bias, key_mask)
    asked = tma  # the layout checks only where bulk copies are wanted: this runs on every call
    tma = bool(USE_TMA if tma is None else tma) and _tma_ok(qkv, D, DV, bd, bdv, q_col, k_col, v_col)
    if asked and not tma:
        raise EtformerError("tma=True needs equal power-of-two Q/K and V head widths and a 16-byte aligned buffer")
    q_desc = TensorDescriptor(qkv, list(qkv.shape), [qkv.stride(0), 1], [bm, bd]) if tma else qkv
    kv_desc = TensorDescriptor(qkv, list(qkv.shape), [qkv.stride(0), 1], [bn, bd]) if tma else qkv
    _attn_kernel[grid](
        qkv, out, cu_seqlens, kb,
        qkv.stride(0), out.stride(0), stride_bb, q_col, k_col, v_col,
        D, DV, scale * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, ONE_PASS=one, CAUSAL=causal,
        HAS_BIAS=has_bias, FP32_DOT=qkv.dtype == torch.float32 and not qkv.is_cuda,
        num_warps=warps, num_stages=stages, PDL=pdl, KEY_MASK=is_mask, q_desc=q_desc, kv_desc=kv_desc, TMA=tma,
        **pdl_kwargs(pdl),
    )
    return out


def _tma_ok(qkv: torch.Tensor, D: int, DV: int, bd: int, bdv: int, q_col: int, k_col: int, v_col: int) -> bool:
    """Whether the heads can come as bulk tensor copies: sm_90+ (or the interpreter), a host tensor-descriptor API,
    Q/K and V heads of one power-of-two width (the box is the head, so no neighbouring column is read), and every
    head's first column and the row stride 16-byte aligned."""
    if TensorDescriptor is None or D != DV or bd != D or bdv != DV:
        return False
    if qkv.is_cuda and capability(qkv.device.index)[0] < 9:
        return False
    e = qkv.element_size()
    return (qkv.data_ptr() % 16 == 0 and (qkv.stride(0) * e) % 16 == 0 and qkv.stride(1) == 1
            and all((c * e) % 16 == 0 for c in (q_col, k_col, v_col, D)))


def attention_flops(seqlens, num_heads: int, head_dim: int, v_head_dim: int | None = None) -> float:
    dv = v_head_dim or head_dim
    return float(sum(2.0 * L * L * num_heads * (head_dim + dv) for L in seqlens))


switch_module(__name__)  # its upper-case settings are switches: see _common.switch_module
