"""Fused feed-forward block for small batches: act(X W1^T + b1) W2^T in one launch, as split partial sums.

At a few hundred tokens every GEMM is latency-bound (a few µs each, whatever its size), so the FFN's two GEMMs, the
activation and cuBLAS's split-K reduction cost four launches of fixed overhead. Here each program owns BLOCK_M rows
and one BI-wide slice of the intermediate dimension: it computes H = act(X W1[slice]^T + b1[slice]) on chip (rounded
to the input dtype, as the unfused path stores it), then multiplies H by W2[:, slice]^T in BD-wide column chunks and
writes the fp32 partial sums to a workspace [I / BI, M, D]. The intermediate activations never reach memory, and the
partials are reduced by add_layernorm together with b2 and the residual. Partial traffic grows with M, so the engine
uses this only up to a token cap (etformer.engine.encoder.FUSED_FFN_MAX_TOKENS).
"""
from __future__ import annotations

import torch

from ..errors import EtformerError
from ._common import HAS_TRITON, TensorDescriptor, check_tensor, switch_module, tl, triton, use_triton
from .tile_linear import _act_code, _tma_on, apply_activation

if HAS_TRITON:
    from .tile_linear import _activate

    @triton.jit
    def _ffn_kernel(x_src, w1_src, b1_ptr, w2_src, ws_ptr, x_ptr, M, D, I, stride_xm,
                    BLOCK_M: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                    ACT: tl.constexpr, HAS_B1: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        s = pid // num_m
        m0 = pid_m * BLOCK_M
        i0 = s * BI
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_i = i0 + tl.arange(0, BI)
        offs_k = tl.arange(0, BK)
        m_ok = offs_m < M
        i_ok = offs_i < I
        acc = tl.zeros((BLOCK_M, BI), dtype=tl.float32)
        for k0 in range(0, D, BK):
            if TMA:
                xa = x_src.load([m0, k0])
                wt = w1_src.load([i0, k0])
            else:
                kk = k0 + offs_k
                xa = tl.load(x_src + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :],
                             mask=m_ok[:, None] & (kk[None, :] < D), other=0.0)
                wt = tl.load(w1_src + offs_i[:, None].to(tl.int64) * D + kk[None, :],
                             mask=i_ok[:, None] & (kk[None, :] < D), other=0.0)
            if FP32_DOT:
                acc += tl.dot(xa, tl.trans(wt), input_precision="ieee")
            else:
                acc += tl.dot(xa, tl.trans(wt))
        if HAS_B1:
            acc += tl.load(b1_ptr + offs_i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(acc, ACT).to(x_ptr.dtype.element_ty)  # columns past I are act(0) = 0: they add nothing below
        offs_d = tl.arange(0, BD)
        for d0 in range(0, D, BD):
            if TMA:
                w2t = w2_src.load([d0, i0])  # (BD, BI) block of W2 [D, I]
            else:
                dd = d0 + offs_d
                w2t = tl.load(w2_src + dd[:, None].to(tl.int64) * I + offs_i[None, :],
                              mask=(dd[:, None] < D) & i_ok[None, :], other=0.0)
            if FP32_DOT:
                y = tl.dot(h, tl.trans(w2t), input_precision="ieee")
            else:
                y = tl.dot(h, tl.trans(w2t))
            cols = d0 + offs_d
            ptr = ws_ptr + s.to(tl.int64) * M * D + offs_m[:, None].to(tl.int64) * D + cols[None, :]
            tl.store(ptr, y, mask=m_ok[:, None] & (cols[None, :] < D))


# (BLOCK_M, BI, BK, BD, num_warps, num_stages) on a GPU; small blocks in the interpreter.
FFN_LAUNCH_GPU = (64, 128, 64, 128, 4, 3)
FFN_LAUNCH_CPU = (16, 32, 32, 32, 4, 1)


def fused_ffn_reference(x, w1, b1, w2, activation="gelu") -> torch.Tensor:
    """One split of fp32 partial sums, [1, M, D]: act(x W1^T + b1), rounded to x.dtype, times W2^T."""
    h = x.float() @ w1.float().t()
    if b1 is not None:
        h = h + b1.float()
    h = apply_activation(h, activation).to(x.dtype)
    return (h.float() @ w2.float().t()).unsqueeze(0)


def fused_ffn_partials(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                       activation: str = "gelu", backend: str = "auto",
                       _config: tuple | None = None) -> torch.Tensor:
    """fp32 partial sums [splits, M, D] of act(x W1^T + b1) W2^T, for add_layernorm(ws, residual, ..., x_bias=b2).

    x: [M, D]; w1: [I, D] (FFN-in, dense); w2: [D, I] (FFN-out, dense)."""
    check_tensor("x", x, dims=2)
    check_tensor("w1", w1, dims=2, device=x.device)
    check_tensor("w2", w2, dims=2, device=x.device)
    act = _act_code(activation, x)
    M, D = x.shape
    I = w1.shape[0]
    if w1.shape[1] != D or tuple(w2.shape) != (D, I):
        raise EtformerError(f"FFN shapes do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise EtformerError(f"x is {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype}; they must match")
    if b1 is not None:
        check_tensor("b1", b1, dims=1, device=x.device)
        if b1.shape[0] != I:
            raise EtformerError(f"b1 has {b1.shape[0]} entries, expected {I}")
    if not use_triton(x, backend):
        return fused_ffn_reference(x, w1, b1, w2, activation)
    x = x if x.stride(1) == 1 else x.contiguous()
    w1, w2 = w1.contiguous(), w2.contiguous()
    bm, bi, bk, bd, warps, stages = _config or (FFN_LAUNCH_GPU if x.is_cuda else FFN_LAUNCH_CPU)
    splits = triton.cdiv(I, bi)
    ws = torch.empty(splits, M, D, device=x.device, dtype=torch.float32)
    if M == 0:
        return ws
    tma = _tma_on(x, w1) and _tma_on(x, w2)  # tile_linear.USE_TMA switches both kernels
    if tma:
        x_src = TensorDescriptor(x, [M, D], [x.stride(0), 1], [bm, bk])
        w1_src = TensorDescriptor(w1, [I, D], [D, 1], [bi, bk])
        w2_src = TensorDescriptor(w2, [D, I], [I, 1], [bd, bi])
    else:
        x_src, w1_src, w2_src = x, w1, w2
    _ffn_kernel[(triton.cdiv(M, bm) * splits,)](
        x_src, w1_src, b1 if b1 is not None else x, w2_src, ws, x, M, D, I, x.stride(0),
        BLOCK_M=bm, BI=bi, BK=bk, BD=bd, ACT=act, HAS_B1=b1 is not None,
        FP32_DOT=x.dtype == torch.float32 and not x.is_cuda, TMA=tma, num_warps=warps, num_stages=stages)
    return ws


switch_module(__name__)  # its upper-case settings are switches: see _common.switch_module
