"""On a GPU: every nn.TransformerEncoder configuration through etformer's kernels, against PyTorch's own module.

Configurations: ReLU / GELU x post-LN / pre-LN x batch_first true / false x with / without a final norm (16), each
dense and with every matrix pruned to 50% in 128x64 tiles (pre-LN ones prune V by whole rows, so the compact-V
attention and the folded W_O run too), plus E.T.'s causal Transformer (d=800, 4 heads of 200, FFN 200 and 3200).
Shape: d=800, 4 heads (head dim 200, not a power of two; 800 is not a multiple of the 128-row tile), 2 layers,
FFN 3200, a batch of 8 x 128 tokens with key padding (rows of 128, 64, 97, 128, 5, 128, 77, 1 tokens).

For each: the relative error of etformer (fp16, bf16) against the fp32 module, and that of PyTorch's own module run
in fp16 / bf16 (its inference fast path) against the same fp32 output. The bar is etformer <= 2x PyTorch's own error.
Writes torch_encoder_parity.{json,md} to the folder given.

    python scripts/torch_encoder_parity.py OUT_DIR
"""
import copy
import itertools
import os
import sys
import time

import torch
from torch import nn

from etformer import optimize
from etformer.bench.timing import env_info
from etformer.bench.torch_encoders import prune_tiles, torch_encoder
from etformer.sparse.tiles import atomic_write_json, atomic_write_text

D, HEADS, FFN, LAYERS, TILE = 800, 4, 3200, 2, (128, 64)
LENGTHS = [128, 64, 97, 128, 5, 128, 77, 1]


def build(act, norm_first, batch_first, final_norm, ffn=FFN, seed=0):
    return torch_encoder(D, HEADS, ffn, LAYERS, act=act, norm_first=norm_first, batch_first=batch_first,
                         final_norm=final_norm, seed=seed).cuda()


@torch.no_grad()
def compare(enc, batch_first, causal):
    S, B = max(LENGTHS), len(LENGTHS)
    torch.manual_seed(1)
    src = torch.randn(B, S, D, device="cuda")
    kpm = torch.arange(S, device="cuda")[None, :] >= torch.tensor(LENGTHS, device="cuda")[:, None]
    if causal:
        kpm = torch.zeros_like(kpm)
    mask = nn.Transformer.generate_square_subsequent_mask(S, device="cuda") if causal else None
    x = src if batch_first else src.transpose(0, 1)
    kw = dict(mask=mask, src_key_padding_mask=None if causal else kpm, is_causal=causal)

    def run(m, dt):
        y = m(x.to(dt), **({k: (v.to(dt) if k == "mask" and v is not None else v) for k, v in kw.items()}))
        return (y if batch_first else y.transpose(0, 1)).float()

    keep = ~kpm
    ref = run(enc, torch.float32)[keep]
    row = {}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        peer = run(copy.deepcopy(enc).to(dt), dt)[keep]
        et = optimize(enc, dtype=dt, device="cuda", tile=TILE)
        y = run(et, dt)
        e_et = float((y[keep] - ref).norm() / ref.norm())
        e_pt = float((peer - ref).norm() / ref.norm())
        pads_zero = bool(torch.all(y[~keep] == 0)) if not causal else True
        row[name] = {"etformer_err": e_et, "torch_err": e_pt, "ratio": e_et / e_pt,
                     "ok": e_et <= 2 * e_pt and pads_zero}
    return row


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    rows = []
    cases = [(act, nf, bf, fn, pr, False, FFN) for act, nf, bf, fn in
             itertools.product(["relu", "gelu"], [False, True], [True, False], [False, True]) for pr in (False, True)]
    cases += [("relu", False, True, False, pr, True, ffn) for ffn in (200, 3200) for pr in (False, True)]
    for act, nf, bf, fn, pr, causal, ffn in cases:
        enc = build(act, nf, bf, fn, ffn)
        if pr:
            prune_tiles(enc, TILE, 0.5, v_rows=nf)
        r = compare(enc, bf, causal)
        r.update(activation=act, norm_first=nf, batch_first=bf, final_norm=fn, pruned=pr, causal=causal, ffn=ffn)
        rows.append(r)
        print(f"{act} norm_first={nf} batch_first={bf} final_norm={fn} pruned={pr} causal={causal} ffn={ffn}: "
              f"fp16 {r['fp16']['etformer_err']:.2e} vs {r['fp16']['torch_err']:.2e} ({r['fp16']['ratio']:.2f}x), "
              f"bf16 {r['bf16']['etformer_err']:.2e} vs {r['bf16']['torch_err']:.2e} ({r['bf16']['ratio']:.2f}x)",
              flush=True)
    ok = all(r[p]["ok"] for r in rows for p in ("fp16", "bf16"))
    res = {"env": env_info(), "command": "python scripts/torch_encoder_parity.py OUT_DIR", "seconds": time.time() - t0,
           "shape": {"d": D, "heads": HEADS, "layers": LAYERS, "tile": list(TILE), "lengths": LENGTHS},
           "all_ok": ok, "rows": rows}

    atomic_write_json(os.path.join(out_dir, "torch_encoder_parity.json"), res)
    e = res["env"]
    lines = ["# nn.TransformerEncoder through etformer, against PyTorch's own module", "",
             f"Machine: {e.get('gpu')}, torch {e.get('torch')}, Triton {e.get('triton')}. "
             f"Command: `{res['command']}`.", "",
             f"d={D}, {HEADS} heads of {D // HEADS}, {LAYERS} layers, batch of {len(LENGTHS)} with lengths {LENGTHS} "
             f"(key padding; the causal rows are full length), tiles {TILE[0]}x{TILE[1]} at 50% for the pruned rows "
             "(pre-LN: V pruned by whole rows). Error: relative Frobenius error of the real tokens against the fp32 "
             "module; PyTorch = the same module cast to fp16 / bf16. Bar: etformer <= 2x PyTorch.", "",
             "| activation | norm_first | batch_first | final norm | causal | FFN | pruned | fp16 etformer | fp16 PyTorch "
             "| ratio | bf16 etformer | bf16 PyTorch | ratio | ok |", "|" + "---|" * 14]
    for r in rows:
        a, b = r["fp16"], r["bf16"]
        lines.append(f"| {r['activation']} | {r['norm_first']} | {r['batch_first']} | {r['final_norm']} | {r['causal']} "
                     f"| {r['ffn']} | {r['pruned']} | {a['etformer_err']:.2e} | {a['torch_err']:.2e} | {a['ratio']:.2f} "
                     f"| {b['etformer_err']:.2e} | {b['torch_err']:.2e} | {b['ratio']:.2f} | "
                     f"{'yes' if a['ok'] and b['ok'] else 'NO'} |")
    lines += ["", f"All within the bar: {'yes' if ok else 'NO'}."]

    atomic_write_text(os.path.join(out_dir, "torch_encoder_parity.md"), "\n".join(lines) + "\n")
    print("all ok" if ok else "SOME CONFIGURATIONS MISSED THE BAR", f"({time.time() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
