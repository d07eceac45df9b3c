"""Where the host time of one small-batch engine call goes, on a GPU: BERT-base shape (random weights, fp16).

    python3 scripts/host_overhead.py OUT_DIR [--batches 1,2 --seq 128]

For each batch (all-ones mask, as a served request of one length), on the packed path (sync_free_max_tokens = 0): the
median of N calls of each host step of the forward timed with perf_counter: input checks, the lengths read (a
device-to-host copy, so a sync), the graph lookup and input copies, the replay's submission, the output copy and the
finite check (which waits for the GPU). Then a same-run A/B, in two rounds (forward, then reverse order): the packed
path and the padded, sync-free one (sync_free_max_tokens = 256) with the finite check on, and the packed path with
it off (the padded path is only taken with the check on), each with the full-length graph replayed before the
lengths are read (SPECULATE_FULL), then the packed path without that, check off and on: end to end (time_cuda of the
call), the forward's wall time, and the graph replay alone (GPU time). Writes host_overhead.json.
"""
import argparse
import os
import statistics
import sys
import time

import torch

from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import env_info, time_cuda
from etformer.engine import encoder as E
from etformer.engine import optimize
from etformer.sparse.tiles import atomic_write_json

SHIPPED = E.SPECULATE_FULL


def steps(enc, ids, mask):
    """One forward, split into its host steps (the calls ETEncoder.forward makes on the packed path when it reads
    the lengths first, i.e. without SPECULATE_FULL's replay); returns {step: seconds}."""
    t = [time.perf_counter()]
    mask = enc._validate(ids, mask, None)
    t.append(time.perf_counter())
    T, max_len, keep = enc._unpadding(mask, *ids.shape)
    t.append(time.perf_counter())
    graph, static, out = enc._graphs[enc._graph_key(ids, None, keep, T, max_len)]
    for dst, src in zip(static, (ids, None, keep)):
        if dst is not None:
            dst.copy_(src)
    t.append(time.perf_counter())
    graph.replay()
    t.append(time.perf_counter())
    y = out.clone()
    ok = bool(torch.isfinite(y).all())
    t.append(time.perf_counter())
    assert ok
    names = ["validate", "lengths (sync)", "graph lookup + input copies", "replay submit", "clone + finite (waits)"]
    return {n: t[i + 1] - t[i] for i, n in enumerate(names)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    base = model_shape("bert-base").cuda()
    enc = optimize(base, None, dtype=torch.float16, device="cuda")
    rows, ab = [], []
    for B in [int(b) for b in a.batches.split(",")]:
        ids, mask = make_inputs(B, a.seq, False, base.config.vocab_size)
        enc.sync_free_max_tokens = 0
        enc(ids, mask)  # capture
        runs = []
        for _ in range(a.n):
            torch.cuda.synchronize()
            runs.append(steps(enc, ids, mask))
        med = {k: statistics.median(r[k] for r in runs) * 1e6 for k in runs[0]}
        rows.append({"B": B, "S": a.seq, "steps_us": med})
        print(f"B={B} S={a.seq} packed path, host steps: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()),
              flush=True)
        configs = [(0, True, True), (E.SYNC_FREE_MAX_TOKENS, True, True), (0, False, True), (0, False, False),
                   (0, True, False)]
        for rnd, order in enumerate((configs, configs[::-1])):
            for knob, check, spec in order:
                enc.sync_free_max_tokens, enc.check_finite = knob, check
                E.SPECULATE_FULL = spec
                enc(ids, mask)  # capture
                e2e = time_cuda(lambda: enc(ids, mask), min_ms=100)["median_us"]
                gpu = time_cuda(enc.graph_replay_fn(ids, mask), min_ms=100)["median_us"]
                wall = []
                for _ in range(a.n):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    enc(ids, mask)
                    wall.append(time.perf_counter() - t0)
                r = {"B": B, "S": a.seq, "round": rnd, "path": "padded, sync-free" if knob else "packed",
                     "check_finite": check, "speculate_full": spec, "e2e_us": e2e, "gpu_us": gpu,
                     "forward_wall_us": statistics.median(wall) * 1e6}
                ab.append(r)
                print(f"B={B} S={a.seq} {r['path']:17s} check_finite={check!s:5s} speculate={spec!s:5s}: "
                      f"e2e {e2e:6.1f} us, "
                      f"GPU {gpu:6.1f}, forward wall {r['forward_wall_us']:6.1f}", flush=True)
    enc.sync_free_max_tokens, enc.check_finite = E.SYNC_FREE_MAX_TOKENS, True
    E.SPECULATE_FULL = SHIPPED
    res = {"env": env_info(), "command": "python3 scripts/host_overhead.py " + " ".join(sys.argv[1:]), "rows": rows,
           "ab": ab}
    os.makedirs(a.out, exist_ok=True)

    atomic_write_json(os.path.join(a.out, "host_overhead.json"), res)


if __name__ == "__main__":
    main()
