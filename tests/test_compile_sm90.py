"""Every Triton kernel compiles for sm_90 (H100/H200) here, without a GPU, and the matrix kernels use wgmma."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA toolchain ships for Linux")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compile_sm90.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [l for l in r.stdout.splitlines() if ": compiled" in l]
    assert len(lines) == 15, r.stdout
    for name in ("tile_linear tma=False tma_store=False:", "tile_linear tma=True tma_store=True:",
                 "tile_linear split-K tma=False:", "tile_linear split-K tma=True:", "attention one_pass=True:",
                 "attention one_pass=False:", "tile_linear dense W:", "fused FFN:", "encoder layer (persistent):",
                 "attention one_pass=True key_mask:"):
        assert any(l.startswith(name) and "wgmma=True" in l for l in lines), (name, r.stdout)
    assert any(l.startswith("attention D=200:") and l.endswith("pipelining: True") for l in lines), r.stdout
    assert any(l.startswith("finish padded:") and "PDL=True" in l for l in lines), r.stdout
    assert any(l.startswith("encoder layer barrier:") and l.endswith("spin: True, pipelined loads (cp.async): True") for l in r.stdout.splitlines()), \
        r.stdout
