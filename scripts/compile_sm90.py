"""Compile every etformer Triton kernel for the H100/H200 (sm_90) on a machine without a GPU.

Triton's bundled toolchain lowers each kernel to PTX and cubin, so a kernel that would fail to compile on the GPU
fails here, in CI. Prints whether each kernel uses wgmma (Hopper's matrix instructions). Exit status 1 on failure.
Run without TRITON_INTERPRET (the interpreter replaces the kernels).
--tile-stats prints ptxas and SASS figures of the tile kernel's epilogue variants instead (tile_stats).
"""
import importlib
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
A = importlib.import_module("etformer.kernels.attention")
T = importlib.import_module("etformer.kernels.tile_linear")
N = importlib.import_module("etformer.kernels.layernorm")
EM = importlib.import_module("etformer.kernels.embedding")
F = importlib.import_module("etformer.kernels.fused_ffn")
E = importlib.import_module("etformer.kernels.encoder_layer")
P = importlib.import_module("etformer.kernels.padded")
AP = importlib.import_module("etformer.kernels.attention_proj")
tgt = GPUTarget("cuda", 90, 32)
ok = True
def comp(fn, sig, consts, name, warps=4, stages=3, attrs=None):
    global ok
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=tgt,
                           options={"num_warps": warps, "num_stages": stages})
        asm = k.asm.get("ptx", "")
        pdl, pre = consts.get("PDL", False), consts.get("PREFETCH", False)
        has = {"griddepcontrol.wait": "griddepcontrol.wait" in asm, "prefetch.global.L2": "prefetch.global.L2" in asm}
        if (pdl and not has["griddepcontrol.wait"]) or (pre and not has["prefetch.global.L2"]):
            ok = False
            print(f"{name}: PDL={pdl} PREFETCH={pre} but the PTX lacks {[k for k, v in has.items() if not v]}")
        print(f"{name}: compiled, wgmma={'wgmma' in asm}, PDL={has['griddepcontrol.wait']}, "
              f"prefetch={has['prefetch.global.L2']}, ptx {len(asm)} chars")
        return asm
    except Exception as e:
        ok = False
        print(f"{name}: FAILED {type(e).__name__}: {str(e)[:600]}")
p16, i32 = "*fp16", "*i32"
C = "constexpr"


# the grid tile kernel's deferred-LayerNorm arguments (row moments in, folded column sums, residual LayerNorm, moments out)
LN_SIG = {"xs_ptr": "*fp32", "colsum_ptr": "*fp32", "rs_ptr": "*fp32", "rg_ptr": p16, "rb_ptr": p16, "so_ptr": "*fp32",
          "x_inv_d": "fp32", "x_eps": "fp32", "r_inv_d": "fp32", "r_eps": "fp32"}


def tile_sig(tma, bm=128, bn=128):
    """The grid tile kernel's signature, 128x64 tiles, bm-row blocks of X, bn rows of each tile a program."""
    return {"x_src": f"tensordesc<fp16[{bm},64]>" if tma else p16, "w_src": f"tensordesc<fp16[{bn},64]>" if tma else p16,
            "w_ptr": p16, "row_ptr": i32, "col_idx": i32, "order_ptr": i32, "bias_ptr": p16, "res_ptr": p16,
            "y_ptr": p16, "y_desc": f"tensordesc<fp16[{bm},128]>" if tma else p16, "M": "i32", "N": "i32", "K": "i32",
            "stride_xm": "i32", "stride_ym": "i32", "stride_rm": "i32", "out_col": "i32", **LN_SIG,
            "r_desc": f"tensordesc<fp16[{bm},128]>" if tma else p16, "BN": C, "BK": C,
            "BLOCK_M": C, "GROUP_M": C, "HAS_BIAS": C, "ACT": C, "HAS_RES": C, "FP32_DOT": C, "TMA": C,
            "TMA_STORE": C, "DENSE_W": C, "PDL": C, "PREFETCH": C, "LINE": C, "BIAS_EARLY": C, "SUB": C, "PAIR": C,
            "XS_P": C, "RS_P": C, "SO_P": C, "RES_TMA": C}


