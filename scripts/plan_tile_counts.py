"""Kept tiles a block-row and tile density of each matrix of the BERT-base-shaped bench model (random weights) under
the uniform tile plans the H200 A/Bs use, on the CPU (no GPU needed): what sets a one-wave tile launch's time (its
heaviest block-row) and where each matrix falls in the engine's SPARSE_TIERS.

    PYTHONPATH=src python3 scripts/plan_tile_counts.py [0.5,0.6,0.65,0.7,0.75]

Prints, per sparsity and matrix kind, over the 12 layers: tiles a block-row (min / mean / max) and tile density
(min-max). QKV is the fused [Q; K; V] matrix the engine builds.
"""
import copy
import sys

import torch

from etformer.bench.run import model_shape
from etformer.pruning import PruningPlan, apply_plan
from etformer.pruning.plan import DEFAULT_TILE
from etformer.sparse import TileSparseWeight


def main(sparsities):
    torch.manual_seed(0)
    base = model_shape("bert-base")
    print(f"BERT-base shape (random weights, seed 0), tile {DEFAULT_TILE[0]}x{DEFAULT_TILE[1]}, uniform tile plans")
    for s in sparsities:
        m = apply_plan(copy.deepcopy(base), PruningPlan.uniform("tile", s, DEFAULT_TILE))
        stats: dict = {}
        for layer in m.encoder.layer:
            a = layer.attention
            mats = {"qkv": torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight]),
                    "o": a.output.dense.weight, "ffn_in": layer.intermediate.dense.weight,
                    "ffn_out": layer.output.dense.weight}
            for kind, W in mats.items():
                w = TileSparseWeight.from_dense(W.detach(), DEFAULT_TILE)
                st = stats.setdefault(kind, {"counts": [], "density": []})
                st["counts"].append(w.tiles_per_row.float())
                st["density"].append(w.density)
        for kind, st in stats.items():
            c = torch.cat(st["counts"])
            print(f"{int(s * 100)}% {kind:8s} block-rows {c.numel() // 12:3d}: tiles a block-row min {c.min():.0f} "
                  f"mean {c.mean():.1f} max {c.max():.0f}; density {min(st['density']):.4f}-{max(st['density']):.4f}")


if __name__ == "__main__":
    main([float(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "0.5,0.6,0.65,0.7,0.75").split(",")])
