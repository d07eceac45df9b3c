"""Every Triton kernel compiles for sm_90 (H100/H200) here, without a GPU, and the matrix kernels use wgmma.

Twice: with the venv's Triton, and with the GPU machines' Triton 3.6 (installed by scripts/setup.sh into
.venv/triton36), since a kernel can compile under one and not the other (3.6 rejects a string default of a
constexpr parameter in a called @triton.jit function, which 3.9 accepts)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


OLD_TRITON = os.path.join(ROOT, ".venv", "triton36")


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA toolchain ships for Linux")
@pytest.mark.parametrize("toolchain", ["venv", "triton36"])
def test_kernels_compile_for_sm90(toolchain):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if toolchain == "triton36":
        assert os.path.isfile(os.path.join(OLD_TRITON, "triton", "__init__.py")), "run scripts/setup.sh"
        env["PYTHONPATH"] = os.pathsep.join([OLD_TRITON, os.path.join(ROOT, "src")] + env.get("PYTHONPATH", "").split(os.pathsep))
        v = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert v.stdout.strip() == "3.6.0", v.stdout + v.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compile_sm90.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [l for l in r.stdout.splitlines() if ": compiled" in l]
    assert len(lines) == 32, r.stdout
    for name in ("tile_linear tma=False tma_store=False:", "tile_linear tma=True tma_store=True:",
                 "tile_linear split-K tma=False:", "tile_linear split-K tma=True:", "attention one_pass=True:",
                 "attention one_pass=False:", "tile_linear dense W:", "fused FFN:", "encoder layer (persistent):",
                 "attention one_pass=True key_mask:", "attention + O projection partials:",
                 "attention + O projection partials key_mask:", "tile_linear persistent (flat):",
                 "tile_linear tma=False, 4 programs a block-row, two tiles a trip (SUB, PAIR):",
                 "tile_linear tma=True, 4 programs a block-row, two tiles a trip (SUB, PAIR):",
                 "tile_linear_ws consumers=2 stages=4:", "tile_linear_ws consumers=1 stages=2:",
                 "tile_linear tma=True, deferred LayerNorm: folded input + GELU:",
                 "tile_linear tma=True, deferred LayerNorm: residual LayerNorm (descriptor load) + row moments:",
                 "tile_linear tma=False, deferred LayerNorm: folded input + GELU:"):
        assert any(l.startswith(name) and "wgmma=True" in l for l in lines), (name, r.stdout)
    assert any(l.startswith("attention D=200:") and l.endswith("pipelining: True") for l in lines), r.stdout
    assert sum("partitions (setmaxnreg, bulk loads, mbarriers): True" in l for l in lines) == 3, r.stdout
    assert any(l.startswith("tile_linear_ws consumers=2 stages=3 cooperative:") for l in lines), r.stdout
    for one in (False, True):
        assert f"  attention TMA one_pass={one}: bulk tensor loads True" in r.stdout.splitlines(), r.stdout
    assert any(l.startswith("finish padded:") and "PDL=True" in l for l in lines), r.stdout
    assert any(l.startswith("add_layernorm of partial sums, residual normalised (PDL):") and "PDL=True" in l
               for l in lines), r.stdout
    assert any(l.startswith("embeddings + LayerNorm (PDL):") and "PDL=True" in l for l in lines), r.stdout
    assert any(l.startswith("encoder layer barrier:") and l.endswith("spin: True, pipelined loads (cp.async): True") for l in r.stdout.splitlines()), \
        r.stdout


def test_ptx_snapshot_strips_only_debug_text():
    """scripts/ptx_snapshot.py's filter: debug sections, .loc/.file lines, comments and debug labels go; every
    instruction stays, with references to debug labels blanked (they differ between otherwise equal builds)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ptx_snapshot", os.path.join(ROOT, "scripts", "ptx_snapshot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ptx = ("\t.loc\t1 12 3\n$L__tmp4:\n\tld.global.b32 \t%r1, [%rd1];\n// a comment\n\t.file\t1 \"x.py\"\n"
           "\tadd.s32 \t%r2, %r1, 1;\n\t.b64 $L__tmp7\n\t.section\t.debug_info\n{\n.b8 1\n}\n")
    assert mod.strip(ptx) == "\tld.global.b32 \t%r1, [%rd1];\n\tadd.s32 \t%r2, %r1, 1;\n\t.b64 "
