"""Attention with V heads narrower than Q/K on the GPU, one configuration per process (an illegal memory access
ends the CUDA context, so a sweep runs this once per line):

    python3 scripts/narrow_v_probe.py DV S B V_BLOCK_MIN

12 heads of 64, fp16, B sequences of S tokens. The V block is max(V_BLOCK_MIN, next_pow2(DV)), replacing the
launcher's rule (attention.head_blocks, whose V block never goes below the Q/K block on the GPU), so the configurations that
faulted before the fix can still be run. Prints the relative error against attention_reference, or the error raised.
(benchmarks/results/h200/reorder/narrow_v_diag.log)
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


if __name__ == "__main__":
    main(*map(int, sys.argv[1:5]))
