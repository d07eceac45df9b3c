"""torch.nn.TransformerEncoder models for benchmarks, parity runs and tests, built one way everywhere."""
from __future__ import annotations

import torch
from torch import nn

from ..pruning import PruningPlan, apply_plan


def torch_encoder(d: int, heads: int, ffn: int, layers: int, *, act: str = "relu", norm_first: bool = False,
                  batch_first: bool = True, final_norm: bool = False, seed: int = 0,
                  jitter_norms: bool = True) -> nn.TransformerEncoder:
    """A randomly initialised nn.TransformerEncoder (CPU, eval mode, no dropout). jitter_norms draws the LayerNorm
    weights from [0.5, 1.5] and biases from [-0.5, 0.5], so that a swapped or skipped norm shows in a comparison."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, activation=act, batch_first=batch_first,
                                       norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d) if final_norm else None,
                                enable_nested_tensor=False)
    if jitter_norms:
        with torch.no_grad():
            for m in enc.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return enc.eval()


def prune_tiles(enc: nn.Module, tile: tuple[int, int], sparsity: float = 0.5, v_rows: bool = False) -> nn.Module:
    """Zero the smallest tiles of every matrix in place (magnitude, one shot); v_rows: V loses whole rows instead
    (the attention-aware plan, which the engine runs as compact V with W_O folded)."""
    plan = PruningPlan.attention_aware(sparsity, tile) if v_rows else PruningPlan.uniform("tile", sparsity, tile)
    return apply_plan(enc, plan)
