"""Markdown tables of prune runs (the etformer.json of each, e.g. from scripts/accuracy_gpu.sh), one per task:

    python3 scripts/accuracy_table.py RUN.json ... > accuracy.md
"""
import json
import os
import re
import statistics
import sys

TASK_NOTE = {
    "stsb": "MiniLM as a bare encoder, distilled from its dense self; Spearman ρ of the cosine similarity of mean-pooled "
            "embeddings on the 1,500 STS-B dev pairs (no fine-tuning: the dense score is the model as given)",
    "sst2": "a fresh classification head (`--head`) fine-tuned with the dense encoder first (the dense score is taken "
            "there), then pruned with logit and hidden-state distillation from that model (`--kd 1 --distill-hidden`); "
            "accuracy on the 872 SST-2 dev sentences",
    "mrpc": "as SST-2, with a fresh head; F1 on the 408 MRPC dev pairs",
}


def weighted_tile_sparsity(report: dict) -> float:
    """Fraction of all weight elements of the pruned matrices that sit in zero tiles."""
    num = sum(r["tile_sparsity"] * r["shape"][0] * r["shape"][1] for r in report.values())
    den = sum(r["shape"][0] * r["shape"][1] for r in report.values())
    return num / den if den else 0.0


def lr_text(t: dict) -> str:
    """The peak learning rate; 'dense / sparse' where the sparse stages ran at their own."""
    return f"{t['lr']:g}" + (f" / {t['sparse_lr']:g}" if t.get("sparse_lr") is not None else "")


def recipe_of(name: str) -> str:
    """A run's recipe: its name without the seed suffix (runs of one recipe differ only in --seed)."""
    return re.sub(r"_seed\d+$", "", name)


def means(runs) -> list[str]:
    """One row per recipe with two or more seeds: the mean dense and pruned scores, the gap's mean, standard deviation
    and standard error (sd / sqrt(seeds)), and how many seeds' gaps are at most one point."""
    groups = {}
    for name, d in runs:
        groups.setdefault(recipe_of(name), []).append(d)
    rows = []
    for rec, ds in groups.items():
        if len(ds) < 2:
            continue
        dense = [d["metrics"]["dense"]["value"] for d in ds]
        pruned = [d["metrics"]["pruned"]["value"] for d in ds]
        gaps = [a - b for a, b in zip(dense, pruned)]
        seeds = ",".join(str(d["training"].get("seed", 0)) for d in sorted(ds, key=lambda d: d["training"].get("seed", 0)))
        sd = statistics.stdev(gaps)
        within = sum(g <= 1.0 for g in gaps)
        rows.append((statistics.mean(gaps), f"| {rec} | {seeds} | {statistics.mean(dense):.2f} | "
                     f"{statistics.mean(pruned):.2f} | {statistics.mean(gaps):+.2f} | {sd:.2f} | "
                     f"{sd / len(gaps) ** 0.5:.2f} | {within} of {len(gaps)} |"))
    return [r for _, r in sorted(rows)]


def row(name, d) -> str:
    t = d["training"]
    sp = {k: v["sparsity"] for k, v in d["plan"]["matrices"].items()}
    target = f"{sp['q']:.0%}" if len(set(sp.values())) == 1 else f"attention {sp['q']:.0%}, FFN {sp['ffn_in']:.0%}"
    data = d["task"].upper().replace("STSB", "STS-B").replace("SST2", "SST-2")
    if t.get("distill_tasks"):
        data += f" + {', '.join(t['distill_tasks'])}" + (f" (≤ {t['distill_limit']} each)" if t.get("distill_limit") else "")
    dv, pv = d["metrics"]["dense"]["value"], d["metrics"]["pruned"]["value"]
    dense_ep = f"{t['dense_epochs']:g} + " if t.get("dense_epochs") else ""
    tile = "x".join(str(v) for v in d["plan"]["tile"])
    return (f"| {name} | {d['method']} | {target} | {tile} | {t['max_len']} "
            f"| {weighted_tile_sparsity(d['sparsity']):.1%} | {lr_text(t)} "
            f"| {t.get('seed', 0)} | {data} | {'yes' if t.get('distill_hidden') else 'no'} | {t.get('kd', 0):g} "
            f"| {t['batch_size']} | {dense_ep}{t['epochs']:g} | {dv:.2f} | {pv:.2f} | {dv - pv:+.2f} | {d['seconds']:.0f} |")


def main(paths):
    runs = [(os.path.splitext(os.path.basename(p))[0], json.load(open(p))) for p in paths]
    d0 = runs[0][1]
    print("# Accuracy of tile-pruned MiniLM-L6 on GLUE dev (GPU recipes)\n")
    print(f"Machine: {d0['machine']}. Model all-MiniLM-L6-v2; every encoder matrix pruned in tiles of the shape "
          "given (unless the target is 0%: the same training, nothing pruned); inputs cut to the length given. Runs "
          "of one set shared the GPU. Command: "
          "`SET=... bash scripts/bench_h200.sh accuracy` (scripts/accuracy_gpu.sh), then "
          "`python3 scripts/accuracy_table.py *.json`. Epochs: dense fine-tune + each sparse stage (gradual prune or "
          "regularize, then retrain with the masks fixed). Gap = dense − pruned.\n")
    for task in ("stsb", "sst2", "mrpc"):
        sel = sorted([r for r in runs if r[1]["task"] == task], key=lambda r: -r[1]["metrics"]["pruned"]["value"])
        if not sel:
            continue
        metric = sel[0][1]["metrics"]["pruned"]["metric"]
        print(f"## {task.upper().replace('STSB', 'STS-B').replace('SST2', 'SST-2')} ({metric})\n")
        print(TASK_NOTE.get(task, "") + ".\n")
        print("| run | method | target | tile | length | zero tiles | lr | seed | data | every layer | kd | batch "
              "| epochs | dense | pruned | gap | seconds |")  # lr: dense / sparse where they differ
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, d in sel:
            print(row(name, d))
        print()
        by_recipe = means(sel)
        if by_recipe:
            print("By recipe, over its seeds (gap = dense − pruned of each seed, then its mean, standard deviation and "
                  "standard error; the seeds whose gap is at most one point):\n")
            print("| recipe | seeds | mean dense | mean pruned | mean gap | gap sd | gap s.e. | seeds within a point |")
            print("|---|---|---|---|---|---|---|---|")
            print("\n".join(by_recipe))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
