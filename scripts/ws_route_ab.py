"""Routing the short-K, activation-free tile GEMMs (BERT-base's QKV and output projection) to the warp-specialised
ping-pong kernel at scale (tile_linear.WS_MIN_ROWS, WS_MAX_K, WS_WITH_ACTIVATION): same-run engine A/B on the H200.

    python3 scripts/ws_route_ab.py OUTDIR [--shapes 64x128,128x128] [--sparsities 0.5,0.7]

BERT-base-shaped encoder (random weights) pruned to tiles; GPU time of the graphed forward with every tile GEMM on the
grid kernel, and with QKV and the output projection (K = 768, no activation) on the ping-pong kernel from 8192 and
from 16384 rows; alternating rounds, outputs compared. Writes ws_route_ab.json.
"""
import importlib
import sys

from etformer.bench.timing import env_info
from etformer.sparse.tiles import atomic_write_json
from deferred_ln_ab import _models  # scripts/
from tile_sub_ab import engine_ab  # scripts/

T = importlib.import_module("etformer.kernels.tile_linear")
SHIPPED = (T.WS_MIN_ROWS, T.WS_MAX_K, T.WS_WITH_ACTIVATION, T.WS_MIN_ITEMS, T.WS_MAX_ROWS)


def route(min_rows):
    """QKV and the output projection on the ping-pong kernel from min_rows rows (None: every matrix on the grid
    kernel); no item-count floor."""
    def put():
        T.WS_MIN_ROWS, T.WS_MAX_K, T.WS_WITH_ACTIVATION, T.WS_MIN_ITEMS, T.WS_MAX_ROWS = min_rows, 1024, False, 0, None
    return put


def main(out, shapes, sparsities):
    forms = {"grid": route(None), "ws_from_8192": route(8192), "ws_from_16384": route(16384)}
    try:
        rows = engine_ab("ws_route", {k: enc for k, (_, enc) in _models(sparsities).items()}, shapes, forms, 100)
    finally:
        T.WS_MIN_ROWS, T.WS_MAX_K, T.WS_WITH_ACTIVATION, T.WS_MIN_ITEMS, T.WS_MAX_ROWS = SHIPPED
    atomic_write_json(f"{out}/ws_route_ab.json", {"env": env_info(), "command": "python3 scripts/ws_route_ab.py "
                                                  + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    args = sys.argv[1:]
    shapes = (tuple(tuple(int(v) for v in s.split("x")) for s in args[args.index("--shapes") + 1].split(","))
              if "--shapes" in args else ((64, 128), (128, 128), (16, 512), (32, 512)))
    sparsities = (tuple(float(v) for v in args[args.index("--sparsities") + 1].split(","))
                  if "--sparsities" in args else (0.5, 0.7))
    main(args[0], shapes, sparsities)
