"""Attention with V heads narrower than Q/K on the GPU, one configuration per process (an illegal memory access
ends the CUDA context, so a sweep runs this once per line):

    python3 scripts/narrow_v_probe.py DV S B V_BLOCK_MIN

12 heads of 64, fp16, B sequences of S tokens. The V block is max(V_BLOCK_MIN, next_pow2(DV)), replacing the
launcher's rule (attention.head_blocks, whose V block never goes below the Q/K block on the GPU), so the configurations that
faulted before the fix can still be run. Prints the relative error against attention_reference, or the error raised.
(benchmarks/results/h200/reorder/narrow_v_diag.log)

    python3 scripts/narrow_v_probe.py --ptx

No GPU needed: compiles the one-pass kernel (64 query rows, 128-key block, heads of 64, 4 warps) for sm_90 with V
blocks of 16, 32 and 64 and prints how the compiled forms differ: shared memory, the shared layouts' swizzle widths
and the PV product's wgmma shape (benchmarks/results/cpu/narrow_v_ptx.log).
"""
import importlib
import sys

import torch

A = importlib.import_module("etformer.kernels.attention")  # the module (etformer.kernels re-exports the function)


def main(DV: int, S: int, B: int, v_block_min: int) -> None:
    A.head_blocks = lambda d, dv, on_gpu: (max(16, A.next_pow2(d)), max(v_block_min, A.next_pow2(dv)))
    torch.manual_seed(0)
    H, D, T = 12, 64, B * S
    qkv = torch.randn(T, 2 * H * D + H * DV, device="cuda", dtype=torch.float16)
    cu = torch.arange(0, T + 1, S, device="cuda", dtype=torch.int32)
    tag = f"DV={DV} S={S} B={B} MIN_BLOCK_DV={v_block_min}"
    try:
        y = A.attention(qkv, cu, S, H, D, v_head_dim=DV)
        torch.cuda.synchronize()
        r = A.attention_reference(qkv, cu, H, D, v_head_dim=DV)
        print(f"{tag}: rel {float((y.float() - r.float()).norm() / r.float().norm()):.2e}")
    except Exception as e:  # the failure is the result
        print(f"{tag}: {type(e).__name__} {str(e).splitlines()[0][:80]}")


def ptx_forms() -> None:
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    C = "constexpr"
    sig = {"qkv_ptr": "*fp16", "out_ptr": "*fp16", "cu_ptr": "*i32", "bias_ptr": "*fp16", "stride_t": "i32",
           "stride_o": "i32", "stride_bb": "i32", "q_col": "i32", "k_col": "i32", "v_col": "i32", "D": C, "DV": C,
           "qk_scale": "fp32", "BLOCK_M": C, "BLOCK_N": C, "BLOCK_D": C, "BLOCK_DV": C, "ONE_PASS": C, "CAUSAL": C,
           "HAS_BIAS": C, "FP32_DOT": C, "PDL": C, "KEY_MASK": C}
    for bdv in (16, 32, 64):
        k = triton.compile(ASTSource(fn=A._attn_kernel, signature=sig, constexprs={
            "D": 64, "DV": min(bdv, 32), "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64, "BLOCK_DV": bdv,
            "ONE_PASS": True, "CAUSAL": False, "HAS_BIAS": False, "FP32_DOT": False, "PDL": True,
            "KEY_MASK": False}), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
        ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
        swizzles = sorted({int(x) for x in re.findall(r"swizzlingByteWidth = (\d+)", ttgir)})
        shapes = re.findall(r"instrShape = \[([\d, ]+)\]", ttgir)
        print(f"Triton {triton.__version__}, BLOCK_DV {bdv}: shared {k.metadata.shared} bytes, swizzle widths "
              f"{swizzles}, wgmma instruction shapes {shapes}, {ptx.count('wgmma.mma_async')} wgmma in the PTX")


if __name__ == "__main__":
    if sys.argv[1:] == ["--ptx"]:
        ptx_forms()
    else:
        main(*map(int, sys.argv[1:5]))
