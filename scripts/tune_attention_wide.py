"""Launch sweep of the attention kernel for wide heads (D = 200, padded to 256 on chip), causal, as in E.T.'s
Transformer-800, against SDPA flash on the same padded batch. Prints one line per config; JSON to OUTDIR.

    python3 scripts/tune_attention_wide.py OUTDIR
"""
import json
import sys

import torch
import torch.nn.functional as F

from etformer.bench.timing import time_cuda
from etformer.kernels.attention import _blocks, attention

H, D = 4, 200
rows = []
for B, S in ((1, 128), (8, 512), (32, 512)):
    T = B * S
    cu = torch.arange(0, T + 1, S, device="cuda", dtype=torch.int32)
    qkv = torch.randn(T, 3 * H * D, device="cuda", dtype=torch.float16)
    o = torch.empty(T, H * D, device="cuda", dtype=torch.float16)
    q, k, v = qkv.view(B, S, 3, H, D).unbind(2)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    sdpa = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), graph=True, min_ms=30)["median_us"]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).transpose(1, 2).reshape(T, H * D)
    cands = [(False, bm, bn, w, st) for bm in (32, 64, 128) for bn in (16, 32, 64) for w in (4, 8) for st in (1, 2)]
    if S <= 128:
        cands += [(True, bm, 128, w, 1) for bm in (16, 32, 64) for w in (4, 8)]
    res = []
    for c in cands:
        try:
            attention(qkv, cu, S, H, D, causal=True, out=o, _config=c)
            err = float((o.float() - ref).norm() / ref.norm())
            t = time_cuda(lambda: attention(qkv, cu, S, H, D, causal=True, out=o, _config=c), graph=True,
                          min_ms=15)["median_us"]
        except Exception:  # out of resources
            continue
        res.append((t, c, err))
    res.sort(key=lambda r: r[0])
    rows.append({"B": B, "S": S, "sdpa_us": sdpa, "best": res[:5], "current": [r for r in res if r[1] == _blocks(S, 256, True)]})
    print(f"B={B} S={S}: SDPA {sdpa:.1f} us; best {res[:3]}; current {rows[-1]['current']}", flush=True)
with open(sys.argv[1] + "/tune_attention_wide.json", "w") as f:
    json.dump(rows, f, indent=1)
