"""Same-run A/B of the operation reordering for row-pruned V (the attention-aware plan), on the H200.

Reordered (the engine's default, `optimize(..., pruned_v=True)`): V is produced compactly (kept columns only, padded
per head to a multiple of 16), attention runs on those columns, and its output goes straight into the O projection,
whose W_O columns are gathered to the compact layout and whose bias absorbs the pruned columns' constants.
Plain (`pruned_v=False`): the same weights, V at full width with its zero rows, attention on every column.

BERT-base shape (12 x 768, random weights), the attention-aware plan at 50% (V loses half its rows, the other matrices
half their 64x64 tiles) and with V at 25% and 75%. Both engines are checked against the fp32 HF model first
(relative error on real tokens under the bench's gate), then timed alternately, twice each, on the same inputs.

    python3 scripts/reorder_ab.py OUT_DIR
"""
import copy
import os
import sys
import time

import torch

from etformer.bench.run import GATE, _rel, make_inputs, model_shape
from etformer.bench.timing import env_info, time_cuda
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
from etformer.sparse.tiles import atomic_write_json, atomic_write_text

SHAPES = [(1, 128, False), (8, 128, False), (32, 128, False), (8, 512, False), (32, 512, False), (32, 512, True)]
V_SPARSITIES = (0.5, 0.25, 0.75)


def main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    base = model_shape("bert-base").cuda()
    rows, bad = [], 0
    for vs in V_SPARSITIES:
        plan = PruningPlan.attention_aware(0.5, (64, 64), v_sparsity=vs)
        m32 = apply_plan(copy.deepcopy(base), plan)
        eng = {"reordered": optimize(m32, plan, dtype=torch.float16, device="cuda", pruned_v=True),
               "plain": optimize(m32, plan, dtype=torch.float16, device="cuda", pruned_v=False)}
        width = eng["reordered"].layers[0].v_width
        for B, S, varlen in SHAPES:
            ids, mask = make_inputs(B, S, varlen, base.config.vocab_size)
            with torch.no_grad():
                ref = m32(input_ids=ids, attention_mask=mask).last_hidden_state
            row = {"v_sparsity": vs, "compact_v_width": width, "batch": B, "seq": S, "varlen": varlen}
            for name, e in eng.items():
                with torch.no_grad():
                    err = _rel(e(input_ids=ids, attention_mask=mask).last_hidden_state, ref, mask)
                row[f"{name}_rel_err"] = err
                bad += not err < GATE
            times = {k: [] for k in eng}
            for _ in range(2):
                for name, e in eng.items():
                    with torch.no_grad():
                        times[name].append(time_cuda(lambda: e(input_ids=ids, attention_mask=mask), warmup=5, reps=30,
                                                     min_ms=100)["median_us"])
            for name in eng:
                row[f"{name}_us"] = min(times[name])
                row[f"{name}_runs_us"] = times[name]
            row["speedup"] = row["plain_us"] / row["reordered_us"]
            rows.append(row)
            print(f"V {vs:.0%} (C={width}) {B:3d}x{S:3d}{' varlen' if varlen else '       '}: reordered "
                  f"{row['reordered_us']:8.1f} us, plain {row['plain_us']:8.1f} us, x{row['speedup']:.3f}; rel err "
                  f"{row['reordered_rel_err']:.1e} / {row['plain_rel_err']:.1e}", flush=True)
        del eng, m32
        torch.cuda.empty_cache()
    res = {"env": env_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python3 scripts/reorder_ab.py OUT_DIR", "gate": GATE, "rows": rows}
    atomic_write_json(os.path.join(out_dir, "reorder_ab.json"), res)
    atomic_write_text(os.path.join(out_dir, "reorder_ab.md"), markdown(rows))
    if bad:
        print(f"{bad} engine outputs failed the gate")
    return 1 if bad else 0


def markdown(rows) -> str:
    """The A/B as a Markdown table, one row per (V sparsity, shape)."""
    md = ["| V rows pruned | compact V width | B | S | varlen | reordered µs | plain µs | plain / reordered |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['v_sparsity']:.0%} | {r['compact_v_width']} | {r['batch']} | {r['seq']} | "
           f"{'yes' if r['varlen'] else 'no'} | {r['reordered_us']:.1f} | {r['plain_us']:.1f} | {r['speedup']:.3f} |"
           for r in rows]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
