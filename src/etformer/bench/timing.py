"""Timing on the GPU: warm-up, then CUDA events around each run (or each CUDA-graph replay); median, p10, p90."""
from __future__ import annotations

import statistics

import torch


def _quantile(xs, q):
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(len(xs) - 1, int(i) + 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def time_cuda(fn, *, warmup: int = 10, reps: int = 100, graph: bool = False, min_ms: float = 200.0,
              per_graph: int = 1) -> dict:
    """Median/p10/p90 in microseconds of fn() on the current stream. With graph=True, fn is captured once into a
    CUDA graph and its replays are timed (launch gaps removed), as a deployed engine would run it.

    per_graph (graph=True only): the graph holds that many back-to-back calls of fn and each replay's time is divided
    by it. A graph of one short kernel is timed at the host's cost of submitting a replay (8-17 us on the H200's
    host, whatever the kernel), since the GPU waits for each submission; R calls in a row amortise that cost, so the
    figure is the kernel's own time, as inside a captured encoder."""
    if per_graph < 1 or (per_graph > 1 and not graph):
        raise ValueError("per_graph must be at least 1, and above 1 only with graph=True")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        from ..engine.encoder import capture_graph

        def body():
            for _ in range(per_graph - 1):
                fn()
            return fn()

        run = capture_graph(body)[0].replay
        for _ in range(3):
            run()
    # estimate, then choose the repeat count so the whole measurement lasts about min_ms
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(5):
        run()
    en.record()
    torch.cuda.synchronize()
    est = max(st.elapsed_time(en) / 5, 1e-3)
    n = int(min(max(reps, min_ms / est), 2000))
    times = []
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in evs:
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) * 1000.0 / per_graph for a, b in evs]
    return {"median_us": statistics.median(times), "p10_us": _quantile(times, 0.1), "p90_us": _quantile(times, 0.9),
            "n": n, "per_graph": per_graph}


def graphed_forward(enc, input_ids, attention_mask, *, min_ms: float = 80.0) -> tuple[torch.Tensor, float]:
    """(last_hidden_state in fp32, GPU µs) of an ETEncoder forward through a freshly captured CUDA graph: the graph
    cache is emptied, the first call captures the graph for these inputs, and that graph's replays are timed (median).
    For same-run A/Bs of module switches, whose graphs must not outlive the switch."""
    enc._graphs.clear()
    out = enc(input_ids, attention_mask).last_hidden_state.float()
    return out, time_cuda(enc.graph_replay_fn(input_ids, attention_mask), min_ms=min_ms)["median_us"]


def forms_ab(enc, input_ids, attention_mask, forms: dict, *, rounds: int = 2,
             min_ms: float = 80.0) -> tuple[dict, dict]:
    """Same-run A/B of forms of one encoder on one batch. forms maps a name to a no-argument function that puts that
    form in place (sets a module switch, swaps a kernel in). Each round runs every form in turn, each timed through a
    freshly captured graph (graphed_forward), so the forms interleave. The caller restores its switches (try/finally
    around the call). Returns ({name: [GPU µs, one a round]}, {name: fp32 output of its last round})."""
    times: dict = {}
    outs: dict = {}
    for _ in range(rounds):
        for name, put in forms.items():
            put()
            outs[name], us = graphed_forward(enc, input_ids, attention_mask, min_ms=min_ms)
            times.setdefault(name, []).append(us)
    return times, outs


def profile_kernels(run, *, reps: int = 5, width: int = 70) -> list[tuple[str, float, int]]:
    """GPU time per call of each kernel that run() launches (profiled over reps calls after reps warm-up calls):
    (name cut to width characters, microseconds per call, launches per call), longest first."""
    for _ in range(reps):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    fam: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or 0
        if t:
            us, n = fam.get(e.key[:width], (0.0, 0))
            fam[e.key[:width]] = (us + t / reps, n + e.count // reps)
    return sorted(((k, us, n) for k, (us, n) in fam.items()), key=lambda r: -r[1])


def measure_peaks(device="cuda") -> dict:
    """A large fp16 matrix product (TFLOP/s) and a large device-to-device copy (TB/s, bytes read + written)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    t = time_cuda(lambda: a @ b, warmup=3, reps=20, min_ms=300)
    tflops = 2 * n ** 3 / (t["median_us"] * 1e-6) / 1e12
    src = torch.empty(1 << 30, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    c = time_cuda(lambda: dst.copy_(src), warmup=3, reps=20, min_ms=300)
    tbs = 2 * src.numel() / (c["median_us"] * 1e-6) / 1e12
    return {"matmul_tflops": tflops, "copy_tbs": tbs}


def floor_us(flops: float, nbytes: float, peaks: dict) -> float:
    return max(flops / (peaks["matmul_tflops"] * 1e12), nbytes / (peaks["copy_tbs"] * 1e12)) * 1e6


def env_info() -> dict:
    import datetime
    import platform

    import triton
    import transformers

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
