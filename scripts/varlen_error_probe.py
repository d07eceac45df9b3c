"""Which part of the small-batch path makes a padded batch's hidden states wrong (diagnostic, on a GPU).

    python3 scripts/varlen_error_probe.py OUT_DIR

BERT-base-shaped encoder (random weights, fp16) against its fp32 Hugging Face run, relative error on the real tokens,
for the bench's variable-length batches (make_inputs(B, S, varlen=True): 33 of 128, 213 of 256, 66 + 127 of 2 x 128,
3 + 54 of 2 x 256) and their full-length twins, packed path (check_finite off) and padded path, with one switch flipped
at a time: CUDA graphs off, graph row rounding off, PDL off, the small-batch path on cuBLAS. Writes
varlen_error_probe.json.
"""
import importlib
import os
import sys

import torch

from etformer.bench.run import _rel as rel, make_inputs, model_shape
from etformer.bench.timing import env_info
from etformer.engine import optimize
from etformer.sparse.tiles import atomic_write_json

E = importlib.import_module("etformer.engine.encoder")
KC = importlib.import_module("etformer.kernels._common")


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    base = model_shape("bert-base").cuda()
    enc = optimize(base, None, dtype=torch.float16, device="cuda")
    saved = (E.GRAPH_ROW_MULTIPLE, KC.USE_PDL, E.SMALL_PATH)
    switches = {
        "default": {},
        "no_graphs": {"graphs": False},
        "no_rounding": {"GRAPH_ROW_MULTIPLE": 1},
        "no_pdl": {"USE_PDL": False},
        "cublas": {"SMALL_PATH": "cublas"},
        "kernels_no_pdl": {"USE_PDL": False, "SMALL_PATH": "triton"},
    }
    rows = []
    try:
        for B, S in ((1, 128), (1, 256), (2, 128), (2, 256)):
            for varlen in (True, False):
                ids, mask = make_inputs(B, S, varlen, 30522)
                with torch.no_grad():
                    ref = base(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                for path in ("packed", "padded"):
                    for name, sw in switches.items():
                        E.GRAPH_ROW_MULTIPLE = sw.get("GRAPH_ROW_MULTIPLE", saved[0])
                        KC.USE_PDL = sw.get("USE_PDL", saved[1])
                        E.SMALL_PATH = sw.get("SMALL_PATH", saved[2])
                        enc.use_graphs = sw.get("graphs", True)
                        enc.check_finite = path == "padded"
                        enc._graphs.clear()
                        errs = [rel(enc(ids, mask).last_hidden_state, ref, mask) for _ in range(3)]
                        rows.append({"B": B, "S": S, "varlen": varlen, "tokens": int(mask.sum()), "path": path,
                                     "switch": name, "rel_err": errs})
                        print(f"{B}x{S} varlen={varlen!s:5} tokens={int(mask.sum()):3d} {path:6} {name:14}: "
                              + " ".join(f"{e:.2e}" for e in errs), flush=True)
    finally:
        E.GRAPH_ROW_MULTIPLE, KC.USE_PDL, E.SMALL_PATH = saved
        enc.use_graphs = True
    atomic_write_json(os.path.join(out_dir, "varlen_error_probe.json"),
                      {"env": env_info(), "command": "python3 scripts/varlen_error_probe.py OUT_DIR", "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1])
