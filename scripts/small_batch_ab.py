"""Same-run A/B of the engine's small-batch path on a BERT-base-shaped encoder (random weights, fp16), on a GPU.

    python3 scripts/small_batch_ab.py OUT_DIR                       # the first A/B (small_batch_ab.json)
    python3 scripts/small_batch_ab.py OUT_DIR --ffn                 # the fused FFN block (fused_ffn_ab.json)
    python3 scripts/small_batch_ab.py OUT_DIR --pdl                 # PDL and the weight prefetch (pdl_ab.json)
    python3 scripts/small_batch_ab.py OUT_DIR --layer               # one persistent launch a layer (layer_ab.json)
        [--layer-config '{"NCH": 4}'] [--shapes 1x128,2x128] [--no-sweep]   # its launch shape, the shapes, no sweep

Modes (etformer.engine.encoder): SMALL_PATH="cublas" (F.linear, separate GELU, add+LN after each GEMM), "triton"
(etformer's kernels on the dense weights: GELU in the FFN-in epilogue, split-K partial sums reduced inside add+LN), and
"triton" with SMALL_SPARSE (pruned matrices on their tiles); each with the fused FFN block off. With --ffn: cuBLAS
with the fused FFN block on (FUSED_FFN_MAX_TOKENS), and that with SMALL_PATH="triton" for the output projection. For each (B, S, plan, mode): end-to-end median (the
encoder call, graphed) and the GPU time of the graph replay alone, the cuBLAS + SDPA CUDA-graph layer stack beside it,
and the relative error against the fp32 model (with HF's own fp16 error for scale). Then a launch sweep of the
dense-weight kernel at 128 rows (direct and partial sums) for the four BERT-base matrices, and a kernel-level
profile of one B=1, S=128 forward per mode. Writes small_batch_ab.json.
"""
import copy
import importlib
import json
import os
import sys

import torch

from etformer.bench.peers import cublas_sdpa_graph
from etformer.bench.run import _rel, make_inputs, model_shape
from etformer.bench.timing import env_info, profile_kernels, time_cuda
from etformer.engine import encoder as E
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.sparse.tiles import atomic_write_json

TL = importlib.import_module("etformer.kernels.tile_linear")
KC = importlib.import_module("etformer.kernels._common")
EL = importlib.import_module("etformer.kernels.encoder_layer")

# mode: (SMALL_PATH, SMALL_SPARSE, FUSED_FFN_MAX_TOKENS[, USE_PDL, PREFETCH_MAX_ROWS[, FUSED_LAYER, layer PREFETCH]]);
# the first two A/Bs predate PDL and the prefetch, so their modes run with both off, and all but the last predate the
# one-launch layer, so theirs run without it
MODES = {"cublas": ("cublas", False, 0), "triton": ("triton", False, 0), "triton_sparse": ("triton", True, 0)}
SHAPES = [(1, 128), (1, 512), (8, 128), (2, 384)]
FFN_MODES = {"cublas": ("cublas", False, 0), "fused_ffn": ("cublas", False, 1 << 20),
             "fused_ffn+triton_o": ("triton", False, 1 << 20)}
FFN_SHAPES = [(1, 128), (2, 128), (1, 384), (1, 512), (8, 128)]
FFN_CONFIGS = [(64, 128, 64, 128, 4, 3), (64, 64, 64, 128, 4, 3), (64, 128, 64, 64, 4, 3), (64, 128, 64, 128, 8, 3),
               (128, 128, 64, 128, 8, 3), (64, 256, 64, 128, 8, 2)]


# PDL (every etformer kernel launched with programmatic dependent launch) and the L2 weight prefetch of the GEMM
# kernels, on both small-batch paths; 32 x 128 and 8 x 512 run the large path (tiles when sparse, cuBLAS when dense).
ALL_ROWS = 1 << 30
PDL_MODES = {"cublas": ("cublas", False, 0, False, 0), "cublas+pdl": ("cublas", False, 0, True, 0),
             "triton": ("triton", False, 0, False, 0), "triton+prefetch": ("triton", False, 0, False, ALL_ROWS),
             "triton+pdl": ("triton", False, 0, True, 0), "triton+pdl+prefetch": ("triton", False, 0, True, ALL_ROWS)}
PDL_SHAPES = [(1, 128), (1, 512), (8, 128), (2, 384), (32, 128)]

