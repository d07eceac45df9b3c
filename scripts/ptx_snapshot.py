"""The sm_90 PTX of every kernel scripts/compile_sm90.py compiles, one file each, without debug lines, for comparing two
versions of the code on a machine without a GPU:

    PYTHONPATH=src python3 scripts/ptx_snapshot.py /tmp/ptx/after        # this tree (the venv's Triton)
    PYTHONPATH=.venv/triton36:src python3 scripts/ptx_snapshot.py ...    # the GPU machines' Triton 3.6
    git stash; ... /tmp/ptx/before; git stash pop; diff -r /tmp/ptx/before /tmp/ptx/after

Files are numbered in compile order (NN_kernel.ptx). Debug sections, .loc/.file lines, comments and the compiler's
temporary labels are dropped, so a refactor that leaves the instructions alone compares equal.
"""
import os
import re
import runpy
import sys

import triton

_DEBUG = re.compile(r"\s*(\.loc|\.file|//)")


def strip(ptx: str) -> str:
    ptx = re.sub(r"\s*\.section\s+\.debug.*", "", ptx, flags=re.S)
    lines = [line for line in ptx.splitlines()
             if not _DEBUG.match(line) and not re.match(r"\s*\$L__tmp\d+:\s*$", line)]  # debug labels
    return "\n".join(re.sub(r"\$L__tmp\d+", "", line) for line in lines)


def main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    compile_ = triton.compile
    count = [0]

    def recording(src, *args, **kwargs):
        kernel = compile_(src, *args, **kwargs)
        count[0] += 1
        with open(os.path.join(out_dir, f"{count[0]:02d}_{src.fn.__name__}.ptx"), "w") as f:
            f.write(strip(kernel.asm.get("ptx", "")))
        return kernel

    triton.compile = recording
    sys.argv = ["compile_sm90.py"]
    try:
        runpy.run_path(os.path.join(os.path.dirname(__file__), "compile_sm90.py"), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        triton.compile = compile_
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
