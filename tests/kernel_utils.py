"""Where kernel tests run and how they judge an error: against an fp64 reference, at most twice PyTorch's own."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()

if CUDA and not INTERPRET:
    DEVICE, DTYPES = "cuda", [torch.float16, torch.bfloat16]
elif INTERPRET:
    DEVICE, DTYPES = "cpu", [torch.float32, torch.float16]  # the interpreter's bf16 loads are unreliable
else:
    DEVICE, DTYPES = None, []

needs_triton = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close(ours, peer, ref, what=""):
    """ours: the kernel; peer: PyTorch at the same precision; ref: fp64."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite output (unwritten poison?)"
    e, ep = rel(ours, ref), rel(peer, ref)
    limit = max(2 * ep, FLOOR[ours.dtype])
    assert e <= limit, f"{what}: error {e:.2e} > {limit:.2e} (PyTorch's own: {ep:.2e})"
