"""Wall time against GPU kernel time of MiniLM forwards above the graphed sizes (an eager-path probe), on the H200.

all-MiniLM-L6-v2 dense and with 50% tiles, B x 512 for B = 128, 64, 32 (the first two ran eagerly under the engine's
graph bound then, GRAPH_MAX_TOKENS = 16384; the last replays its graph), finite check off: the median end-to-end time
of a forward (time_cuda) and the sum of its kernels' GPU time (profile_kernels), with add+LayerNorm in two rows a
program from 4096 rows and in one; the longest kernels. Console output only.

    python3 scripts/eager_host_probe.py
"""
import importlib

from etformer.bench.run import make_inputs
from etformer.bench.timing import profile_kernels, time_cuda
from tile_sub_ab import bert_encoders  # scripts/

LN = importlib.import_module("etformer.kernels.layernorm")


def main():
    encs = bert_encoders(model="minilm")
    shipped = LN.MULTI_ROW_LAUNCH
    try:
        for B, S in ((128, 512), (64, 512), (32, 512)):
            ids, mask = make_inputs(B, S, False, 30522)
            for name, enc in encs.items():
                for launch in (((4096, 2, 4),), ()):
                    LN.MULTI_ROW_LAUNCH = launch
                    t = time_cuda(lambda: enc(ids, mask), min_ms=300)["median_us"]
                    prof = profile_kernels(lambda: enc(ids, mask), reps=3)
                    print(f"{B}x{S} {name} ln={'rows2' if launch else 'row'}: wall {t:.0f} us, kernel sum "
                          f"{sum(us for _, us, _ in prof):.0f} us", flush=True)
                    if launch:
                        for k in prof[:6]:
                            print("    ", k, flush=True)
    finally:
        LN.MULTI_ROW_LAUNCH = shipped


if __name__ == "__main__":
    main()
