"""What every kernel file shares: Triton availability and the backend choice.

backend="auto" runs the Triton kernel on a CUDA tensor and the plain-PyTorch reference on a CPU tensor.
backend="triton" forces the kernel; on a CPU tensor that needs TRITON_INTERPRET=1 (the Triton interpreter, which is
how the tests check the kernels without a GPU). backend="reference" forces the PyTorch reference.
"""
from __future__ import annotations

import os

import torch

from ..errors import EtformerError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton missing on this platform
    triton = None
    tl = None
    HAS_TRITON = False

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "triton", "reference"):
        raise EtformerError(f"backend must be auto, triton or reference, not {backend!r}")
    if backend == "reference":
        return False
    if backend == "auto":
        return HAS_TRITON and t.is_cuda
    ok = HAS_TRITON and (t.is_cuda or interpreting())
    if not ok:
        raise EtformerError("the Triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU")
    return ok


def check_tensor(name: str, t: torch.Tensor, dims: int | None = None, dtypes=KERNEL_DTYPES, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise EtformerError(f"{name} must be a tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise EtformerError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise EtformerError(f"{name} must be one of {[str(d).replace('torch.', '') for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise EtformerError(f"{name} is on {t.device}, expected {device}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
