"""Same-run A/B of the engine's CUDA-graph bound (encoder.GRAPH_MAX_TOKENS) 16384 against 65536 tokens on the H200.

BERT-base-shaped (random weights) and all-MiniLM-L6-v2, dense and 50% tiles, 64x512, 128x512 and 128x512 with
variable lengths, finite check off: the median end-to-end time of a forward (time_cuda; eager above the bound, a
graph replay below it), alternating the two bounds twice, with the peak memory the allocator reserved. Console
output only.

    python3 scripts/graph_max_tokens_ab.py
"""
import importlib

import torch

from etformer.bench.run import make_inputs
from etformer.bench.timing import time_cuda
from tile_sub_ab import bert_encoders  # scripts/

E = importlib.import_module("etformer.engine.encoder")


def main():
    shipped = E.GRAPH_MAX_TOKENS
    try:
        for model in ("bert-base", "minilm"):
            encs = bert_encoders(model=model)
            for B, S, v in ((64, 512, False), (128, 512, False), (128, 512, True)):
                ids, mask = make_inputs(B, S, v, 30522)
                for name, enc in encs.items():
                    r = []
                    for g in (16384, 65536, 16384, 65536):
                        E.GRAPH_MAX_TOKENS = g
                        enc._graphs.clear()
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        t = time_cuda(lambda: enc(ids, mask), min_ms=200)["median_us"]
                        r.append(f"{g}: {t:.0f} us {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB")
                    print(f"{model} {B}x{S}{' varlen' if v else ''} {name}: " + " | ".join(r), flush=True)
    finally:
        E.GRAPH_MAX_TOKENS = shipped


if __name__ == "__main__":
    main()
