"""Fused residual add + LayerNorm: y = LN(x + residual) * weight + bias, statistics in fp32.

One program normalizes one row (BERT's hidden sizes, 384 to 1024, fit one block); the sum x + residual is never
written to memory.
"""
from __future__ import annotations

import torch

from ..errors import EtformerError
from ._common import HAS_TRITON, check_tensor, next_pow2, tl, triton, use_triton


def add_layernorm_reference(x, residual, weight, bias, eps=1e-12):
    h = x.float() if residual is None else x.float() + residual.float()
    y = torch.nn.functional.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _add_ln_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, N, stride_x, stride_r, stride_y, eps,
                       BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(h, 0) / N
        d = tl.where(ok, h - mean, 0.0)
        var = tl.sum(d * d, 0) / N
        inv = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (d * inv * w + b).to(y_ptr.dtype.element_ty), mask=ok)


def add_layernorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float = 1e-12, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    check_tensor("x", x, dims=2)
    M, N = x.shape
    if residual is not None:
        check_tensor("residual", residual, dims=2, device=x.device)
        if residual.shape != x.shape:
            raise EtformerError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    for n, t in (("weight", weight), ("bias", bias)):
        check_tensor(n, t, dims=1, device=x.device)
        if t.shape[0] != N:
            raise EtformerError(f"{n} has {t.shape[0]} entries, x has {N} features")
    if not use_triton(x, backend):
        y = add_layernorm_reference(x, residual, weight, bias, eps)
        return y if out is None else out.copy_(y)
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise EtformerError("x and residual must have unit stride along features")
    out = torch.empty_like(x) if out is None else out
    if M == 0:
        return out
    block = next_pow2(N)
    _add_ln_kernel[(M,)](x, residual if residual is not None else x, weight, bias, out, N, x.stride(0),
                         residual.stride(0) if residual is not None else 0, out.stride(0), eps,
                         BLOCK=block, HAS_RES=residual is not None, num_warps=4 if block <= 1024 else 8)
    return out
