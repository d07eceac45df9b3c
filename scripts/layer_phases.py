"""Where the time of the persistent layer kernel goes, phase by phase, on a GPU (BERT-base shapes, fp16).

    python3 scripts/layer_phases.py OUT_DIR            # phase timer at the default launch shape
    python3 scripts/layer_phases.py OUT_DIR --sweep    # GPU time of the HBM chain per launch shape (layer_sweep.json)
    python3 scripts/layer_phases.py OUT_DIR --sweep2   # a second round around the best of the first (layer_sweep2.json)

Runs a chain of 12 layers (distinct random weights, so they stream from HBM as in a real model; then one layer's
weights for all 12, L2-resident) at 128 and 256 tokens, each layer with the kernel's %globaltimer stamps
(encoder_layer(_timings=...)): per program the time after its wait and at the end of each phase, before the barrier.
For each phase: the time from the previous barrier's release (the last program's end of the previous phase) to the
last program's end of this one, and the spread between the first and the last program to end it. Medians over
layers and repeats. Also the GPU time of the whole chain in a CUDA graph beside it. Writes layer_phases.json.
"""
import os
import statistics
import sys

import torch

from etformer.bench.timing import env_info, time_cuda
from etformer.kernels import encoder_layer as EL
from etformer.sparse.tiles import atomic_write_json

PHASES = ["qkv", "attention + O partials", "add+LN 1", "FFN-in + GELU", "FFN-out partials", "add+LN 2"]
HID, I, H, D, LAYERS = 768, 3072, 12, 64, 12


def weights(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, device="cuda", generator=g) * scale).half()
    return (r(3 * HID, HID, scale=HID ** -0.5), r(3 * HID, scale=0.1), r(HID, HID, scale=HID ** -0.5),
            r(HID, scale=0.1), (1 + r(HID, scale=0.1), r(HID, scale=0.1)), r(I, HID, scale=HID ** -0.5),
            r(I, scale=0.1), r(HID, I, scale=I ** -0.5), r(HID, scale=0.1), (1 + r(HID, scale=0.1), r(HID, scale=0.1)))


def main(out_dir):
    P = torch.cuda.get_device_properties(0).multi_processor_count
    distinct = [weights(i) for i in range(LAYERS)]
    shared = [distinct[0]] * LAYERS
    res = {"env": env_info(), "command": "python3 scripts/layer_phases.py OUT_DIR", "programs": P, "rows": []}
    for tokens in (128, 256):
        x = torch.randn(tokens, HID, device="cuda").half()
        cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
        for name, ws in (("distinct weights (HBM)", distinct), ("one layer's weights (L2)", shared)):
            stamps = torch.zeros(LAYERS, P * 8, dtype=torch.int64, device="cuda")

            def chain(timed):
                c = torch.zeros(LAYERS, dtype=torch.int32, device="cuda")
                h = x
                for i, w in enumerate(ws):
                    h = EL.encoder_layer(h, cu, tokens, H, D, *w, counter=c[i:i + 1],
                                         _timings=stamps[i] if timed else None)
                return h

            graph_us = time_cuda(lambda: chain(False), graph=True, min_ms=50)["median_us"]
            per = {p: [] for p in PHASES}
            spread = {p: [] for p in PHASES}
            total = []
            for _ in range(20):
                chain(True)
                torch.cuda.synchronize()
                t = stamps.view(LAYERS, P, 8)[:, :, :7].double().cpu() / 1000.0  # us
                for layer in range(LAYERS):
                    s = t[layer]
                    prev = float(s[:, 0].max())
                    total.append(float(s[:, 6].max()) - float(s[:, 0].min()))
                    for k, p in enumerate(PHASES, start=1):
                        per[p].append(float(s[:, k].max()) - prev)
                        spread[p].append(float(s[:, k].max() - s[:, k].min()))
                        prev = float(s[:, k].max())
            row = {"tokens": tokens, "weights": name, "graph_us_12_layers": graph_us,
                   "layer_us_median": statistics.median(total),
                   "phase_us_median": {p: statistics.median(v) for p, v in per.items()},
                   "phase_end_spread_us_median": {p: statistics.median(v) for p, v in spread.items()}}
            res["rows"].append(row)
            print(f"{tokens} tokens, {name}: 12 layers {graph_us:.1f} us in a graph; one layer {row['layer_us_median']:.1f}"
                  " us: " + ", ".join(f"{p} {v:.1f} (spread {row['phase_end_spread_us_median'][p]:.1f})"
                                      for p, v in row["phase_us_median"].items()), flush=True)
    os.makedirs(out_dir, exist_ok=True)

    atomic_write_json(os.path.join(out_dir, "layer_phases.json"), res)


# Launch shapes for --sweep: deeper pipelines and longer K steps for the GEMM phases (a step costs ~0.45 us at the
# default), and the two best shapes of the L2 sweep in layer_ab.json (4 column chunks per attention item, 8 warps).
SWEEP = [{}, {"num_stages": 4}, {"num_stages": 5}, {"BK": 128}, {"BK": 128, "num_stages": 4},
         {"NCH": 4, "num_warps": 8}, {"NCH": 4, "num_warps": 8, "num_stages": 4},
         {"NCH": 4, "num_warps": 8, "BK": 128, "num_stages": 4}]
# second round, around the best of the first (NCH 4, 8 warps, 4 stages): --sweep2
SWEEP2 = [{"NCH": 4, "num_warps": 8, "num_stages": 4}, {"NCH": 4, "num_warps": 8, "num_stages": 5},
          {"NCH": 4, "num_warps": 8, "num_stages": 6}, {"NCH": 4, "num_warps": 8, "num_stages": 5, "BM_ATT": 32},
          {"NCH": 4, "num_warps": 8, "num_stages": 5, "SPLIT": 8}, {"NCH": 6, "num_warps": 8, "num_stages": 5}]


def sweep(out_dir, configs=SWEEP, name="layer_sweep.json"):
    distinct = [weights(i) for i in range(LAYERS)]
    flag = "--sweep2" if configs is SWEEP2 else "--sweep"
    res = {"env": env_info(), "command": f"python3 scripts/layer_phases.py OUT_DIR {flag}", "rows": []}
    for tokens in (128, 256):
        x = torch.randn(tokens, HID, device="cuda").half()
        cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
        for cfg in configs:
            def chain():
                c = torch.zeros(LAYERS, dtype=torch.int32, device="cuda")
                h = x
                for i, w in enumerate(distinct):
                    h = EL.encoder_layer(h, cu, tokens, H, D, *w, counter=c[i:i + 1], _config=cfg)
                return h
            try:
                us = time_cuda(chain, graph=True, min_ms=50)["median_us"]
            except Exception as e:  # a shape that does not fit (shared memory, registers)
                us = None
                print(f"{tokens} tokens {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            res["rows"].append({"tokens": tokens, "config": cfg, "us_12_layers": us})
            print(f"{tokens} tokens {cfg}: {us} us", flush=True)
    os.makedirs(out_dir, exist_ok=True)

    atomic_write_json(os.path.join(out_dir, name), res)


if __name__ == "__main__":
    if "--sweep2" in sys.argv[2:]:
        sweep(sys.argv[1], SWEEP2, "layer_sweep2.json")
    elif "--sweep" in sys.argv[2:]:
        sweep(sys.argv[1])
    else:
        main(sys.argv[1])