# The one-launch layer (kernels/encoder_layer.py) against the seven-launch kernel path and cuBLAS, all with PDL; the
# kernel path forced ("triton") so that shapes past SMALL_KERNEL_MAX_TOKENS show where each stops winning.
LAYER_MODES = {"cublas+pdl": ("cublas", False, 0, True, 0, False, False),
               "triton+pdl+prefetch": ("triton", False, 0, True, 256, False, False),
               "layer": ("triton", False, 0, True, 256, True, True),
               "layer-noprefetch": ("triton", False, 0, True, 256, True, False)}
LAYER_SHAPES = [(1, 128), (1, 256), (2, 128), (1, 512), (4, 128), (8, 128)]
# Launch shapes of the layer kernel swept on a graphed chain of 12 BERT-base layers: CONFIG overrides and grid size.
LAYER_SWEEP = [({}, None), ({}, 96), ({}, 64), ({"NCH": 1}, None), ({"NCH": 4}, None), ({"SPLIT": 2}, None),
               ({"SPLIT": 8}, None), ({"BM": 32}, None), ({"BM_ATT": 32}, None), ({"num_warps": 8}, None),
               ({"num_stages": 2}, None), ({"BN": 128}, None)]

ALL_MODES = {**MODES, **FFN_MODES, **PDL_MODES, **LAYER_MODES}


def set_mode(mode):
    m = ALL_MODES[mode]
    m = m + (False, 0, False, True)[len(m) - 3:]
    E.SMALL_PATH, E.SMALL_SPARSE, E.FUSED_FFN_MAX_TOKENS, KC.USE_PDL, TL.PREFETCH_MAX_ROWS, E.FUSED_LAYER, \
        EL.PREFETCH = m


def reset_mode():
    """The library's defaults (the modes above set module globals)."""
    E.SMALL_PATH, E.SMALL_SPARSE, E.FUSED_FFN_MAX_TOKENS = DEFAULTS[:3]
    KC.USE_PDL, TL.PREFETCH_MAX_ROWS, E.FUSED_LAYER, EL.PREFETCH = DEFAULTS[3:]


DEFAULTS = (E.SMALL_PATH, E.SMALL_SPARSE, E.FUSED_FFN_MAX_TOKENS, KC.USE_PDL, TL.PREFETCH_MAX_ROWS, E.FUSED_LAYER,
            EL.PREFETCH)


def layer_sweep():
    """GPU time of a CUDA graph of 12 BERT-base layers (B=1 and 2 x 128 tokens) per launch shape of the layer kernel."""
    out = []
    torch.manual_seed(0)
    HID, I, H, D = 768, 3072, 12, 64
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16)  # noqa: E731
    w = (r(3 * HID, HID) / 28, r(3 * HID) / 10, r(HID, HID) / 28, r(HID) / 10, (1 + r(HID) / 10, r(HID) / 10),
         r(I, HID) / 28, r(I) / 10, r(HID, I) / 55, r(HID) / 10, (1 + r(HID) / 10, r(HID) / 10))
    for lens in ([128], [128, 128]):
        x = r(sum(lens), HID)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
        for cfg, progs in LAYER_SWEEP:
            def chain():
                c = torch.zeros(12, dtype=torch.int32, device="cuda")
                h = x
                for i in range(12):
                    h = EL.encoder_layer(h, cu, max(lens), H, D, *w, counter=c[i:i + 1], programs=progs, _config=cfg)
                return h
            try:
                t = time_cuda(chain, graph=True, min_ms=50)["median_us"]
            except Exception as e:
                t = None
                print(f"  layer sweep {lens} {cfg} programs={progs}: {type(e).__name__}: {str(e)[:100]}")
            out.append({"lens": lens, "config": cfg, "programs": progs, "us_12_layers": t})
            print(f"layer sweep tokens={sum(lens)} {cfg} programs={progs}: {t} us", flush=True)
    return out


