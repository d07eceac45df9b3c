"""Attention with Q, K and V read as bulk tensor copies (attention(tma=True), attention.USE_TMA) against the pointer
loads: same-run A/Bs on the H200.

    python3 scripts/attention_tma_ab.py OUTDIR [--parts k,e] [--cases B:S:shortest,...]

k. Kernel, 12 heads of 64, fp16: full batches 1x128, 32x128, 128x128, 32x384, 8x512, 32x512 and variable-length
   32x128 and 32x512 (lengths uniform in 1..S): each launch of LAUNCHES (and the shipped rule's) with pointer loads
   and with TMA, checked against fp32 math, timed as graphs of 20 calls with PDL off (as the peer), beside SDPA flash
   on the padded batch.
e. Engine, BERT-base-shaped (random weights), dense and 50% tiles: GPU time of the graphed forward with USE_TMA off
   and on (the shipped launches), alternating rounds, at 32x128, 8x512 and 32x512; outputs compared.
s. Engine, the same models: full batches of 128 tokens with the one-pass kernel against the online kernel's 64x64
   launch (SHORT_ONLINE_MIN_TOKENS never / 0), alternating rounds, at 32x128, 64x128 and 128x128.
Writes attention_tma_ab.json.
"""
import importlib
import json
import sys

import torch
import torch.nn.functional as F

from etformer.bench.timing import env_info, time_cuda
from etformer.sparse.tiles import atomic_write_json
from tile_sub_ab import bert_encoders, engine_ab  # scripts/
from tune_attention_varlen import H, D, batch  # scripts/

A = importlib.import_module("etformer.kernels.attention")
C = importlib.import_module("etformer.kernels._common")
CASES = ((1, 128, 128), (32, 128, 128), (128, 128, 128), (32, 384, 384), (8, 512, 512), (32, 512, 512),
         (32, 128, 1), (32, 512, 1))  # (B, S, shortest length): S = full batch


def launches(S):
    c = [(False, bm, bn, w, st) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (2, 3, 4)
         if not (bm == 128 and w == 4)]
    if S <= 128:
        c += [(True, bm, 128, w, 1) for bm in (32, 64, 128) for w in (4, 8) if not (bm == 128 and w == 4)]
    return c


def t20(fn):
    return round(time_cuda(fn, graph=True, per_graph=20, min_ms=15)["median_us"], 2)


def part_k(bad, cases=CASES):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    C.USE_PDL = False
    try:
        for B, S, lo in cases:
            lens, cu, qkv, o, q = batch(B, S, lo)  # the same draws as tune_attention_varlen's
            T = sum(lens)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                sdpa = t20(lambda: F.scaled_dot_product_attention(q, q, q))
            ref = A.attention_reference(qkv.float(), cu, H, D)
            ship = A._blocks(max(lens), 64, True, T / (B * max(lens)), T)
            row = {"B": B, "S": S, "min_len": lo, "tokens": T, "sdpa_padded_us": sdpa, "shipped_launch": ship,
                   "times": {}}
            for cfg in launches(max(lens)) + ([] if ship in launches(max(lens)) else [ship]):
                for tma in (False, True):
                    key = ("tma " if tma else "ptr ") + "_".join(str(int(v)) for v in cfg)
                    try:
                        A.attention(qkv, cu, max(lens), H, D, out=o, _config=cfg, tma=tma)
                        torch.cuda.synchronize()
                    except Exception as e:  # out of resources
                        row["times"][key] = f"{type(e).__name__}"
                        continue
                    err = float((o.float() - ref).norm() / ref.norm())
                    if not err < 1e-2:
                        bad.append(f"{B}x{S} lo={lo} {key}: relative error {err:.2e}")
                        continue
                    row["times"][key] = t20(lambda: A.attention(qkv, cu, max(lens), H, D, out=o, _config=cfg,
                                                                tma=tma))
            t = {k: v for k, v in row["times"].items() if isinstance(v, float)}
            sk = "_".join(str(int(v)) for v in ship)
            for form in ("ptr", "tma"):
                mine = {k: v for k, v in t.items() if k.startswith(form)}
                best = min(mine, key=mine.get)
                row[f"{form}_best"], row[f"{form}_best_us"] = best, mine[best]
                row[f"{form}_shipped_us"] = t.get(f"{form} {sk}")
            row["tma_best_vs_ptr_best"] = round(row["ptr_best_us"] / row["tma_best_us"], 3)
            row["tma_vs_ptr_shipped"] = round(row["ptr_shipped_us"] / row["tma_shipped_us"], 3)
            rows.append(row)
            print("k", json.dumps(row), flush=True)
    finally:
        C.USE_PDL = True
    return rows


def switch_ab(tag, switch, forms, shapes):
    """engine_ab of the attention module's `switch` set to each value of forms {name: value}; restored after."""
    shipped = getattr(A, switch)
    try:
        return engine_ab(tag, bert_encoders(), shapes,
                         {k: (lambda v=v: setattr(A, switch, v)) for k, v in forms.items()}, 100)
    finally:
        setattr(A, switch, shipped)


def part_e():
    return switch_ab("attention_tma", "USE_TMA", {"ptr": False, "tma": True}, ((32, 128), (8, 512), (32, 512)))


def part_s():
    return switch_ab("attention_short", "SHORT_ONLINE_MIN_TOKENS", {"one_pass": 1 << 62, "online": 0},
                     ((32, 128), (64, 128), (128, 128)))


def main(out, parts, cases=CASES):
    bad = []
    res = {"env": env_info(), "command": "python3 scripts/attention_tma_ab.py " + " ".join(sys.argv[1:])}
    if "k" in parts:
        res["kernel"] = part_k(bad, cases)
        atomic_write_json(f"{out}/attention_tma_ab.json", {**res, "failures": bad})
    if "e" in parts:
        res["engine"] = part_e()
    if "s" in parts:
        res["engine_short"] = part_s()
    res["failures"] = bad
    atomic_write_json(f"{out}/attention_tma_ab.json", res)
    print("failures:", bad)
    return not bad


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--")}
    cases = tuple(tuple(map(int, c.split(":"))) for c in opts["--cases"].split(",")) if "--cases" in opts else CASES
    sys.exit(0 if main(args[0], opts.get("--parts", "k,e").split(","), cases) else 1)
