"""The last step of a batch run padded (every (b, s) position computed, the mask applied inside attention).

finish_padded(x, mask) returns
  * y: x with the rows of padded positions set to zero (what the packed path returns there), and
  * status: int32 [1 + B]: status[0] counts the non-finite values of the kept rows, status[1 + b] the kept positions
    of sequence b (0: an all-padding row),
in one launch, so the caller reads everything it must check with one small device-to-host copy.
"""
from __future__ import annotations

import torch

from ..errors import EtformerError
from ._common import HAS_TRITON, check_tensor, next_pow2, pdl_kwargs, pdl_on, tl, triton, use_triton
from .attention import MASK_DTYPES

if HAS_TRITON:
    from ._common import pdl_enter


def finish_padded_reference(x, mask):
    B, S = mask.shape
    keep = mask.reshape(-1) != 0
    y = torch.where(keep[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    bad = (~torch.isfinite(x[keep])).sum().to(torch.int32).reshape(1)
    return y, torch.cat((bad, (mask != 0).sum(1).to(torch.int32)))


if HAS_TRITON:

    @triton.jit
    def _finish_kernel(x_ptr, m_ptr, y_ptr, st_ptr, N, S, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        keep = tl.load(m_ptr + row) != 0
        x = tl.load(x_ptr + row.to(tl.int64) * N + cols, mask=ok, other=0.0)
        xf = x.to(tl.float32)
        bad = tl.sum(((xf != xf) | (tl.abs(xf) == float("inf"))).to(tl.int32), 0)
        tl.store(y_ptr + row.to(tl.int64) * N + cols, tl.where(keep, x, tl.zeros_like(x)), mask=ok)
        if keep:
            tl.atomic_add(st_ptr + 1 + row // S, 1)
            if bad > 0:
                tl.atomic_add(st_ptr, bad)


def finish_padded(x: torch.Tensor, mask: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B*S, d] rows of a padded batch; mask: [B, S] (bool or integer, nonzero: a real token). Returns (y, status)
    as the module docstring says."""
    check_tensor("x", x, dims=2)
    check_tensor("mask", mask, dims=2, dtypes=MASK_DTYPES, device=x.device)
    B, S = mask.shape
    if x.shape[0] != B * S:
        raise EtformerError(f"x has {x.shape[0]} rows, the mask {B} x {S} positions")
    if not use_triton(x, backend):
        return finish_padded_reference(x, mask)
    x, mask = x.contiguous(), mask.contiguous()
    y = torch.empty_like(x)
    status = torch.zeros(1 + B, device=x.device, dtype=torch.int32)
    if x.numel() == 0:
        return y, status
    pdl = pdl_on(x)
    block = next_pow2(x.shape[1])
    _finish_kernel[(B * S,)](x, mask, y, status, x.shape[1], S, BLOCK=block, num_warps=4 if block <= 1024 else 8,
                             PDL=pdl, **pdl_kwargs(pdl))
    return y, status
