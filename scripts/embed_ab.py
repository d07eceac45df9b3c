"""Same-run A/B of the embeddings in one launch (encoder.FUSED_EMBED, kernels/embedding.py) against three gathers, two
adds and the LayerNorm kernel, on the H200.

BERT-base shape (random weights, fp16), dense and 50% tiles: the GPU time of the graphed forward with the switch on
and off, alternating, two rounds each (tile_sub_ab.engine_ab), at 1x128, 8x128, 32x128, 8x512 and 32x512 (full
lengths, no token types, as the bench calls it); outputs compared between the forms.

    python3 scripts/embed_ab.py OUT_DIR
"""
import importlib
import os
import sys

from etformer.bench.timing import env_info
from etformer.sparse.tiles import atomic_write_json
from tile_sub_ab import bert_encoders, engine_ab  # scripts/

E = importlib.import_module("etformer.engine.encoder")
SHAPES = ((1, 128), (8, 128), (32, 128), (8, 512), (32, 512))


def fused(on):
    def put():
        E.FUSED_EMBED = on
    return put


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    encs = bert_encoders()
    shipped = E.FUSED_EMBED
    try:
        rows = engine_ab("embed", encs, SHAPES, {"fused": fused(True), "separate": fused(False)}, 100)
    finally:
        E.FUSED_EMBED = shipped
    atomic_write_json(os.path.join(out_dir, "embed_ab.json"),
                      {"env": env_info(), "command": "python3 scripts/embed_ab.py " + " ".join(sys.argv[1:]),
                       "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
