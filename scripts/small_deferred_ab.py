"""The small-batch path's deferred LayerNorm (engine.encoder.SMALL_DEFERRED_LN): same-run A/B on a GPU.

    python3 scripts/small_deferred_ab.py OUT_DIR

With it, a post-LN layer on the small-batch kernels runs 6 launches instead of 7: the output projection runs whole
(no split-K) and writes h un-normalised with its row moments, FFN-in applies the first LayerNorm folded into a copy
of W_1, and the add+LayerNorm after FFN-out normalises the residual h itself.

1. GPU time of the graphed forward (engine as shipped, finite check off as the bench runs it), the two forms in
   alternating rounds (bench.timing.forms_ab), at B x S from 1 x 32 to 1 x 256, full and variable-length batches:
   BERT-base-shaped (random weights) dense and with 50% tiles (the small path runs their dense copies), and
   all-MiniLM-L6-v2 (the real model).
2. Accuracy of both forms against the fp32 Hugging Face forward of the same model (relative error of the hidden
   states over real tokens), beside Hugging Face's own fp16 forward.
3. Kernel profile of one 1 x 128 BERT-base forward per form, PDL off (so that kernel times add up) and the
   small-batch kernels forced (SMALL_PATH "triton": "auto" takes them only with PDL).
Writes small_deferred_ab.json.
"""
import copy
import importlib
import os
import sys

import torch

from etformer.bench.run import _rel, make_inputs, model_shape
from etformer.bench.timing import env_info, forms_ab, profile_kernels
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.pruning.plan import DEFAULT_TILE
from etformer.sparse.tiles import atomic_write_json

E = importlib.import_module("etformer.engine.encoder")
KC = importlib.import_module("etformer.kernels._common")

SHAPES = [(1, 32, False), (1, 64, False), (1, 128, False), (2, 128, False), (1, 256, False), (4, 64, False),
          (2, 128, True), (8, 32, True)]
FORMS = {"deferred": lambda: setattr(E, "SMALL_DEFERRED_LN", True),
         "applied": lambda: setattr(E, "SMALL_DEFERRED_LN", False)}


def models():
    """name -> (HF model in fp32 on the GPU, its fp16 copy, ETEncoder fp16)."""
    out = {}
    for name, model, sparsity in (("bert-base dense", "bert-base", 0.0), ("bert-base tile50", "bert-base", 0.5),
                                  ("minilm dense", "minilm", 0.0)):
        base = model_shape(model).cuda().float().eval()
        plan = PruningPlan.uniform("tile", sparsity, DEFAULT_TILE) if sparsity else None
        hf = apply_plan(copy.deepcopy(base), plan).eval() if plan else base
        enc = optimize(hf, plan, dtype=torch.float16, device="cuda")
        enc.check_finite = False
        out[name] = (hf, copy.deepcopy(hf).half(), enc)
    return out


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    saved = (E.SMALL_DEFERRED_LN, KC.USE_PDL, E.SMALL_PATH)
    res = {"env": env_info(), "command": "python3 scripts/small_deferred_ab.py OUT_DIR", "timing": [],
           "accuracy": [], "profile_no_pdl": {}}
    ms = models()
    try:
        for B, S, varlen in SHAPES:
            ids, mask = make_inputs(B, S, varlen, 30522)
            for name, (_, _, enc) in ms.items():
                ids_m = ids.clamp(max=enc.emb["word"].shape[0] - 1)  # MiniLM's vocabulary; a no-op for BERT-base
                t, outs = forms_ab(enc, ids_m, mask, FORMS, rounds=3)
                row = {"B": B, "S": S, "varlen": varlen, "tokens": int(mask.sum()), "model": name,
                       **{f"{k}_us": v for k, v in t.items()},
                       "max_abs_diff": (outs["deferred"] - outs["applied"]).abs().max().item()}
                res["timing"].append(row)
                print(f"{name} {B}x{S}{' varlen' if varlen else ''}: " +
                      ", ".join(f"{k} {v}" for k, v in t.items()) + f", max|diff| {row['max_abs_diff']:.2e}",
                      flush=True)
        for B, S, varlen in ((1, 128, False), (2, 128, True), (1, 256, False)):
            ids, mask = make_inputs(B, S, varlen, 30522)
            for name, (hf, hf_half, enc) in ms.items():
                ids_m = ids.clamp(max=enc.emb["word"].shape[0] - 1)
                with torch.no_grad():
                    ref = hf(input_ids=ids_m, attention_mask=mask).last_hidden_state.float()
                    hf16 = hf_half(input_ids=ids_m, attention_mask=mask).last_hidden_state.float()
                row = {"B": B, "S": S, "varlen": varlen, "model": name, "hf_fp16_rel_err": _rel(hf16, ref, mask)}
                for form, put in FORMS.items():
                    put()
                    enc._graphs.clear()
                    y = enc(ids_m, mask).last_hidden_state.float()
                    row[f"{form}_rel_err"] = _rel(y, ref, mask)
                res["accuracy"].append(row)
                print("accuracy", row, flush=True)
        KC.USE_PDL, E.SMALL_PATH = False, "triton"
        ids, mask = make_inputs(1, 128, False, 30522)
        enc = ms["bert-base dense"][2]
        for form, put in FORMS.items():
            put()
            enc._graphs.clear()
            prof = [[k, round(us, 1), n] for k, us, n in profile_kernels(enc.graph_replay_fn(ids, mask))]
            res["profile_no_pdl"][form] = prof
            for k, us, n in prof:
                print(f"profile 1x128 {form}, no PDL: {us:7.1f} us in {n:3d} launches: {k}", flush=True)
    finally:
        E.SMALL_DEFERRED_LN, KC.USE_PDL, E.SMALL_PATH = saved
    atomic_write_json(os.path.join(out_dir, "small_deferred_ab.json"), res)


if __name__ == "__main__":
    main(sys.argv[1])
