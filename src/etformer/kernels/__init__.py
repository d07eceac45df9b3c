"""Triton operators, one a file, each with its plain-PyTorch reference. Kernels know nothing of models."""
from .attention import attention, attention_reference
from .attention_proj import attention_proj_partials, attention_proj_reference
from .embedding import embed_layernorm, embed_layernorm_reference
from .fused_ffn import fused_ffn_partials, fused_ffn_reference
from .layernorm import add_layernorm, add_layernorm_reference
from .padded import finish_padded, finish_padded_reference
from .pruned_v_attention import CompactV, pruned_v_attention, pruned_v_attention_reference
from .tile_linear import (DeferredLN, FoldedLinear, fold_layernorm, tile_linear, tile_linear_partials,
                          tile_linear_reference)

__all__ = ["attention", "attention_reference", "attention_proj_partials", "attention_proj_reference",
           "embed_layernorm", "embed_layernorm_reference",
           "fused_ffn_partials", "fused_ffn_reference", "add_layernorm", "add_layernorm_reference", "finish_padded",
           "finish_padded_reference", "CompactV", "DeferredLN", "FoldedLinear", "fold_layernorm", "pruned_v_attention",
           "pruned_v_attention_reference", "tile_linear",
           "tile_linear_partials", "tile_linear_reference"]
