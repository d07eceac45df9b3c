"""Launch sweep of the attention kernel (12 heads of 64, fp16) on variable-length and full batches, against SDPA
flash on the padded batch. Lengths uniform in LO..S (LO = 1 as in the kernels bench; seeded by B*1000+S). Each case:
every (one_pass, BLOCK_M, BLOCK_N, num_warps, num_stages) candidate, checked against fp32 math, timed as the median
of CUDA-graph replays of PER_GRAPH back-to-back calls (PDL off, as for the peer); prints the five best and the launch
the current rule picks. JSON to OUT_DIR.

    python3 scripts/tune_attention_varlen.py OUT_DIR
"""
import os
import sys

import torch
import torch.nn.functional as F

from etformer.bench.timing import env_info, time_cuda
from etformer.kernels.attention import _blocks, attention, attention_reference
from etformer.sparse.tiles import atomic_write_json

H, D = 12, 64
PER_GRAPH = 20
# (B, S, LO): LO = S is a full batch
CASES = [(32, 128, 1), (32, 128, 128), (8, 128, 1), (32, 128, 64), (32, 128, 96), (32, 384, 1), (32, 512, 1)]


def candidates(S):
    c = [(False, bm, bn, w, st) for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for w in (4, 8)
         for st in (1, 2, 3) if (w == 8) == (bm == 128) or bm == 64]
    if S <= 128:
        c += [(True, bm, 128, w, 1) for bm in (16, 32, 64) for w in (4, 8)]
    return c


def batch(B, S, lo):
    """A batch of B sequences with lengths uniform in lo..S (all S when lo = S; seeded by B*1000+S): (lengths,
    cu_seqlens, packed qkv [T, 3*H*D], an output [T, H*D], a padded [B, H, S, D] input for SDPA), fp16 on the GPU."""
    g = torch.Generator().manual_seed(B * 1000 + S)
    lens = torch.randint(lo, S + 1, (B,), generator=g).tolist() if lo < S else [S] * B
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return (lens, cu, torch.randn(T, 3 * H * D, device="cuda", dtype=torch.float16),
            torch.empty(T, H * D, device="cuda", dtype=torch.float16),
            torch.randn(B, H, S, D, device="cuda", dtype=torch.float16))


def main(out_dir):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from etformer.kernels import _common
    _common.USE_PDL = False
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for B, S, lo in CASES:
        varlen = lo < S
        lens, cu, qkv, o, q = batch(B, S, lo)
        T = sum(lens)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            sdpa = time_cuda(lambda: F.scaled_dot_product_attention(q, q, q), graph=True, min_ms=30,
                             per_graph=PER_GRAPH)["median_us"]
        ref = attention_reference(qkv.float(), cu, H, D)
        cur = _blocks(max(lens), 64, True, T / (B * max(lens)), T)
        res = []
        for c in candidates(max(lens)):
            try:
                attention(qkv, cu, max(lens), H, D, out=o, _config=c)
                torch.cuda.synchronize()
                err = float((o.float() - ref).norm() / ref.norm())
                t = time_cuda(lambda: attention(qkv, cu, max(lens), H, D, out=o, _config=c), graph=True,
                              min_ms=15, per_graph=PER_GRAPH)["median_us"]
            except Exception as e:  # out of resources
                print(f"  {c}: {type(e).__name__}", flush=True)
                continue
            res.append({"config": list(c), "us": t, "err": err})
        bad = [r for r in res if not r["err"] < 1e-2]
        res.sort(key=lambda r: r["us"])
        current = [r for r in res if tuple(r["config"]) == cur]
        rows.append({"B": B, "S": S, "min_len": lo, "varlen": varlen, "fill": T / (B * max(lens)), "tokens": T, "mean_len": T / B, "sdpa_padded_us": sdpa,
                     "best": res[:8], "current": current, "all": res, "bad": bad})
        print(f"B={B} S={S} lengths {lo}..{S} T={T} fill {T / (B * max(lens)):.2f}: SDPA padded {sdpa:.1f} us; current {cur} "
              f"{current[0]['us'] if current else float('nan'):.1f}; best:", flush=True)
        for r in res[:5]:
            print(f"   {r['config']} {r['us']:.1f} us (x{sdpa / r['us']:.2f} SDPA) err {r['err']:.1e}", flush=True)
        if bad:
            print(f"   WRONG: {[(r['config'], r['err']) for r in bad]}", flush=True)
    atomic_write_json(os.path.join(out_dir, "tune_attention_varlen.json"),
                      {"env": env_info(), "command": "python3 scripts/tune_attention_varlen.py " + " ".join(sys.argv[1:]),
                       "per_graph": PER_GRAPH, "pdl": False, "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1])