def main(out_dir, ffn=False, pdl=False, layer=False):
    modes, shapes = ((FFN_MODES, FFN_SHAPES) if ffn else (PDL_MODES, PDL_SHAPES) if pdl else
                     (LAYER_MODES, LAYER_SHAPES) if layer else (MODES, SHAPES))
    os.makedirs(out_dir, exist_ok=True)
    name_json = ("fused_ffn_ab.json" if ffn else "pdl_ab.json" if pdl else "layer_ab.json" if layer
                 else "small_batch_ab.json")
    flag = " --ffn" if ffn else " --pdl" if pdl else " --layer" if layer else ""
    base = model_shape("bert-base").cuda()
    # the small-batch path runs a pruned matrix on its dense copy, so the layer A/B needs the dense plan only
    plans = {"dense": None} if (ffn or layer) else {"dense": None,
                                                    "tile50": PruningPlan.uniform("tile", 0.5, (128, 64))}
    models = {name: apply_plan(copy.deepcopy(base), plan) for name, plan in plans.items()}
    # one encoder per plan: the modes are module switches read at call time, so only the captured graphs (cleared
    # before each mode) depend on them
    encs = {name: optimize(models[name], plan, dtype=torch.float16, device="cuda") for name, plan in plans.items()}
    for enc in encs.values():  # the packed path these A/Bs were defined on (the padded one reads the mask in attention)
        enc.sync_free_max_tokens = 0
    rounds = 2 if (pdl or layer) else 1  # these A/Bs measure their modes twice, in forward then reverse order
    rows = []
    for B, S in shapes:
        ids, mask = make_inputs(B, S, False, base.config.vocab_size)
        for name, plan in plans.items():
            m32 = models[name]
            with torch.no_grad():
                ref = m32(input_ids=ids, attention_mask=mask).last_hidden_state
                hf16 = copy.deepcopy(m32).half()(input_ids=ids, attention_mask=mask).last_hidden_state
            peer = cublas_sdpa_graph(copy.deepcopy(m32).half(), masked=False)
            peer_us = time_cuda(lambda: peer(ids, mask), min_ms=100)["median_us"]
            order = [(rnd, mode) for rnd in range(rounds) for mode in (modes if rnd % 2 == 0 else list(modes)[::-1])]
            for rnd, mode in order:
                if name == "dense" and mode == "triton_sparse":
                    continue
                set_mode(mode)
                enc = encs[name]
                enc._graphs.clear()
                y = enc(ids, mask).last_hidden_state
                e2e = time_cuda(lambda: enc(ids, mask), min_ms=100)["median_us"]
                gpu = time_cuda(enc.graph_replay_fn(ids, mask), min_ms=100)["median_us"]
                r = {"B": B, "S": S, "plan": name, "mode": mode, "round": rnd, "e2e_us": e2e, "gpu_us": gpu,
                     "peer_cublas_sdpa_graph_us": peer_us, "speedup_vs_peer": peer_us / e2e,
                     "err": _rel(y, ref, mask), "hf_fp16_err": _rel(hf16, ref, mask)}
                rows.append(r)
                print(f"B={B:2d} S={S:3d} {name:6s} {mode:20s} e2e {e2e:7.1f} us  gpu {gpu:7.1f} us  "
                      f"peer {peer_us:7.1f} ({peer_us / e2e:.2f}x)  err {r['err']:.2e} (HF fp16 {r['hf_fp16_err']:.2e})",
                      flush=True)
    reset_mode()
    res = {"env": env_info(), "command": "python3 scripts/small_batch_ab.py OUT_DIR" + flag, "rows": rows}
    if layer:
        res["layer_config"] = dict(EL.CONFIG)
        res["command"] = "python3 " + " ".join(["scripts/small_batch_ab.py", "OUT_DIR"] + [
            f"'{a}'" if a.startswith("{") else a for a in sys.argv[2:]])
    save(res, out_dir, name_json)
    if ffn:
        from etformer.kernels.fused_ffn import fused_ffn_partials

        sweep = []
        torch.manual_seed(0)
        w1 = torch.randn(3072, 768, device="cuda", dtype=torch.float16) / 30
        w2 = torch.randn(768, 3072, device="cuda", dtype=torch.float16) / 60
        b1 = torch.randn(3072, device="cuda", dtype=torch.float16)
        for M in (128, 256, 512):
            x = torch.randn(M, 768, device="cuda", dtype=torch.float16)
            for cfg in FFN_CONFIGS:
                try:
                    t = time_cuda(lambda: fused_ffn_partials(x, w1, b1, w2, "gelu", _config=cfg), graph=True,
                                  min_ms=20)["median_us"]
                except Exception as e:
                    t = None
                    print(f"  ffn M={M} {cfg}: {type(e).__name__}: {str(e)[:80]}")
                sweep.append({"M": M, "config": cfg, "us": t})
            ok = [r for r in sweep if r["M"] == M and r["us"]]
            print(f"ffn sweep M={M}: " + ", ".join(f"{r['config']} {r['us']:.1f}" for r in ok), flush=True)
        res["ffn_sweep"] = sweep

    if layer:
        res["layer_sweep"] = layer_sweep()
    if not ffn and not pdl and not layer:
        res["sweep"] = dense_weight_sweep()
    save(res, out_dir, name_json)


    # kernel-level profile, B=1, S=128
    prof_out = {}
    ids, mask = make_inputs(1, 128, False, base.config.vocab_size)
    for name, plan in plans.items():
        for mode in modes:
            if name == "dense" and mode == "triton_sparse":
                continue
            set_mode(mode)
            enc = encs[name]
            enc._graphs.clear()
            fam = profile_kernels(enc.graph_replay_fn(ids, mask), width=60)
            prof_out[f"{name}/{mode}"] = [(k, us) for k, us, _ in fam[:10]]
            print(f"== {name}/{mode}: " + ", ".join(f"{k[:28]} {v:.0f}" for k, v in prof_out[f"{name}/{mode}"][:6]))
    reset_mode()

    res["profile_b1_s128"] = prof_out
    save(res, out_dir, name_json)


