"""etformer command line: demo | prune | eval | info | bench."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from .errors import EtformerError


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EtformerError(f"device {name!r} asked for, but no CUDA GPU is available")
    return name


def machine_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}"


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console,
                    transient=False, disable=not console.is_terminal and os.environ.get("ETFORMER_PROGRESS") != "1")


# --------------------------------------------------------------------------- prune
def prune(args, console) -> dict:
    import torch

    from .checkpoint import check_out_dir, save_checkpoint
    from .data import task_spec
    from .evaluate import evaluate
    from .models import has_task_head, load_model, resolve_model_path
    from .pruning import RecipeConfig, make_plan, run_recipe, sparsity_report
    from .sparse.tiles import parse_tile

    plan = make_plan(args.pattern, args.sparsity, parse_tile(args.tile))
    if args.sparsity_by_kind:
        plan = plan.with_sparsities(args.sparsity_by_kind)
    check_out_dir(args.out, args.overwrite)
    device = _device(args.device)
    cfg = RecipeConfig(plan=plan, task=args.task, method=args.method, dense_epochs=args.dense_epochs,
                       epochs=args.epochs, lr=args.lr, sparse_lr=args.sparse_lr, lam=args.lam, rho=args.rho,
                       batch_size=args.batch_size, max_len=args.max_len,
                       max_steps=args.max_steps, train_limit=args.train_limit, seed=args.seed, device=device,
                       glue_dir=args.glue_dir, distill_tasks=_task_list(args.distill_tasks),
                       distill_limit=args.distill_limit,
                       distill_hidden=args.distill_hidden, kd=args.kd)
    head = args.head
    spec = task_spec(cfg.task)
    if head and cfg.dense_epochs <= 0:
        raise EtformerError("--head adds an untrained task head: give it --dense-epochs to fine-tune it first")
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = load_model(args.model, device=device, with_head=True if head else None,
                            num_labels=(1 if spec.is_regression else len(spec.labels)) if head else None)
    if cfg.kd > 0 and not has_task_head(model):
        raise EtformerError("--kd distils a task head's logits; this model has none (a bare encoder distils itself)")
    model_path = resolve_model_path(args.model)
    label = args.model or "all-MiniLM-L6-v2"
    console.print(f"[bold]etformer prune[/]: {label} on {cfg.task}, "
                  f"plan {plan.name} at {args.sparsity_by_kind or format(args.sparsity, '.0%')}, tile {plan.tile[0]}x{plan.tile[1]}, method {cfg.method}, "
                  f"on {machine_line(device)}")
    ev = dict(glue_dir=args.glue_dir, device=device, limit=args.eval_limit)
    scores = {}

    def score_dense(m):
        scores["dense"] = evaluate(m, tok, cfg.task, **ev)
        d = scores["dense"]
        console.print(f"dense {d['metric']}: {d['value']:.2f}  ({d['method']})")

    fine_tunes = has_task_head(model) and cfg.dense_epochs > 0
    if not fine_tunes:  # the dense reference is the model as given; otherwise it is scored after its fine-tune
        score_dense(model)
    with _progress(console) as prog:
        bars = {}

        def on_step(stage, step, total, loss):
            if stage not in bars:
                bars[stage] = prog.add_task(stage, total=total, loss=float("nan"))
            prog.update(bars[stage], completed=step, loss=loss)

        masks = run_recipe(model, tok, cfg, on_step=on_step, on_stage=console.print,
                           on_dense=score_dense if fine_tunes else None)
    dense = scores["dense"]
    pruned = evaluate(model, tok, cfg.task, **ev)
    report = sparsity_report(model, plan)
    elapsed = time.time() - t0
    meta = {
        "etformer_version": _version(), "base_model": model_path, "task": cfg.task, "method": cfg.method,
        "plan": plan.to_json(),
        "training": {**{k: getattr(cfg, k) for k in ("dense_epochs", "epochs", "lr", "sparse_lr", "lam", "eps",
                                                      "refresh_every", "rho", "batch_size", "max_len", "max_steps",
                                                      "train_limit", "distill_tasks", "distill_limit", "distill_hidden",
                                                      "kd", "seed")}, "new_head": head},
        "metrics": {"dense": _clean(dense), "pruned": _clean(pruned)},
        "sparsity": report, "pruned_matrices": sorted(masks), "seconds": round(elapsed, 1), "machine": machine_line(device),
    }
    save_checkpoint(args.out, model, tok, meta, overwrite=args.overwrite)
    _summary(console, meta)
    console.print(f"wrote {args.out} in {elapsed:.0f} s")
    return meta


def _task_list(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip().lower() for t in text.split(",") if t.strip()) if text else ()


def _clean(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "preds"}


def _version() -> str:
    from . import __version__

    return __version__


def _summary(console, meta: dict) -> None:
    from rich.table import Table

    t = Table(title="sparsity by matrix kind (mean over layers)")
    for c in ("kind", "pattern", "target", "achieved", "zero tiles"):
        t.add_column(c, justify="right" if c not in ("kind", "pattern") else "left")
    by_kind: dict[str, list] = {}
    for r in meta["sparsity"].values():
        by_kind.setdefault(r["kind"], []).append(r)
    for kind, rows in by_kind.items():
        n = len(rows)
        t.add_row(kind, rows[0]["pattern"], f"{rows[0]['target']:.1%}", f"{sum(r['sparsity'] for r in rows) / n:.1%}",
                  f"{sum(r['tile_sparsity'] for r in rows) / n:.1%}")
    console.print(t)
    m = meta["metrics"]
    t2 = Table(title=f"{meta['task']} dev ({m['dense']['method']})")
    t2.add_column("model")
    t2.add_column(m["dense"]["metric"], justify="right")
    t2.add_row("dense", f"{m['dense']['value']:.2f}")
    t2.add_row(f"pruned ({meta['plan']['name']}, {meta['method']})", f"{m['pruned']['value']:.2f}")
    console.print(t2)


# --------------------------------------------------------------------------- eval / info
def eval_cmd(args, console) -> dict:
    from .checkpoint import read_meta, verify_plan
    from .evaluate import evaluate
    from .models import load_model, resolve_model_path

    path = resolve_model_path(args.dir)
    if not os.path.exists(path) and os.path.sep in path:
        raise EtformerError(f"{path} does not exist")
    device = _device(args.device)
    meta = read_meta(path) if os.path.isdir(path) else None
    model, tok = load_model(path, device=device)
    if meta:
        verify_plan(model, meta)
    encode = None
    if args.engine == "et":
        from .engine import optimize

        encode = optimize(model, meta, dtype=args.dtype, device=device).encode_fn()
    res = evaluate(model, tok, args.task, encode=encode, glue_dir=args.glue_dir, device=device, limit=args.limit)
    res.update({"model": path, "engine": args.engine, "device": machine_line(device)})
    console.print(f"{res['task']} dev {res['metric']}: [bold]{res['value']:.2f}[/]  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in res["metrics"].items() if k != res["metric"])
                  + f"  (n={res['n']}, {res['method']}, engine {args.engine})")
    if args.json:
        from .sparse.tiles import atomic_write_json

        atomic_write_json(args.json, res, indent=2)
    return res


def info_cmd(args, console) -> dict:
    from rich.table import Table

    from .checkpoint import read_meta
    from .models import load_model, resolve_model_path
    from .pruning import PruningPlan, sparsity_report
    from .pruning.plan import DEFAULT_TILE

    path = resolve_model_path(args.dir)
    meta = read_meta(path) if os.path.isdir(path) else None
    model, _ = load_model(path)
    plan = PruningPlan.from_json(meta["plan"]) if meta else PruningPlan.uniform("tile", 0.0, DEFAULT_TILE)
    rep = sparsity_report(model, plan)
    t = Table(title=f"{path}: plan {plan.name}, tile {plan.tile[0]}x{plan.tile[1]}")
    for c in ("matrix", "kind", "shape", "pattern", "sparsity", "zero tiles"):
        t.add_column(c)
    for name, r in rep.items():
        t.add_row(name, r["kind"], "x".join(map(str, r["shape"])), r["pattern"], f"{r['sparsity']:.1%}",
                  f"{r['tile_sparsity']:.1%}")
    console.print(t)
    if meta and "metrics" in meta:
        m = meta["metrics"]
        console.print(f"{meta['task']} {m['dense']['metric']}: dense {m['dense']['value']:.2f}, pruned {m['pruned']['value']:.2f}")
    png = args.png or "tile_masks.png"
    save_mask_png(model, plan, png)
    console.print(f"tile masks: {png}")
    return rep


def save_mask_png(model, plan, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .models import MATRIX_KINDS, encoder_linears
    from .pruning.patterns import Pattern, group_norms
    from .sparse.tiles import atomic_write

    lin = encoder_linears(model)
    n_layers = 1 + max(i for _, i, _ in lin.values())
    fig, axes = plt.subplots(n_layers, len(MATRIX_KINDS), figsize=(2.2 * len(MATRIX_KINDS), 2.0 * n_layers), squeeze=False)
    pat = Pattern("tile", tile=plan.tile)
    for name, (kind, i, l) in lin.items():
        w = l.weight.detach().float()
        nbr, nbc = -(-w.shape[0] // plan.tile[0]), -(-w.shape[1] // plan.tile[1])
        keep = (group_norms(w, pat) > 0).view(nbr, nbc).numpy()
        ax = axes[i][MATRIX_KINDS.index(kind)]
        ax.imshow(keep, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"L{i} {kind} {1 - keep.mean():.0%}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"kept {plan.tile[0]}x{plan.tile[1]} tiles (black), zero tiles (white)")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------- demo
def demo(args, console) -> dict:
    import torch

    device = _device(args.device)
    on_gpu = device.startswith("cuda")
    argv = ["prune", "--task", "stsb", "--pattern", "tile", "--sparsity", "0.5", "--tile", args.tile, "--out", args.out,
            "--overwrite", "--lam", repr(args.lam), "--max-len", "64", "--device", device]
    argv += ["--max-steps", str(args.cpu_steps)] if not on_gpu else []
    argv += ["--glue-dir", args.glue_dir] if args.glue_dir else []
    ns = build_parser().parse_args(argv)  # the prune command's own defaults for everything else
    if not on_gpu:
        console.print(f"[yellow]No GPU: the demo runs on the CPU ({torch.get_num_threads()} threads) with "
                      f"{args.cpu_steps} steps per training stage; on a GPU it trains a full epoch per stage.[/]")
    return prune(ns, console)


# --------------------------------------------------------------------------- main
def _tile_str(tile) -> str:
    return f"{tile[0]}x{tile[1]}"


def build_parser() -> argparse.ArgumentParser:
    from .pruning.patterns import PATTERNS
    from .pruning.plan import DEFAULT_TILE
    from .pruning.recipe import METHODS, RecipeConfig

    p = argparse.ArgumentParser(prog="etformer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--glue-dir", default=None, help="GLUE data folder (default: $GLUE_DIR)")
        sp.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")

    d = sub.add_parser("demo", help="tile-prune the embedded MiniLM to 50%% on STS-B and compare with dense")
    common(d)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--tile", default=_tile_str(DEFAULT_TILE))
    d.add_argument("--lam", type=float, default=RecipeConfig.lam)
    d.add_argument("--cpu-steps", type=int, default=100, help="steps per training stage when there is no GPU")

    pr = sub.add_parser("prune", help="prune a model on a GLUE task and write a checkpoint")
    common(pr)
    pr.add_argument("--model", default=None, help="HF model path or id (default: embedded all-MiniLM-L6-v2)")
    pr.add_argument("--task", required=True)
    pr.add_argument("--pattern", required=True, help=f"one of {', '.join(PATTERNS)}, or attention_aware")
    pr.add_argument("--sparsity", type=float, required=True)
    pr.add_argument("--sparsity-by-kind", default=None, metavar="KIND=S,...",
                    help="per-kind sparsity overriding --sparsity: q, k, v, o, ffn_in, ffn_out, or the groups attention "
                         "and ffn, e.g. attention=0.3,ffn=0.6")
    pr.add_argument("--tile", default=_tile_str(DEFAULT_TILE), help="tile shape, e.g. 16x16, 32x32, 64x64, 128x64")
    pr.add_argument("--out", required=True)
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--method", default="rgl", choices=METHODS,
                    help="rgl: reweighted group lasso, then hard prune (E.T.'s method, the default); gmp: gradual "
                         "magnitude pruning (the most accurate at 50%% tiles on the H200, "
                         "benchmarks/results/h200/accuracy); oneshot; admm")
    pr.add_argument("--epochs", type=float, default=1.0, help="passes over the data per sparse stage")
    pr.add_argument("--dense-epochs", type=float, default=0.0)
    pr.add_argument("--lr", type=float, default=RecipeConfig.lr, help="peak learning rate (AdamW, warm-up, decay)")
    pr.add_argument("--sparse-lr", type=float, default=None,
                    help="peak learning rate of the sparse stages (default: --lr); the dense fine-tune keeps --lr")
    pr.add_argument("--lam", type=float, default=RecipeConfig.lam, help="group-lasso strength")
    pr.add_argument("--rho", type=float, default=RecipeConfig.rho, help="ADMM penalty (method admm)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--max-len", type=int, default=128)
    pr.add_argument("--max-steps", type=int, default=None, help="cap on the steps of each stage (smoke runs)")
    pr.add_argument("--train-limit", type=int, default=None, help="use at most this many training examples")
    pr.add_argument("--eval-limit", type=int, default=None, help="score on at most this many dev examples")
    pr.add_argument("--distill-tasks", default=None,
                    help="comma list of GLUE tasks whose training inputs join the sparse stages unlabelled, learning "
                         "from the dense model only (bare encoders: their sentences; with a task head and --kd or "
                         "--distill-hidden: inputs of the task's form, e.g. stsb,rte,qnli pairs for MRPC)")
    pr.add_argument("--distill-limit", type=int, default=None, help="at most this many inputs from each of those")
    pr.add_argument("--distill-hidden", action="store_true",
                    help="distil every layer's hidden states from the dense model (bare encoders: from themselves; "
                         "with a task head: from the model after its dense fine-tune), not only the output")
    pr.add_argument("--head", action="store_true",
                    help="add a fresh task head to an encoder that has none and fine-tune it (needs --dense-epochs)")
    pr.add_argument("--kd", type=float, default=0.0,
                    help="weight of logit distillation from the dense fine-tuned model (models with a task head)")
    pr.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="score a model on a GLUE task's dev split")
    common(ev)
    ev.add_argument("dir", nargs="?", default=None, help="model folder or id (default: embedded MiniLM)")
    ev.add_argument("--task", required=True)
    ev.add_argument("--json", default=None)
    ev.add_argument("--engine", choices=("hf", "et"), default="hf")
    ev.add_argument("--dtype", default="auto", help="engine precision: auto, float32, float16, bfloat16")
    ev.add_argument("--limit", type=int, default=None)

    inf = sub.add_parser("info", help="per-matrix sparsity and a picture of the tile masks")
    inf.add_argument("dir", nargs="?", default=None)
    inf.add_argument("--png", default=None, help="where to write the mask picture (default tile_masks.png)")

    b = sub.add_parser("bench", help="etformer against its peers, side by side on one GPU")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default=None, help="folder for JSON, Markdown and PNG results")
    b.add_argument("--models", default=None, help="comma list of bert-base, distilbert, minilm (full mode)")
    b.add_argument("--batches", default=None, help="comma list of batch sizes (full mode; default 1,8,32,128)")
    b.add_argument("--seqs", default=None, help="comma list of sequence lengths (full mode; default 128,384,512)")
    b.add_argument("--peers", default=None, help="comma list of peers (default: all six)")
    b.add_argument("--sparsities", default=None, help="comma list of tile sparsities (default 0.3,0.5,0.7,0.9)")
    b.add_argument("--variants", default=None, help="etformer variant families: dense,tile,attention_aware,nm")
    b.add_argument("--compile-shapes", default=None,
                   help="BxS list where torch.compile runs, e.g. 32x128,8x512 (its autotuning takes minutes a shape)")
    b.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge bench.json files of split runs into one report in --out (no timing)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    console = _console()
    try:
        if args.cmd == "demo":
            demo(args, console)
        elif args.cmd == "prune":
            prune(args, console)
        elif args.cmd == "eval":
            eval_cmd(args, console)
        elif args.cmd == "info":
            info_cmd(args, console)
        elif args.cmd == "bench":
            from .bench.run import bench_cmd

            bench_cmd(args, console)
    except EtformerError as e:
        print(f"etformer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("etformer: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
