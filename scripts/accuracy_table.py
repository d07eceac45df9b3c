"""Markdown table of prune runs (the etformer.json of each, e.g. from scripts/accuracy_gpu.sh):

    python3 scripts/accuracy_table.py RUN.json ... > accuracy.md
"""
import json
import os
import sys


def weighted_tile_sparsity(report: dict) -> float:
    """Fraction of all weight elements of the pruned matrices that sit in zero tiles."""
    num = sum(r["tile_sparsity"] * r["shape"][0] * r["shape"][1] for r in report.values())
    return num / sum(r["shape"][0] * r["shape"][1] for r in report.values())


def main(paths):
    runs = [(os.path.splitext(os.path.basename(p))[0], json.load(open(p))) for p in paths]
    runs.sort(key=lambda r: (-r[1]["metrics"]["pruned"]["value"]))
    d0 = runs[0][1]
    print("# Accuracy of tile-pruned MiniLM-L6 on STS-B dev (GPU recipes)\n")
    print(f"Machine: {d0['machine']}. Model all-MiniLM-L6-v2 (bare encoder, distilled from its dense self); metric: "
          f"Spearman of the cosine similarity of mean-pooled embeddings on the 1,500 STS-B dev pairs; dense "
          f"{d0['metrics']['dense']['value']:.2f}. Every encoder matrix pruned in "
          f"{d0['plan']['tile'][0]}x{d0['plan']['tile'][1]} tiles; lr 3e-4, sequences up to 64 tokens, seed 0. "
          "Runs of one row group shared the GPU. Command: `SET=... bash scripts/bench_h200.sh accuracy` "
          "(scripts/accuracy_gpu.sh), then `python3 scripts/accuracy_table.py *.json`.\n")
    print("| run | method | target | zero tiles | distillation data | every layer | batch | epochs / stage | pruned ρ "
          "| gap to dense | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, d in runs:
        t = d["training"]
        target = d["plan"]["matrices"]["q"]["sparsity"]
        data = "STS-B" + (f" + {', '.join(t['distill_tasks'])}" + (f" (≤ {t['distill_limit']} each)" if
                                                                    t.get("distill_limit") else "")
                          if t.get("distill_tasks") else "")
        dv, pv = d["metrics"]["dense"]["value"], d["metrics"]["pruned"]["value"]
        print(f"| {name} | {d['method']} | {target:.0%} | {weighted_tile_sparsity(d['sparsity']):.1%} | {data} "
              f"| {'yes' if t.get('distill_hidden') else 'no'} | {t['batch_size']} | {t['epochs']:g} | {pv:.2f} "
              f"| {dv - pv:.2f} | {d['seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
