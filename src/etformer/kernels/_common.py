"""What every kernel file shares: Triton availability and the backend choice.

backend="auto" runs the Triton kernel on a CUDA tensor and the plain-PyTorch reference on a CPU tensor.
backend="triton" forces the kernel; on a CPU tensor that needs TRITON_INTERPRET=1 (the Triton interpreter, which is
how the tests check the kernels without a GPU). backend="reference" forces the PyTorch reference.
"""
from __future__ import annotations

import functools
import os
import sys
import types

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

try:  # grid dependency control (programmatic dependent launch, sm_90+)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.backends.nvidia.compiler import CUDAOptions

    HAS_PDL = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
except Exception:  # pragma: no cover - Triton without it
    HAS_PDL = False

try:  # host-side tensor descriptors (TMA); Triton 3.4 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Programmatic dependent launch (PDL): on sm_90+ the kernels of the encoder's chain are launched with launch_pdl, so
# each one is scheduled while its predecessor still runs; its programs do what needs no earlier result (an L2 prefetch
# of their weights), then wait (gdc_wait) for the predecessor's completion and memory, then let their own successor
# launch. Every kernel launched this way waits before it reads anything an earlier kernel wrote and before it writes
# anything, so the order of memory effects is the stream order. Module switch, for A/B runs.
USE_PDL = True


# Module switches. A CUDA graph bakes in what the switches and launch tables said when it was captured, so the engine
# drops its graphs when one changes (engine.encoder.replay_graph). Every assignment to an upper-case attribute of a
# module made a switch module by switch_module, and every change to one of its upper-case dict tables (item
# assignment, update, clear, ...), counts one more switch generation; the engine compares the count, which costs
# nothing per call, instead of the values.
_GENERATION = [0]


def switch_generation() -> int:
    """How many times a module switch or launch table has changed in this process."""
    return _GENERATION[0]


class SwitchTable(dict):
    """A launch table: any change to it counts as a switch change."""

    def __setitem__(self, key, value):
        _GENERATION[0] += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _GENERATION[0] += 1
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        _GENERATION[0] += 1
        super().update(*args, **kwargs)

    def clear(self):
        _GENERATION[0] += 1
        super().clear()

    def pop(self, *args):
        _GENERATION[0] += 1
        return super().pop(*args)

    def popitem(self):
        _GENERATION[0] += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        _GENERATION[0] += 1
        return super().setdefault(key, default)

    def __ior__(self, other):
        _GENERATION[0] += 1
        return super().__ior__(other)


class SwitchModule(types.ModuleType):
    """A module whose upper-case attributes are switches: assigning one counts as a switch change."""

    def __setattr__(self, name, value):
        if name[:1].isupper():
            _GENERATION[0] += 1
        super().__setattr__(name, value)


def switch_module(name: str) -> None:
    """Make module `name` a switch module, its upper-case dicts SwitchTables (called at the end of the module)."""
    mod = sys.modules[name]
    for key, value in list(vars(mod).items()):
        if key[:1].isupper() and type(value) is dict:
            setattr(mod, key, SwitchTable(value))
    mod.__class__ = SwitchModule


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


@functools.lru_cache(maxsize=None)
def capability(index):
    return torch.cuda.get_device_capability(index)


def pdl_on(t: torch.Tensor) -> bool:
    """Whether kernels on t's device are launched with programmatic dependent launch (see USE_PDL)."""
    return USE_PDL and HAS_PDL and t.is_cuda and not interpreting() and capability(t.device.index)[0] >= 9


def pdl_kwargs(pdl: bool) -> dict:
    """Launch keyword arguments for a kernel with a PDL constexpr."""
    return {"launch_pdl": True} if pdl else {}


if HAS_TRITON:

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """Wait for the previous kernel of the stream (its writes visible), then let the next one launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs):
        """Ask L2 to fetch the 128-byte lines at ptrs (a hint: nothing is loaded into registers)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


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


switch_module(__name__)  # USE_PDL is a switch
