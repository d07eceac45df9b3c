"""How far the kernels' polynomial-erf GELU is from the exact erf form, on the CPU (no GPU).

    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/gelu_error.py

Runs tile_linear's _gelu_poly (the portable form the interpreter uses: the same polynomial, with 1/x and exp2 where
the GPU form has rcp.approx.ftz and ex2.approx.ftz) in fp32 over 1,000,001 points of [-12, 12], and prints its
largest absolute error against GELU's erf form in fp64, beside the error of torch's own fp32 GELU (the erf form).
"""
import importlib
import math
import os

import torch

from etformer.kernels._common import tl, triton

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (the portable form on the CPU)")
T = importlib.import_module("etformer.kernels.tile_linear")


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, T._gelu_poly(x, False), mask=offs < n)


x = torch.linspace(-12, 12, 1_000_001, dtype=torch.float32)
y = torch.empty_like(x)
_gelu_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
xd = x.double()
exact = 0.5 * xd * (1 + torch.erf(xd / math.sqrt(2)))
print(f"polynomial erf, fp32: max |error| {(y.double() - exact).abs().max().item():.2e}")
print(f"torch's GELU (erf form), fp32: max |error| {(torch.nn.functional.gelu(x).double() - exact).abs().max().item():.2e}")
