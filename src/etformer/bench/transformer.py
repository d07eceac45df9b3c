"""E.T.'s plain Transformer (d=800, 4 heads of 200, 2 layers, causal), as torch.nn.TransformerEncoder, against its peers.

    python -m etformer.bench.transformer --out DIR

Peers: nn.TransformerEncoder in inference mode (PyTorch's fused fast path where it applies), the same captured in a
CUDA graph, the same under torch.compile (mode="reduce-overhead": Inductor kernels replayed from CUDA graphs; run at
the shapes in COMPILE_SHAPES, its compile time being minutes), and a plain SDPA layer stack (cuBLAS + flash
attention with is_causal) in a CUDA graph. etformer: dense and 50% / 70% tiles (128x64), each checked against the
fp32 reference first. FFN 200 (as in E.T.'s code) and a 4x FFN (3200). fp16.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
from torch import nn

from ..engine.torch_encoder import optimize_torch_encoder
from ..sparse.tiles import atomic_write_json, atomic_write_text
from .peers import GraphCache, TorchLayerStack
from .timing import env_info, floor_us, measure_peaks, time_cuda
from .torch_encoders import prune_tiles, torch_encoder

TILE = (128, 64)
COMPILE_SHAPES = {(32, 512)}
PEERS = ("torch_encoder", "torch_encoder_graph", "torch_compile", "sdpa_layers_graph")


def build(ffn, seed=0):
    return torch_encoder(800, 4, ffn, 2, seed=seed, jitter_norms=False).cuda()


def prune(enc, s):
    return prune_tiles(copy.deepcopy(enc), TILE, s)


def cost(B, S, ffn, density):
    T = B * S
    w = 4 * 800 * 800 + 2 * 800 * ffn
    return 2 * (2 * T * w * density + 2 * B * S * S * 800 * 2 / 2), 2 * (2 * w * density) + 2 * 2 * T * 800


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    peaks = measure_peaks()
    rows = []
    compiled = {}
    for ffn in (200, 3200):
        base = build(ffn)
        variants = {"etformer_dense": (base, 0.0), "etformer_tile50": (prune(base, 0.5), 0.5),
                    "etformer_tile70": (prune(base, 0.7), 0.7)}
        built = {k: optimize_torch_encoder(m, dtype=torch.float16, device="cuda", tile=TILE) for k, (m, _) in variants.items()}
        base16 = copy.deepcopy(base).half()
        for B in (1, 8, 32):
            for S in (128, 512):
                x = torch.randn(B, S, 800, device="cuda")
                cmask = nn.Transformer.generate_square_subsequent_mask(S, device="cuda")
                x16 = x.half()
                wrows = []

                def record(name, sp, fn, ref_model, prepare=None):
                    row = {"model": f"transformer800-ffn{ffn}", "batch": B, "seq": S, "causal": True, "variant": name,
                           "sparsity": sp, "median_us": None, "p10_us": None, "p90_us": None, "floor_us": None,
                           "speedup_vs_best_peer": None, "ok": False, "error": None}
                    try:
                        if prepare is not None:
                            prepare()
                        with torch.no_grad():
                            ref = ref_model(x, mask=cmask, is_causal=True).float()
                        y = fn().float()
                        err = float((y - ref).norm() / ref.norm())
                        row["rel_err"] = err
                        if err < 2e-2:
                            t = time_cuda(fn, warmup=5, reps=30, min_ms=100)
                            fl, nb = cost(B, S, ffn, 1 - sp)
                            row.update(median_us=t["median_us"], p10_us=t["p10_us"], p90_us=t["p90_us"],
                                       floor_us=floor_us(fl, nb, peaks), ok=True)
                        else:
                            row["error"] = f"wrong: relative error {err:.2e}"
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                    wrows.append(row)
                    print(f"ffn={ffn} B={B} S={S} {name:22s} {row['median_us'] or float('nan'):9.1f} us {row['error'] or ''}", flush=True)

                def fast():
                    with torch.no_grad():  # no_grad + eval: the fused fast path (inference_mode would poison the
                        return base16(x16, mask=cmask.half(), is_causal=True)  # graph-captured variants' buffers)

                record("torch_encoder", 0.0, fast, base)
                g = GraphCache(torch.no_grad()(lambda xx: base16(xx, mask=cmask.half(), is_causal=True)))
                record("torch_encoder_graph", 0.0, lambda: g(x16), base)
                if (B, S) in COMPILE_SHAPES:
                    from .run import _with_alarm

                    cm = compiled.setdefault(ffn, torch.compile(base16, mode="reduce-overhead"))
                    cfn = torch.no_grad()(lambda cm=cm: cm(x16, mask=cmask.half(), is_causal=True).clone())
                    record("torch_compile", 0.0, cfn, base, prepare=lambda: _with_alarm(cfn, 240, "torch.compile"))
                st = GraphCache(TorchLayerStack(base16, causal=True))
                record("sdpa_layers_graph", 0.0, lambda: st(x16), base)
                for name, (m, sp) in variants.items():
                    e = built[name]
                    e.core.check_finite = False
                    record(name, sp, lambda e=e: e(x16, mask=cmask, is_causal=True), m)
                best = min((r["median_us"] for r in wrows if r["ok"] and r["variant"] in PEERS), default=None)
                for r in wrows:
                    if r["ok"] and best:
                        r["speedup_vs_best_peer"] = best / r["median_us"]
                rows += wrows
    res = {"env": env_info(), "peaks": peaks, "rows": rows, "tile": list(TILE),
           "command": "python -m etformer.bench.transformer --out " + a.out}
    os.makedirs(a.out, exist_ok=True)

    atomic_write_json(os.path.join(a.out, "transformer800.json"), res)
    lines = [f"# Transformer-800 (E.T.'s plain Transformer) on {res['env']['gpu']}", "",
             f"torch {res['env']['torch']}, Triton {res['env']['triton']}, {res['env']['date']}; fp16, causal, 2 layers, "
             f"d=800, 4 heads of 200, tiles {TILE[0]}x{TILE[1]}. Command: `{res['command']}`", "",
             "| FFN | B | S | variant | sparsity | median µs | floor µs | ×best peer | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model'].split('ffn')[1]} | {r['batch']} | {r['seq']} | {r['variant']} | {r['sparsity']:.0%} | "
                     + (f"{r['median_us']:.1f} | {r['floor_us']:.1f} | {r['speedup_vs_best_peer']:.2f} | |" if r["ok"]
                        else f"– | – | – | {r['error']} |"))

    atomic_write_text(os.path.join(a.out, "transformer800.md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
