"""Same-run A/B of attention's launch for ragged short batches in the whole encoder, on the H200.

BERT-base shape (12 x 768, random weights), dense and 50% tiles (128x64), variable-length batches at S = 128 (lengths
uniform in 1..128, as in the bench) and one full batch as a control. For each: the engine's forward GPU time (a
freshly captured CUDA graph, median of replays) with the ragged launch (attention.RAGGED_SHORT_FILL as shipped) and
with it off (0: one pass at every fill), alternately, twice each (bench.timing.forms_ab); both forms' last outputs
checked against the fp32 HF model.

    python3 scripts/ragged_attention_ab.py OUT_DIR
"""
import copy
import importlib
import os
import sys
import time

import torch

from etformer.bench.run import GATE, _rel, make_inputs, model_shape
from etformer.bench.timing import env_info, forms_ab
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.sparse.tiles import atomic_write_json

A = importlib.import_module("etformer.kernels.attention")
SHAPES = [(32, 128, True), (128, 128, True), (8, 128, True), (32, 128, False)]


def main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    shipped = A.RAGGED_SHORT_FILL
    base = model_shape("bert-base").cuda()
    rows, bad = [], 0
    for variant in ("dense", "tile50"):
        plan = None if variant == "dense" else PruningPlan.uniform("tile", 0.5, (128, 64))
        m32 = base if plan is None else apply_plan(copy.deepcopy(base), plan)
        enc = optimize(m32, plan, dtype=torch.float16, device="cuda")
        for B, S, varlen in SHAPES:
            ids, mask = make_inputs(B, S, varlen, base.config.vocab_size)
            with torch.no_grad():
                ref = m32(input_ids=ids, attention_mask=mask).last_hidden_state
            row = {"variant": variant, "batch": B, "seq": S, "varlen": varlen,
                   "fill": float(mask.sum()) / (B * S), "ragged_us": [], "one_pass_us": []}
            try:
                with torch.no_grad():
                    times, outs = forms_ab(enc, ids, mask, {
                        "ragged": lambda: setattr(A, "RAGGED_SHORT_FILL", shipped),
                        "one_pass": lambda: setattr(A, "RAGGED_SHORT_FILL", 0.0)})
            finally:
                A.RAGGED_SHORT_FILL = shipped
            for key in ("ragged", "one_pass"):
                err = _rel(outs[key], ref, mask)
                row[f"{key}_us"] = times[key]
                row[f"{key}_rel_err"] = err
                bad += not err < GATE
            row["speedup"] = min(row["one_pass_us"]) / min(row["ragged_us"])
            rows.append(row)
            print(f"{variant:6s} {B:3d}x{S} {'varlen' if varlen else 'full  '} fill {row['fill']:.2f}: ragged launch "
                  f"{min(row['ragged_us']):8.1f} us, one pass {min(row['one_pass_us']):8.1f} us, "
                  f"x{row['speedup']:.3f}; rel err {row['ragged_rel_err']:.1e} / {row['one_pass_rel_err']:.1e}",
                  flush=True)
    atomic_write_json(os.path.join(out_dir, "ragged_attention_ab.json"),
                      {"env": env_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "command": "python3 scripts/ragged_attention_ab.py OUT_DIR", "gate": GATE, "rows": rows})
    if bad:
        print(f"{bad} engine outputs failed the gate")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
