"""Wall time against GPU kernel time of MiniLM forwards above the graphed sizes (an eager-path probe), on the H200.

all-MiniLM-L6-v2 dense and with 50% tiles, B x 512 for B = 128, 64, 32 (the first two run eagerly under
GRAPH_MAX_TOKENS = 16384, the last replays its graph), finite check off: the median end-to-end time of a forward
(time_cuda) and the sum of its kernels' GPU time (profile_kernels), with add+LayerNorm in two rows a program from 4096
rows and in one; the longest kernels. Console output only.

    python3 scripts/eager_host_probe.py
"""
import copy, time, torch, importlib
from etformer.bench.run import make_inputs, model_shape
from etformer.bench.timing import profile_kernels, time_cuda
from etformer.engine import optimize
from etformer.pruning import PruningPlan, apply_plan
LN = importlib.import_module("etformer.kernels.layernorm")
base = model_shape("minilm").cuda()
plan = PruningPlan.uniform("tile", 0.5, (128, 64))
encs = {"dense": optimize(base.eval(), None, dtype=torch.float16, device="cuda"),
        "tile50": optimize(apply_plan(copy.deepcopy(base), plan).eval(), plan, dtype=torch.float16, device="cuda")}
for B, S in ((128, 512), (64, 512), (32, 512)):
    ids, mask = make_inputs(B, S, False, 30522)
    for name, enc in encs.items():
        enc.check_finite = False
        for lnr in (((4096, 2, 4),), ()):
            LN.MULTI_ROW_LAUNCH = lnr
            f = lambda: enc(ids, mask)
            t = time_cuda(f, min_ms=300)["median_us"]
            prof = profile_kernels(f, reps=3)
            tot = sum(us * 1 for _, us, n in prof)
            print(f"{B}x{S} {name} ln={'rows2' if lnr else 'row'}: wall {t:.0f} us, kernel sum {tot:.0f} us", flush=True)
            if lnr:
                for k in prof[:6]:
                    print("    ", k, flush=True)
LN.MULTI_ROW_LAUNCH = ((4096, 2, 4),)
