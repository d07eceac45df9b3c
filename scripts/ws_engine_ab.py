"""The warp-specialised Gluon tile kernel in the whole encoder: same-run A/B on the H200.

    python3 scripts/ws_engine_ab.py OUTDIR

BERT-base-shaped encoder (random weights) pruned to 50% tiles (128x64), fixed length 32x128 (4096 tokens), 128x128
and 32x512 (16384): GPU time of the graphed forward with the tile matrices on tile_linear's grid kernel
(WS_MIN_ROWS None), on the warp-specialised kernel from 8192 rows, and from 4096 rows, in alternating rounds;
outputs compared with the first form's. Writes ws_engine_ab.json.
"""
import importlib
import sys

from etformer.bench.timing import env_info
from etformer.sparse.tiles import atomic_write_json
from tile_sub_ab import encoders, engine_ab  # scripts/

T = importlib.import_module("etformer.kernels.tile_linear")


SHIPPED = (T.WS_MIN_ROWS, T.WS_MAX_K, T.WS_WITH_ACTIVATION, T.WS_MIN_ITEMS, T.WS_MAX_ROWS)


def ws_from(rows):
    """Every tile matrix from `rows` rows (None: none), whatever its K, activation and item count."""
    def put():
        T.WS_MIN_ROWS, T.WS_MAX_K, T.WS_WITH_ACTIVATION, T.WS_MIN_ITEMS, T.WS_MAX_ROWS = rows, None, True, 0, None
    return put


if __name__ == "__main__":
    outdir = sys.argv[1]
    forms = {"grid": ws_from(None), "ws_from_8192": ws_from(8192), "ws_from_4096": ws_from(4096)}
    try:
        rows = engine_ab("ws", encoders((0.5,)), ((32, 128), (128, 128), (32, 512)), forms, 100)
    finally:
        T.WS_MIN_ROWS, T.WS_MAX_K, T.WS_WITH_ACTIVATION, T.WS_MIN_ITEMS, T.WS_MAX_ROWS = SHIPPED
    atomic_write_json(f"{outdir}/ws_engine_ab.json", {"env": env_info(), "command": "python3 scripts/ws_engine_ab.py OUTDIR",
                                                      "rows": rows})
