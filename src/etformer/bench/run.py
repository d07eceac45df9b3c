"""`etformer bench`: etformer against every peer, side by side in one process on one GPU.

Workloads: BERT-base-shaped (12 x 768), DistilBERT-shaped (6 x 768, run as a BERT stack) and the real MiniLM-L6,
B in {1, 8, 32, 128} x S in {128, 384, 512}, plus variable-length batches (lengths uniform in [1, S], mean S/2).
Every variant first passes a correctness gate against the fp32 reference of the same weights, then is timed
(CUDA events, warm, CUDA-graphed where it supports it). Rows carry median/p10/p90, the floor from peaks measured in
this run, and the speed-up against the best dense peer of the workload.
"""
from __future__ import annotations

import copy
import json
import os
import time

import torch

from ..errors import EtformerError
from ..pruning import PruningPlan, apply_plan
from ..pruning.plan import DEFAULT_TILE
from ..sparse.tiles import atomic_write, atomic_write_json, atomic_write_text
from . import peers as P
from .timing import env_info, floor_us, measure_peaks, time_cuda

DENSE_PEERS = ("hf_sdpa", "hf_graph", "compile", "cublas_sdpa_graph")
ALL_PEERS = DENSE_PEERS + ("semi24", "bsr")
GATE = 2e-2  # relative error (on real tokens) against the fp32 reference above which a variant is "wrong"


def model_shape(name: str):
    from transformers import BertConfig, BertModel

    if name == "minilm":
        from ..models import load_model

        m, _ = load_model(None)
        return m
    layers = {"bert-base": 12, "distilbert": 6}[name]
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=layers, attn_implementation="sdpa")
    return BertModel(cfg, add_pooling_layer=False).eval()