def tile_stats(bm=128):
    """--tile-stats [--block-m 64]: what ptxas and the SASS say about the grid tile kernel's epilogues and the
    dense-weight form (TMA, 128-row blocks or bm, bias, PDL and prefetch off): registers, spills, shared memory, FP32 and MUFU instructions
    per output element a thread, and whether ptxas serialises the wgmma (C7515)."""
    import collections
    import os
    import subprocess
    import tempfile
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    cases = [("no activation", 0, False, False, 4, 4), ("GELU, libdevice erf", 1, False, False, 4, 4),
             ("GELU, polynomial erf", 3, False, False, 4, 4), ("GELU, polynomial erf, 8 warps", 3, False, False, 8, 4),
             ("residual, pointer load", 0, True, False, 4, 4, 0, 0, 0, False),
             ("residual, descriptor load (RES_TMA)", 0, True, False, 4, 4, 0, 0, 0, True),
             ("dense weight in place, 4 stages", 3, False, True, 4, 4),
             ("dense weight in place, 2 stages", 3, False, True, 4, 2),
             ("deferred LayerNorm: folded input, GELU", 3, False, False, 4, 4, 6, 0, 0, False),
             ("deferred LayerNorm: folded input, no activation", 0, False, False, 4, 4, 6, 0, 0, False),
             ("deferred LayerNorm: residual LayerNorm, row moments, pointer load", 0, True, False, 4, 4, 0, 6, 6, False),
             ("deferred LayerNorm: residual LayerNorm, row moments, descriptor load", 0, True, False, 4, 4, 0, 6, 6,
              True)]
    print(f"Triton {triton.__version__}, sm_90; grid tile kernel, 128x64 tiles, {bm}-row blocks, TMA, bias")
    for name, act, res, dense, warps, stages, *ln in cases:
        xs, rs, so, res_tma = ln or (0, 0, 0, False)
        consts = {"BN": 128, "BK": 64, "BLOCK_M": bm, "GROUP_M": 8, "HAS_BIAS": True, "ACT": act, "HAS_RES": res,
                  "FP32_DOT": False, "TMA": True, "TMA_STORE": True, "DENSE_W": dense, "PDL": False, "PREFETCH": 0,
                  "LINE": 64, "BIAS_EARLY": False, "SUB": 1, "PAIR": False, "XS_P": xs, "RS_P": rs, "SO_P": so,
                  "RES_TMA": res_tma}
        k = triton.compile(ASTSource(fn=T._tile_linear_kernel, signature=tile_sig(True, bm), constexprs=consts),
                           target=tgt, options={"num_warps": warps, "num_stages": stages})
        with tempfile.TemporaryDirectory() as d:
            ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
            open(ptx, "w").write(k.asm["ptx"])
            open(cubin, "wb").write(k.asm["cubin"])
            info = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                                  capture_output=True, text=True)
            sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
        log = info.stdout + info.stderr
        regs = re.search(r"Used (\d+) registers", log).group(1)
        spill = re.search(r"(\d+) bytes spill stores", log).group(1)
        ops = collections.Counter(m.group(1).split(".")[0] for m in
                                  re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
        per = bm * 128 / (32 * warps)  # output elements a thread holds
        fp32 = sum(ops[o] for o in ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL"))
        print(f"{name}: {regs} registers, {spill} bytes spilled, {k.metadata.shared} bytes shared, "
              f"FP32 {fp32 / per:.1f} and MUFU {ops['MUFU'] / per:.1f} a thread's output element, "
              f"{sum(ops.values())} SASS instructions, wgmma serialised (C7515): {'C7515' in log}")


if "--tile-stats" in __import__("sys").argv:
    _argv = __import__("sys").argv
    tile_stats(int(_argv[_argv.index("--block-m") + 1]) if "--block-m" in _argv else 128)
    raise SystemExit(0)
for tma in (False, True):
    ws = "tensordesc<fp16[128,64]>" if tma else p16
    comp(T._tile_linear_kernel, tile_sig(tma),
         {"BN": 128, "BK": 64, "BLOCK_M": 128, "GROUP_M": 8, "HAS_BIAS": True, "ACT": 3, "HAS_RES": True,
          "FP32_DOT": False, "TMA": tma, "TMA_STORE": tma, "DENSE_W": False, "PDL": tma,
          "PREFETCH": 1 if tma else 0, "LINE": 64, "BIAS_EARLY": True, "SUB": 1, "PAIR": False, "XS_P": 0, "RS_P": 0,
          "SO_P": 0, "RES_TMA": tma},
         f"tile_linear tma={tma} tma_store={tma}", stages=4)
    # deferred LayerNorm: a folded input with GELU (FFN-in), and a normalised residual with row moments out (FFN-out)
    for xs, rs, so, act, res, what in ((6, 0, 0, 3, False, "folded input + GELU"),
                                       (0, 6, 6, 0, True, "residual LayerNorm (descriptor load) + row moments")):
        comp(T._tile_linear_kernel, tile_sig(tma),
             {"BN": 128, "BK": 64, "BLOCK_M": 128, "GROUP_M": 8, "HAS_BIAS": True, "ACT": act, "HAS_RES": res,
              "FP32_DOT": False, "TMA": tma, "TMA_STORE": tma, "DENSE_W": False, "PDL": tma,
              "PREFETCH": 1 if tma else 0, "LINE": 64, "BIAS_EARLY": True, "SUB": 1, "PAIR": False, "XS_P": xs,
              "RS_P": rs, "SO_P": so, "RES_TMA": tma and res},
             f"tile_linear tma={tma}, deferred LayerNorm: {what}", stages=4)
    comp(T._tile_linear_kernel, tile_sig(tma, 64, 32),
         {"BN": 32, "BK": 64, "BLOCK_M": 64, "GROUP_M": 8, "HAS_BIAS": True, "ACT": 3, "HAS_RES": False,
          "FP32_DOT": False, "TMA": tma, "TMA_STORE": False, "DENSE_W": False, "PDL": tma,
          "PREFETCH": 1 if tma else 0, "LINE": 64, "BIAS_EARLY": True, "SUB": 4, "PAIR": True, "XS_P": 0, "RS_P": 0,
          "SO_P": 0, "RES_TMA": False},
         f"tile_linear tma={tma}, 4 programs a block-row, two tiles a trip (SUB, PAIR)", stages=4)
    xs = "tensordesc<fp16[64,64]>" if tma else p16
    comp(T._tile_linear_splitk_kernel,
         {"x_src": xs, "w_src": ws, "w_ptr": p16, "row_ptr": i32, "col_idx": i32, "ws_ptr": "*fp32", "M": "i32", "N": "i32",
          "K": "i32", "stride_xm": "i32", "SPLIT": "i32", "BN": C, "BK": C, "BLOCK_M": C, "FP32_DOT": C, "TMA": C,
          "DENSE_W": C, "PDL": C, "PREFETCH": C, "LINE": C, "SUB": C, "PAIR": C},
         {"BN": 128, "BK": 64, "BLOCK_M": 64, "FP32_DOT": False, "TMA": tma, "DENSE_W": False, "PDL": tma,
          "PREFETCH": 2 if tma else 0, "LINE": 64, "SUB": 1, "PAIR": False},
         f"tile_linear split-K tma={tma}")
# the persistent flattened tile kernel (large M): TMA loads and stores, 128x64 tiles; its K steps must be pipelined
# (bulk copies issued for later steps while the wgmma of the current one runs)
flat_sig = {"x_src": "tensordesc<fp16[128,64]>", "w_src": "tensordesc<fp16[128,64]>", "step_ptr": i32, "steps": i32,
            "ends": i32, "items_ptr": i32, "bias_ptr": p16, "res_ptr": p16, "y_ptr": p16,
            "y_desc": "tensordesc<fp16[128,128]>", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
            "stride_ym": "i32", "stride_rm": "i32", "out_col": "i32", "num_r": "i32"}
flat_c = {"BN": 128, "BK": 64, "BLOCK_M": 128, "HAS_BIAS": True, "ACT": 1, "HAS_RES": True, "FP32_DOT": False,
          "TMA": True, "TMA_STORE": True, "PDL": True}
flat_sig.update({k: C for k in flat_c})
flat_ptx = comp(T._tile_linear_flat_kernel, flat_sig, flat_c, "tile_linear persistent (flat)", stages=4)
if flat_ptx is not None:  # pipelined: the first steps' two bulk loads issued before the loop, two more inside it
    loads = len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", flat_ptx))  # ::cluster (3.6), ::cta
    print(f"  persistent kernel: bulk tensor loads in the code {loads} (pipelined: >= 4)")
    ok = ok and loads >= 4
# the small-batch path: a dense W [N, K] read in place through a descriptor, 64x64 blocks
comp(T._tile_linear_kernel,
     {"x_src": "tensordesc<fp16[64,64]>", "w_src": "tensordesc<fp16[64,64]>", "w_ptr": p16, "row_ptr": p16, "col_idx": p16,
      "order_ptr": p16, "bias_ptr": p16, "res_ptr": p16, "y_ptr": p16, "y_desc": p16, "M": "i32", "N": "i32",
      "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_rm": "i32", "out_col": "i32", **LN_SIG,
      "r_desc": p16, "BN": C, "BK": C, "BLOCK_M": C, "GROUP_M": C, "HAS_BIAS": C, "ACT": C, "HAS_RES": C, "FP32_DOT": C, "TMA": C,
      "TMA_STORE": C, "DENSE_W": C, "PDL": C, "PREFETCH": C, "LINE": C, "BIAS_EARLY": C, "SUB": C, "PAIR": C,
      "XS_P": C, "RS_P": C, "SO_P": C, "RES_TMA": C},
     {"BN": 64, "BK": 64, "BLOCK_M": 64, "GROUP_M": 8, "HAS_BIAS": True, "ACT": 3, "HAS_RES": False,
      "FP32_DOT": False, "TMA": True, "TMA_STORE": False, "DENSE_W": True, "PDL": True, "PREFETCH": 1, "LINE": 64, "BIAS_EARLY": True, "SUB": 1,
      "PAIR": False, "XS_P": 0, "RS_P": 0, "SO_P": 0, "RES_TMA": False},
     "tile_linear dense W", stages=4)
comp(F._ffn_kernel,
     {"x_src": "tensordesc<fp16[64,64]>", "w1_src": "tensordesc<fp16[128,64]>", "b1_ptr": p16,
      "w2_src": "tensordesc<fp16[128,128]>", "ws_ptr": "*fp32", "x_ptr": p16, "M": "i32", "D": "i32", "I": "i32",
      "stride_xm": "i32", "BLOCK_M": C, "BI": C, "BK": C, "BD": C, "ACT": C, "HAS_B1": C, "FP32_DOT": C, "TMA": C},
     {"BLOCK_M": 64, "BI": 128, "BK": 64, "BD": 128, "ACT": 3, "HAS_B1": True, "FP32_DOT": False, "TMA": True},
     "fused FFN")
comp(T._splitk_epilogue_kernel,
     {"ws_ptr": "*fp32", "bias_ptr": p16, "res_ptr": p16, "y_ptr": p16, "M": "i32", "N": "i32",
      "stride_ym": "i32", "stride_rm": "i32", "out_col": "i32", "SPLIT": C, "BLOCK_M": C, "BLOCK_N": C, "HAS_BIAS": C,
      "ACT": C, "HAS_RES": C, "PDL": C},
     {"SPLIT": 4, "BLOCK_M": 32, "BLOCK_N": 128, "HAS_BIAS": True, "ACT": 2, "HAS_RES": True, "PDL": True},
     "split-K epilogue")
# the persistent layer kernel (BERT-base: 12 heads of 64, d = 768, FFN 3072); its grid barrier must use gpu-scope
# release/acquire atomics
el_sig = {n: p16 for n in ("x_ptr", "wqkv_ptr", "bqkv_ptr", "wo_ptr", "bo_ptr", "ln1w_ptr", "ln1b_ptr", "w1_ptr",
                           "b1_ptr", "w2_ptr", "b2_ptr", "ln2w_ptr", "ln2b_ptr", "qkv_ptr", "h_ptr", "f_ptr", "y_ptr")}
el_sig.update({"cu_ptr": i32, "ws_ptr": "*fp32", "cnt_ptr": i32, "t_ptr": "*i64", "T": "i32", "NSEQ": "i32",
               "MAX_LEN": "i32", "qk_scale": "fp32", "eps": "fp32"})
el_c = dict(H=12, D=64, DV=64, HID=768, INTER=3072, BM=64, BN=64, BK=64, BM_ATT=64, BN_ATT=64, BD=64, BDV=64, NCH=2,
            BNO=64, BLOCK_HID=1024, SPLIT=4, ACT=1, FP32_DOT=False, PDL=True, PREFETCH=True, LINE=64, TIMING=True)
el_sig.update({k: C for k in el_c})
order = list(E._encoder_layer_kernel.arg_names)
# pointers 16-byte aligned, as the launcher's specialization finds them: the K loops then stream through cp.async
el_ptx = comp(E._encoder_layer_kernel, {n: el_sig[n] for n in order}, el_c, "encoder layer (persistent)",
              attrs={(order.index(n),): [["tt.divisibility", 16]] for n in order if el_sig[n].startswith("*")})
if el_ptx is not None:  # the arrival is a release atomic add (Triton 3.9 lowers it to red, 3.6 to atom with its result
    # unused), the spin an acquire load (an atomic add of 0 lowers to one)
    arrive = "red.global.gpu.release.add" in el_ptx or "atom.global.gpu.release.add" in el_ptx
    sync = arrive and "ld.global.gpu.acquire" in el_ptx
    print(f"encoder layer barrier: gpu-scope release arrival and acquire spin: {sync}, "
          f"pipelined loads (cp.async): {'cp.async.cg' in el_ptx}")
    ok = ok and sync and "cp.async.cg" in el_ptx
for one, bn, km in ((True, 128, False), (False, 64, False), (True, 128, True)):
    comp(A._attn_kernel,
         {"qkv_ptr": p16, "out_ptr": p16, "cu_ptr": i32, "bias_ptr": "*i64" if km else "*fp32", "stride_t": "i32",
          "stride_o": "i32", "stride_bb": "i32", "q_col": "i32", "k_col": "i32", "v_col": "i32", "D": C, "DV": C,
          "qk_scale": "fp32", "BLOCK_M": C, "BLOCK_N": C, "BLOCK_D": C, "BLOCK_DV": C, "ONE_PASS": C, "CAUSAL": C,
          "HAS_BIAS": C, "FP32_DOT": C, "PDL": C, "KEY_MASK": C, "q_desc": p16, "kv_desc": p16, "TMA": C},
         {"D": 64, "DV": 64, "BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_D": 64, "BLOCK_DV": 64, "ONE_PASS": one,
          "CAUSAL": not km, "HAS_BIAS": True, "FP32_DOT": False, "PDL": one, "KEY_MASK": km, "TMA": False},
         f"attention one_pass={one}" + (" key_mask" if km else ""), stages=1 if one else 3)
# Q, K and V as bulk tensor copies (attention(tma=True)): 128-row query blocks and 64-key blocks (S > 128), and the
# one-pass kernel's 64 x 128; the key blocks inside the sequence must come by cp.async.bulk.tensor
for one, bm, bn, w in ((False, 128, 64, 8), (True, 64, 128, 4)):
    att_ptx = comp(A._attn_kernel,
                   {"qkv_ptr": p16, "out_ptr": p16, "cu_ptr": i32, "bias_ptr": "*fp32", "stride_t": "i32",
                    "stride_o": "i32", "stride_bb": "i32", "q_col": "i32", "k_col": "i32", "v_col": "i32", "D": C,
                    "DV": C, "qk_scale": "fp32", "BLOCK_M": C, "BLOCK_N": C, "BLOCK_D": C, "BLOCK_DV": C,
                    "ONE_PASS": C, "CAUSAL": C, "HAS_BIAS": C, "FP32_DOT": C, "PDL": C, "KEY_MASK": C,
                    "q_desc": f"tensordesc<fp16[{bm},64]>", "kv_desc": f"tensordesc<fp16[{bn},64]>", "TMA": C},
                   {"D": 64, "DV": 64, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": 64, "BLOCK_DV": 64, "ONE_PASS": one,
                    "CAUSAL": False, "HAS_BIAS": False, "FP32_DOT": False, "PDL": True, "KEY_MASK": False,
                    "TMA": True},
                   f"attention one_pass={one}, TMA", warps=w, stages=1 if one else 3)
    if att_ptx is not None:
        bulk = "cp.async.bulk.tensor" in att_ptx
        print(f"  attention TMA one_pass={one}: bulk tensor loads {bulk}")
        ok = ok and bulk
# attention with the O projection's per-head partial sums (the small-batch path), plain and with a key mask
for km in (False, True):
    ap_sig = {"qkv_ptr": p16, "cu_ptr": i32, "wo_ptr": p16, "ws_ptr": "*fp32", "bias_ptr": "*i8" if km else p16,
              "T": "i32", "stride_bb": "i32", "qk_scale": "fp32"}
    ap_c = dict(H=12, D=64, DV=64, HID=768, QKV_W=2304, BM=64, BN=128, BD=64, BDV=64, NCH=4, BNO=64, CAUSAL=False,
                HAS_BIAS=km, KEY_MASK=km, FP32_DOT=False, PDL=True, PREFETCH=True, LINES=1, LINE=64)
    ap_sig.update({k: C for k in ap_c})
    ap_order = list(AP._attn_proj_kernel.arg_names)
    comp(AP._attn_proj_kernel, {n: ap_sig[n] for n in ap_order}, ap_c,
         "attention + O projection partials" + (" key_mask" if km else ""), stages=2,
         attrs={(ap_order.index(n),): [["tt.divisibility", 16]] for n in ap_order if ap_sig[n].startswith("*")})
comp(P._finish_kernel, {"x_ptr": p16, "m_ptr": "*i64", "y_ptr": p16, "st_ptr": i32, "N": "i32", "S": "i32",
                        "BLOCK": C, "PDL": C}, {"BLOCK": 1024, "PDL": True}, "finish padded")
ln_sig = {"x_ptr": p16, "r_ptr": p16, "w_ptr": p16, "b_ptr": p16, "y_ptr": p16, "xb_ptr": p16, "M": "i32", "N": "i32",
          "stride_x": "i32", "stride_r": "i32", "stride_y": "i32", "eps": "fp32", "stride_s": "i32", "rw_ptr": p16,
          "rb_ptr": p16, "SPLIT": C, "BLOCK": C, "HAS_RES": C, "HAS_XB": C, "PDL": C, "ROWS": C, "RES_LN": C}
comp(N._add_ln_kernel, ln_sig, {"SPLIT": 1, "BLOCK": 1024, "HAS_RES": True, "HAS_XB": False, "PDL": False, "ROWS": 1},
     "add_layernorm")
comp(N._add_ln_kernel, {**ln_sig, "x_ptr": "*fp32"},
     {"SPLIT": 3, "BLOCK": 1024, "HAS_RES": True, "HAS_XB": True, "PDL": True, "ROWS": 1},
     "add_layernorm of partial sums (PDL)")
comp(N._add_ln_kernel, {**ln_sig, "x_ptr": "*fp32"},
     {"SPLIT": 4, "BLOCK": 1024, "HAS_RES": True, "HAS_XB": True, "PDL": True, "ROWS": 1, "RES_LN": True},
     "add_layernorm of partial sums, residual normalised (PDL)")
_, ln_rows, ln_warps = N.MULTI_ROW_LAUNCH[-1]  # the shipped multi-row launch
comp(N._add_ln_kernel, ln_sig,
     {"SPLIT": 1, "BLOCK": 1024, "HAS_RES": True, "HAS_XB": False, "PDL": True, "ROWS": ln_rows},
     f"add_layernorm, {ln_rows} rows a program", warps=ln_warps)
comp(EM._embed_ln_kernel,
     {"ids_ptr": "*i64", "pos_ptr": "*i64", "tt_ptr": "*i64", "word_ptr": p16, "posw_ptr": p16, "type_ptr": p16,
      "w_ptr": p16, "b_ptr": p16, "y_ptr": p16, "N": "i32", "n_word": "i32", "n_pos": "i32", "n_type": "i32",
      "s_word": "i32", "s_pos": "i32", "s_type": "i32", "stride_y": "i32", "eps": "fp32", "BLOCK": C, "HAS_TYPE": C,
      "HAS_TT": C, "PDL": C},
     {"BLOCK": 1024, "HAS_TYPE": True, "HAS_TT": True, "PDL": True}, "embeddings + LayerNorm (PDL)")
# Wide heads (E.T.'s Transformer: D = 200, padded to 256 on chip). D is a compile-time constant so that the head
# offsets h*D are known multiples of 8 elements: the loads are then 16-byte vectors and K/V stream through cp.async.
# With D a run-time integer (not a multiple of 16, so Triton could not assume alignment) every load was a 2-byte
# scalar and nothing was pipelined (4-5x slower than SDPA flash at S=512 on the H200, tune_attention_wide.json).
sig = {"qkv_ptr": p16, "out_ptr": p16, "cu_ptr": i32, "bias_ptr": "*fp32", "stride_t": "i32", "stride_o": "i32",
       "stride_bb": "i32", "q_col": "i32", "k_col": "i32", "v_col": "i32", "D": C, "DV": C, "qk_scale": "fp32",
       "BLOCK_M": C, "BLOCK_N": C, "BLOCK_D": C, "BLOCK_DV": C, "ONE_PASS": C, "CAUSAL": C, "HAS_BIAS": C, "FP32_DOT": C,
       "PDL": C, "KEY_MASK": C, "q_desc": p16, "kv_desc": p16, "TMA": C}
names = list(sig)
aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in ("qkv_ptr", "out_ptr", "cu_ptr", "stride_t", "stride_o",
                                                                  "q_col", "k_col", "v_col")}
try:
    k = triton.compile(ASTSource(fn=A._attn_kernel, signature=sig, attrs=aligned, constexprs={
        "D": 200, "DV": 200, "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 256, "BLOCK_DV": 256, "ONE_PASS": False,
        "CAUSAL": True, "HAS_BIAS": False, "FP32_DOT": False, "PDL": False, "KEY_MASK": False, "TMA": False}),
        target=tgt, options={"num_warps": 8, "num_stages": 2})
    ptx = k.asm["ptx"]
    vec = "ld.global.v4" in ptx and "cp.async" in ptx
    print(f"attention D=200: compiled, 16-byte loads and cp.async pipelining: {vec}")
    ok = ok and vec
except Exception as e:
    ok = False
    print(f"attention D=200: FAILED {type(e).__name__}: {str(e)[:600]}")
# The warp-specialised Gluon tile kernel (kernels/tile_linear_ws.py): one and two consumers, GELU and residual. Its
# partitions must come out as such: setmaxnreg for the loader and the consumers, bulk loads, wgmma.
WS = importlib.import_module("etformer.kernels.tile_linear_ws")
if WS.HAS_GLUON:
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource

    def _ws_desc(block):
        return f"tensordesc<fp16[{block[0]},{block[1]}],{WS.shared_layout(block, torch.float16)!r}>"

    for cons, stages, act, res, coop in ((2, 4, 1, False, False), (1, 2, 0, True, False), (2, 3, 1, False, True)):
        name = f"tile_linear_ws consumers={cons} stages={stages}" + (" cooperative" if coop else "")
        sig = {"x_desc": _ws_desc([128, 64]), "w_desc": _ws_desc([128, 64]), "y_desc": _ws_desc([128, 128]),
               "brow_ptr": i32, "col_idx": i32, "bias_ptr": p16, "res_ptr": p16, "M": "i32", "N": "i32", "nnz": "i32",
               "stride_rm": "i32", "num_items": "i32"}
        consts = dict(BLOCK_M=128, BN=128, BK=64, GROUP_M=8, STAGES=stages, CONSUMERS=cons, HAS_BIAS=True, ACT=act,
                      HAS_RES=res, LOADER_REGS=WS.LOADER_REGS, CONSUMER_REGS=WS.CONSUMER_REGS, AHEAD=WS.WS_AHEAD,
                      COOP=coop)
        sig.update({k: C for k in consts})
        try:
            k = triton.compile(GluonASTSource(fn=WS._tile_linear_ws_kernel, signature=sig, constexprs=consts),
                               target=tgt, options={"num_warps": 4, "maxnreg": WS._maxnreg(cons)})
            ptx = k.asm["ptx"]
            parts = "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx and "mbarrier" in ptx
            print(f"{name}: compiled, wgmma={'wgmma' in ptx}, partitions (setmaxnreg, bulk loads, mbarriers): "
                  f"{parts}, shared {k.metadata.shared} bytes")
            ok = ok and parts and "wgmma" in ptx
        except Exception as e:
            ok = False
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:600]}")
else:
    print("tile_linear_ws: this Triton has no Gluon Hopper support, not compiled")
raise SystemExit(0 if ok else 1)
