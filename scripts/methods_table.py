"""Markdown table of scripts/compare_methods.sh results: python3 scripts/methods_table.py RUNS_DIR > methods.md"""
import json
import os
import sys

root = sys.argv[1]
rows = []
for m in sorted(os.listdir(root)):
    f = os.path.join(root, m, "etformer.json")
    if os.path.isfile(f):
        d = json.load(open(f))
        rows.append((d["method"], d["metrics"]["dense"]["value"], d["metrics"]["pruned"]["value"], d["seconds"],
                     d["machine"], d["plan"]["tile"], d["training"]))
t = rows[0][6] if rows else {}
print("# Pruning methods on MiniLM-L6, STS-B dev, 50% tiles\n")
print(f"Machine: {rows[0][4] if rows else '?'}. Tile {rows[0][5][0]}x{rows[0][5][1] if rows else ''}; "
      f"{t.get('max_steps')} steps per stage, batch {t.get('batch_size')}, lr {t.get('lr')}, max length {t.get('max_len')}; "
      f"self-distillation from the dense model. Command: `scripts/compare_methods.sh` (then this script).\n")
print("| method | dense ρ | pruned ρ | drop | seconds |\n|---|---|---|---|---|")
for m, dv, pv, s, *_ in rows:
    print(f"| {m} | {dv:.2f} | {pv:.2f} | {dv - pv:.2f} | {s:.0f} |")
print("\nrgl: reweighted group lasso (λ 2e-4, refreshed every 25 steps) then hard prune and retrain; admm: ρ 1e-2, "
      "Z and U updated every 25 steps, then hard prune and retrain; oneshot: hard prune, then retrain (one stage, so "
      "half the steps of the others); gmp: cubic gradual schedule, then retrain.")