def make_inputs(B, S, varlen, vocab, seed=0):
    g = torch.Generator().manual_seed(seed + 7919 * B + S)
    ids = torch.randint(1000, vocab - 1, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if varlen:
        lens = torch.randint(1, S + 1, (B,), generator=g)
        mask = (torch.arange(S)[None, :] < lens[:, None]).long()
    return ids.cuda(), mask.cuda()


def encoder_cost(model, mask, density_by_kind: dict):
    """(FLOPs, fewest bytes) of one forward on the real tokens: sparse weights counted at their density."""
    c = model.config
    d, f, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    lens = mask.sum(1).tolist()
    T = sum(lens)
    w = {"q": d * d, "k": d * d, "v": d * d, "o": d * d, "ffn_in": d * f, "ffn_out": f * d}
    wflops = sum(2 * T * n * density_by_kind.get(k, 1.0) for k, n in w.items())
    aflops = sum(4 * l * l * d for l in lens)
    wbytes = sum(2 * n * density_by_kind.get(k, 1.0) for k, n in w.items())
    return L * (wflops + aflops), L * wbytes + 2 * 2 * T * d


def _rel(y, ref, mask):
    m = mask.bool()
    return float((y[m].float() - ref[m].float()).norm() / ref[m].float().norm())


def run_bench(models=("bert-base",), batches=(1, 8, 32, 128), seqs=(128, 384, 512), varlens=(False, True),
              sparsities=(0.3, 0.5, 0.7, 0.9), tile=DEFAULT_TILE, peers=("hf_sdpa", "hf_graph", "compile",
              "cublas_sdpa_graph", "semi24", "bsr"), compile_shapes=None, log=print, max_tokens=65536,
              checkpoint=None, compile_limit_s: int = 150,
              variants=("dense", "tile", "attention_aware", "nm")) -> dict:
    from ..engine import optimize

    peaks = measure_peaks()
    log(f"peaks: {peaks['matmul_tflops']:.0f} TFLOP/s fp16 matmul, {peaks['copy_tbs']:.2f} TB/s copy")
    rows = []
    for mname in models:
        base32 = model_shape(mname).cuda()
        # variants: (name, sparsity, plan or None)
        plans = [("etformer_dense", 0.0, None)]
        if "tile" in variants:
            plans += [(f"etformer_tile{int(s * 100)}", s, PruningPlan.uniform("tile", s, tile)) for s in sparsities]
        if "etformer_tile50" not in [p[0] for p in plans]:  # the reference for the BSR peer
            plans.append(("etformer_tile50", 0.5, PruningPlan.uniform("tile", 0.5, tile)))
        if "attention_aware" in variants:
            plans.append(("etformer_attention_aware50", 0.5, PruningPlan.attention_aware(0.5, tile)))
        if "nm" in variants or "semi24" in peers:  # the reference for the 2:4 peer
            plans.append(("etformer_2:4", 0.5, PruningPlan.uniform("nm", 0.5, tile)))
        models32 = {}
        for name, s, plan in plans:
            models32[name] = (apply_plan(copy.deepcopy(base32), plan) if plan is not None else base32, plan)
        dense16 = copy.deepcopy(base32).half()
        built = {}
        for B in batches:
            for S in seqs:
                if B * S > max_tokens:
                    continue
                for varlen in varlens:
                    ids, mask = make_inputs(B, S, varlen, base32.config.vocab_size)
                    wl = {"model": mname, "batch": B, "seq": S, "varlen": varlen}
                    wrows = []
                    refs = {}

                    def ref_for(key):
                        if key not in refs:
                            with torch.no_grad():
                                refs[key] = models32[key][0](input_ids=ids, attention_mask=mask).last_hidden_state
                        return refs[key]

                    def time_variant(vname, sparsity, fn, ref_key, density):
                        row = dict(wl, variant=vname, sparsity=sparsity, median_us=None, p10_us=None, p90_us=None,
                                   floor_us=None, speedup_vs_best_peer=None, ok=False, error=None, rel_err=None,
                                   graph_replay_us=None)
                        try:
                            y = fn(ids, mask)
                            err = _rel(y, ref_for(ref_key), mask)
                            row["rel_err"] = err
                            if not err < GATE:
                                row["error"] = f"wrong: relative error {err:.2e} against the fp32 reference"
                            else:
                                t = time_cuda(lambda: fn(ids, mask), warmup=5, reps=30, min_ms=100)
                                fl, nb = encoder_cost(base32, mask, density)
                                row.update(median_us=t["median_us"], p10_us=t["p10_us"], p90_us=t["p90_us"],
                                           floor_us=floor_us(fl, nb, peaks), ok=True)
                        except Exception as e:  # the failure is the result
                            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                        wrows.append(row)
                        status = f"{row['median_us']:9.1f} us" if row["ok"] else f"FAILED ({row['error']})"
                        log(f"{mname} B={B:3d} S={S:3d} varlen={varlen!s:5s} {vname:28s} {status}")

                    dens1 = {}
                    def get(key, factory):
                        if key not in built:
                            built[key] = factory()
                        return built[key]

                    for peer in peers:
                        if peer == "compile" and compile_shapes is not None and (B, S, varlen) not in compile_shapes:
                            continue
                        try:
                            if peer == "hf_sdpa":
                                fn = P.hf_sdpa(dense16)
                            elif peer == "hf_graph":
                                fn = P.hf_graph(dense16)
                            elif peer == "compile":
                                fn = get(("compile", mname), lambda: P.compiled(dense16))
                                _with_alarm(lambda: fn(ids, mask), compile_limit_s, "torch.compile")
                            elif peer == "cublas_sdpa_graph":
                                fn = P.cublas_sdpa_graph(dense16, masked=varlen)
                            elif peer == "semi24":
                                fn = get(("semi24", mname, varlen), lambda: P.semi24(copy.deepcopy(models32["etformer_2:4"][0]).half(), varlen))
                            elif peer == "bsr":
                                fn = get(("bsr", mname, varlen), lambda: P.bsr(copy.deepcopy(models32["etformer_tile50"][0]).half(), tile, varlen))
                            else:
                                raise EtformerError(f"unknown peer {peer}")
                        except Exception as e:
                            wrows.append(dict(wl, variant=peer, sparsity=0.5 if peer in ("semi24", "bsr") else 0.0,
                                              median_us=None, p10_us=None, p90_us=None, floor_us=None,
                                              speedup_vs_best_peer=None, ok=False,
                                              error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"))
                            log(f"{mname} {peer}: FAILED to build ({wrows[-1]['error']})")
                            continue
                        ref_key = {"semi24": "etformer_2:4", "bsr": "etformer_tile50"}.get(peer, "etformer_dense")
                        sp = 0.5 if peer in ("semi24", "bsr") else 0.0
                        time_variant(peer, sp, fn, ref_key, dens1 if sp == 0 else {k: 0.5 for k in
                                     ("q", "k", "v", "o", "ffn_in", "ffn_out")})
                    for name, s, plan in plans:
                        key = (name, mname)
                        if key not in built:
                            built[key] = optimize(models32[name][0], plan, dtype=torch.float16, device="cuda")
                            built[key].check_finite = False
                        enc = built[key]
                        fn = lambda i, m, enc=enc: enc(i, m).last_hidden_state  # noqa: E731
                        dens = {k: (1 - plan.sparsity(k)) if plan is not None else 1.0 for k in
                                ("q", "k", "v", "o", "ffn_in", "ffn_out")}
                        time_variant(name, s, fn, name, dens)
                        if wrows[-1]["ok"] and B * S <= 8192:  # GPU time alone: the graph's replay, no host work
                            try:
                                rep = enc.graph_replay_fn(ids, mask)
                                wrows[-1]["graph_replay_us"] = time_cuda(rep, warmup=3, reps=30, min_ms=50)["median_us"]
                            except Exception:  # the replay time is extra information, never a failure
                                wrows[-1]["graph_replay_us"] = None
                    best_peer = min((r["median_us"] for r in wrows if r["ok"] and r["variant"] in DENSE_PEERS), default=None)
                    for r in wrows:
                        if r["ok"] and best_peer:
                            r["speedup_vs_best_peer"] = best_peer / r["median_us"]
                    rows += wrows
                    torch.cuda.empty_cache()
                    if checkpoint:
                        checkpoint({"env": env_info(), "peaks": peaks, "rows": rows, "tile": list(tile)})
        torch.cuda.empty_cache()
    return {"env": env_info(), "peaks": peaks, "rows": rows, "tile": list(tile)}


def _with_alarm(fn, seconds: int, what: str):
    """Run fn with a wall-clock limit (main thread, Unix): a compile that outlasts it is recorded as failed."""
    import signal

    def on_alarm(*_):
        raise TimeoutError(f"{what} took longer than {seconds} s (compile + first run)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_reports(res: dict, out: str, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    res["command"] = command

    atomic_write_json(os.path.join(out, "bench.json"), res)
    md = to_markdown(res)

    atomic_write_text(os.path.join(out, "bench.md"), md)
    try:
        plots(res, out)
    except Exception as e:  # a plot is not worth losing the numbers for
        print(f"plots skipped: {e}")


def to_markdown(res: dict) -> str:
    e, pk = res["env"], res["peaks"]
    lines = [f"# etformer bench on {e['gpu']}", "",
             f"torch {e['torch']}, Triton {e['triton']}, transformers {e['transformers']}, CUDA {e['cuda']}, {e['date']}.",
             f"Peaks measured in this run: {pk['matmul_tflops']:.0f} TFLOP/s (fp16 matmul), {pk['copy_tbs']:.2f} TB/s (copy). "
             f"Tile {res['tile'][0]}x{res['tile'][1]}. fp16 throughout.", "", f"Command: `{res.get('command', '')}`", "",
             "Median µs (p10–p90) of warm runs, CUDA-graphed where the variant supports it; ×best = best dense peer's "
             "median / this median (same workload, same process). Floor = max(FLOPs/peak, bytes/bandwidth) on real tokens. "
             "For etformer, 'GPU µs' is the replay of its captured graph alone (the rest of the median is host work: "
             "the input checks, one copy of the B sequence lengths to the host, the graph launch and the output copy; "
             "the unpadding indices are built inside the graph).",
             ""]
    groups = {}
    for r in res["rows"]:
        groups.setdefault((r["model"], r["batch"], r["seq"], r["varlen"]), []).append(r)
    lines += summary_table(groups) + [""]
    for (m, B, S, vl), rs in groups.items():
        lines += [f"### {m}, B={B}, S={S}{', variable length (mean S/2)' if vl else ''}", "",
                  "| variant | sparsity | median µs | p10–p90 | GPU µs | floor µs | % of floor | ×best peer | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            if r["ok"]:
                gpu = f"{r['graph_replay_us']:.1f}" if r.get("graph_replay_us") else ""
                lines.append(f"| {r['variant']} | {r['sparsity']:.0%} | {r['median_us']:.1f} | {r['p10_us']:.0f}–{r['p90_us']:.0f} | {gpu} | "
                             f"{r['floor_us']:.1f} | {100 * r['floor_us'] / r['median_us']:.0f}% | "
                             f"{(r['speedup_vs_best_peer'] or 0):.2f} | |")
            else:
                lines.append(f"| {r['variant']} | {r['sparsity']:.0%} | – | – | – | – | – | – | {r['error']} |")
        lines.append("")
    return "\n".join(lines)


SUMMARY_VARIANTS = ("etformer_dense", "etformer_tile30", "etformer_tile50", "etformer_tile70", "etformer_tile90",
                    "etformer_attention_aware50")


def summary_table(groups: dict) -> list[str]:
    """One line per workload: the best dense peer and each etformer variant's speed-up against it (same run)."""
    cols = [v for v in SUMMARY_VARIANTS if any(r["variant"] == v for rs in groups.values() for r in rs)]
    lines = ["## Summary: speed-up against the best dense peer of each workload", "",
             "| model | B | S | varlen | best dense peer | µs | " + " | ".join(c.replace("etformer_", "") for c in cols) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(cols)]
    for (m, B, S, vl), rs in groups.items():
        peers = [r for r in rs if r["ok"] and r["variant"] in DENSE_PEERS]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["median_us"])
        by = {r["variant"]: r for r in rs}
        cells = [f"{by[c]['speedup_vs_best_peer']:.2f}×" if c in by and by[c]["ok"] and by[c]["speedup_vs_best_peer"] else "–"
                 for c in cols]
        lines.append(f"| {m} | {B} | {S} | {'yes' if vl else 'no'} | {best['variant']} | {best['median_us']:.0f} | "
                     + " | ".join(cells) + " |")
    return lines


def plots(res: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["ok"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, B, S, vl) in sorted({(r["model"], r["batch"], r["seq"], r["varlen"]) for r in rows}):
        if vl:
            continue
        pts = sorted((r["sparsity"], r["median_us"]) for r in rows if (r["model"], r["batch"], r["seq"], r["varlen"]) == (m, B, S, vl)
                     and (r["variant"] == "etformer_dense" or r["variant"].startswith("etformer_tile")))
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{m} {B}x{S}")
    ax.set_xlabel("tile sparsity")
    ax.set_ylabel("latency (µs)")
    ax.set_yscale("log")
    ax.set_title("etformer latency against tile sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(os.path.join(out, "latency_vs_sparsity.png"), lambda t: fig.savefig(t, dpi=100, format="png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels, dense, sp50 = [], [], []
    for (m, B, S, vl) in sorted({(r["model"], r["batch"], r["seq"], r["varlen"]) for r in rows}):
        g = {r["variant"]: r for r in rows if (r["model"], r["batch"], r["seq"], r["varlen"]) == (m, B, S, vl)}
        if "etformer_dense" in g:
            labels.append(f"{m[:5]} {B}x{S}{' vl' if vl else ''}")
            dense.append(g["etformer_dense"]["speedup_vs_best_peer"] or 0)
            sp50.append((g.get("etformer_tile50") or {}).get("speedup_vs_best_peer") or 0)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], dense, width=0.4, label="etformer dense")
    ax.bar([x + 0.2 for x in xs], sp50, width=0.4, label="etformer 50% tiles")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, fontsize=7, ha="right")
    ax.set_ylabel("speed-up vs best dense peer")
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out, "speedup_by_workload.png"), lambda t: fig.savefig(t, dpi=100, format="png"))
    plt.close(fig)


def cpu_comparison(console) -> None:
    """No GPU: a tiny, honest CPU comparison of the engine's reference path against HF (no GPU-like numbers)."""
    import statistics

    from ..engine import optimize
    from ..models import load_model

    model, tok = load_model(None)
    enc = optimize(model, dtype="float32", device="cpu")
    b = tok(["a short sentence"] * 8, padding=True, return_tensors="pt")
    ts = {}
    for name, fn in (("hf", lambda: model(**b)), ("etformer (reference path)", lambda: enc(**b))):
        fn()
        xs = []
        for _ in range(5):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            xs.append((time.perf_counter() - t0) * 1e3)
        ts[name] = statistics.median(xs)
    console.print("[yellow]No CUDA GPU here: etformer's kernels need one; nothing GPU-like was timed.[/]")
    for k, v in ts.items():
        console.print(f"  CPU, MiniLM-L6, 8 x 4 tokens, {k}: {v:.1f} ms (median of 5)")


def merge(paths, out: str) -> dict:
    """One report from the bench.json files of split runs (same GPU and versions expected: the merged file keeps
    each part's env, peaks and command). Rows are kept as measured; a row's speed-up refers to its own run."""
    parts = []
    for p in paths:
        try:
            with open(p) as f:
                parts.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise EtformerError(f"cannot read bench results {p}: {e}") from None
        if "rows" not in parts[-1] or "env" not in parts[-1]:
            raise EtformerError(f"{p} is not an etformer bench.json (no rows/env)")
    gpus = {q["env"]["gpu"] for q in parts}
    if len(gpus) > 1:
        raise EtformerError(f"refusing to merge results from different GPUs: {sorted(gpus)}")
    res = {"env": parts[0]["env"], "peaks": parts[0]["peaks"], "tile": parts[0]["tile"],
           "rows": [r for q in parts for r in q["rows"]],
           "parts": [{"command": q.get("command"), "env": q["env"], "peaks": q["peaks"], "rows": len(q["rows"])}
                     for q in parts]}
    write_reports(res, out, "merged: " + " + ".join(str(q.get("command")) for q in parts))
    return res


def _csv(v, cast=str):
    return tuple(cast(x) for x in v.split(",")) if v else None


def bench_cmd(args, console) -> None:
    out = args.out or "bench-results"
    if getattr(args, "merge", None):
        res = merge(args.merge, out)
        console.print(f"merged {len(res['rows'])} rows into {out}/bench.json, bench.md and plots")
        return
    if not torch.cuda.is_available():
        cpu_comparison(console)
        return
    command = "etformer bench " + " ".join(a for a in getattr(args, "argv", []) if a != "bench") if getattr(args, "argv", None) \
        else "etformer bench" + (" --quick" if args.quick else "") + f" --out {out}"
    save = lambda r: write_reports(r, out, command)  # noqa: E731  (after every workload: nothing is lost)
    if args.quick:
        res = run_bench(models=("bert-base",), batches=(1, 8, 32), seqs=(128, 512), varlens=(False, True),
                        sparsities=(0.5, 0.7), compile_shapes={(32, 128, False)}, log=console.print,
                        max_tokens=16384, checkpoint=save)
    else:
        kw = {}
        if args.peers:
            kw["peers"] = _csv(args.peers)
            bad = set(kw["peers"]) - set(ALL_PEERS)
            if bad:
                raise EtformerError(f"unknown peer(s) {sorted(bad)}; choose from {', '.join(ALL_PEERS)}")
        if args.sparsities:
            kw["sparsities"] = _csv(args.sparsities, float)
        if args.variants:
            kw["variants"] = _csv(args.variants)
        shapes = {(1, 128, False), (8, 128, False), (32, 128, False), (32, 512, False)}
        if args.compile_shapes:
            try:
                shapes = {(int(b), int(s), False) for b, s in (x.split("x") for x in args.compile_shapes.split(","))}
            except ValueError:
                raise EtformerError(f"--compile-shapes takes BxS pairs like 32x128,8x512, not {args.compile_shapes!r}") from None
        res = run_bench(models=_csv(args.models) or ("bert-base", "distilbert", "minilm"),
                        batches=_csv(args.batches, int) or (1, 8, 32, 128), seqs=_csv(args.seqs, int) or (128, 384, 512),
                        log=console.print, compile_shapes=shapes, checkpoint=save, **kw)
    save(res)
    console.print(f"wrote {out}/bench.json, bench.md and plots")
