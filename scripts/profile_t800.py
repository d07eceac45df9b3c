"""Where the time goes for E.T.'s Transformer-800 through ETTorchEncoder at small batches: wall time per call, the
captured graph's replay alone (GPU), and the GPU kernels of one forward.

    python3 scripts/profile_t800.py
"""
import time

import torch
from torch import nn

from etformer.bench.timing import time_cuda
from etformer.bench.transformer import build
from etformer.engine.torch_encoder import optimize_torch_encoder

for B, S in ((1, 128), (32, 512)):
    base = build(3200)
    e = optimize_torch_encoder(base, dtype=torch.float16, device="cuda", tile=(128, 64))
    e.core.check_finite = False
    x = torch.randn(B, S, 800, device="cuda", dtype=torch.float16)
    cmask = nn.Transformer.generate_square_subsequent_mask(S, device="cuda")
    fn = lambda: e(x, mask=cmask, is_causal=True)  # noqa: E731
    wall = time_cuda(fn, warmup=5, reps=50, min_ms=100)["median_us"]
    graph = next(iter(e._graphs.values()))[0]
    replay = time_cuda(graph.replay, warmup=5, reps=50, min_ms=100)["median_us"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        fn()
    host = (time.perf_counter() - t0) / 200 * 1e6  # host-side issue rate (GPU may lag behind)
    torch.cuda.synchronize()
    print(f"B={B} S={S}: wall {wall:.1f} us, graph replay {replay:.1f} us, host loop {host:.1f} us/call")
    e.core.use_graphs = False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = sorted(((getattr(k, "self_device_time_total", 0) / 5, k.key[:70]) for k in prof.key_averages()), reverse=True)
    for t, k in rows[:10]:
        print(f"   {t:8.1f} us  {k}")