def dense_weight_sweep():
    """Launch sweep of the dense-weight kernel at M=128 (direct with GELU, and partial sums) for BERT-base's matrices."""
    sweep = []
    saved_tiles = dict(TL.DENSE_TILE)
    torch.manual_seed(0)
    for kind, (N, K) in {"qkv": (2304, 768), "o": (768, 768), "ffn_in": (3072, 768), "ffn_out": (768, 3072)}.items():
        W = torch.randn(N, K, device="cuda", dtype=torch.float16) / 30
        b = torch.randn(N, device="cuda", dtype=torch.float16)
        x = torch.randn(128, K, device="cuda", dtype=torch.float16)
        cub = time_cuda(lambda: torch.nn.functional.linear(x, W, b), graph=True, min_ms=50)["median_us"]
        for bn in (32, 64, 128):
            TL.DENSE_TILE[128] = (bn, 64)
            for cfg in ((64, 4, 3), (64, 4, 4), (128, 4, 4)):
                for split in (None, 1, 2, 4, 8):
                    if split is None:
                        fn = lambda: TL.tile_linear(x, W, b, activation="gelu", _config=cfg)  # noqa: E731
                    else:
                        fn = lambda: TL.tile_linear_partials(x, W, split=split, _config=cfg)  # noqa: E731
                    try:
                        t = time_cuda(fn, graph=True, min_ms=20)["median_us"]
                    except Exception as e:  # a launch that does not fit (shared memory) is recorded, not fatal
                        t = None
                        print(f"  {kind} BN={bn} {cfg} split={split}: {type(e).__name__}: {str(e)[:80]}")
                    sweep.append({"matrix": kind, "BN": bn, "config": cfg, "split": split, "us": t,
                                  "cublas_linear_us": cub})
        if not any(s["us"] for s in sweep if s["matrix"] == kind):
            continue
        best_d = min((s for s in sweep if s["matrix"] == kind and s["split"] is None and s["us"]), key=lambda s: s["us"])
        best_p = min((s for s in sweep if s["matrix"] == kind and s["split"] and s["us"]), key=lambda s: s["us"])
        print(f"sweep {kind}: cuBLAS {cub:.1f} us; best direct (+GELU) {best_d['us']:.1f} BN={best_d['BN']} "
              f"{best_d['config']}; best partials {best_p['us']:.1f} BN={best_p['BN']} {best_p['config']} "
              f"split={best_p['split']}", flush=True)
    TL.DENSE_TILE.update(saved_tiles)

    return sweep


def save(res, out_dir, name):
    atomic_write_json(os.path.join(out_dir, name), res)


def _opt(name):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


if __name__ == "__main__":
    if _opt("--layer-config"):
        EL.CONFIG.update(json.loads(_opt("--layer-config")))
    if _opt("--shapes"):
        LAYER_SHAPES[:] = [tuple(int(v) for v in sh.split("x")) for sh in _opt("--shapes").split(",")]
    if "--no-sweep" in sys.argv:
        LAYER_SWEEP[:] = []
    main(sys.argv[1], ffn="--ffn" in sys.argv[2:], pdl="--pdl" in sys.argv[2:], layer="--layer" in sys.argv[2:])
