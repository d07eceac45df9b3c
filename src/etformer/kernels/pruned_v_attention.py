"""Attention-aware pruned-V attention, for the plan that prunes W_V by whole rows.

A zero row j of W_V makes column j of V equal to its bias b_j for every token, and since each row of softmax
weights sums to one, column j of the attention output is b_j as well. So:

  * V is produced compactly: only the kept columns, packed per head and padded to a common width C (a multiple
    of 16, for the tensor cores);
  * attention runs with a V head dim of C instead of D, on those columns only;
  * the output is scattered back to its place, and each pruned column comes back as the constant b_j it is.

The engine goes one step further (operation reordering): it never scatters. It feeds the compact output straight
into the O projection with W_O's columns gathered to the compact layout, and folds the constant columns into O's
bias (b_O + W_O[:, pruned] @ b_V[pruned]). Both forms are exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EtformerError
from .attention import attention, attention_reference


@dataclass
class CompactV:
    num_heads: int
    head_dim: int
    width: int  # C: compact V columns per head (padded)
    src: torch.Tensor  # long [H*C]: full column of each compact column, -1 for padding
    const_cols: torch.Tensor  # long [P]: pruned full columns
    const_vals: torch.Tensor  # [P]: their constant values (the V bias)

    @classmethod
    def from_weight(cls, w_v: torch.Tensor, b_v: torch.Tensor | None, num_heads: int, multiple: int = 16):
        """Compact layout of a row-pruned W_V [H*D, d_in]. Returns (CompactV, W_vc [H*C, d_in], b_vc [H*C])."""
        out_f = w_v.shape[0]
        if out_f % num_heads:
            raise EtformerError(f"W_V has {out_f} rows, not divisible by {num_heads} heads")
        D = out_f // num_heads
        b_v = torch.zeros(out_f, dtype=w_v.dtype, device=w_v.device) if b_v is None else b_v
        kept = w_v.ne(0).any(1).view(num_heads, D)
        C = max(multiple, -(-int(kept.sum(1).max()) // multiple) * multiple)
        src = torch.full((num_heads, C), -1, dtype=torch.long)
        for h in range(num_heads):
            cols = torch.nonzero(kept[h].cpu()).flatten() + h * D
            src[h, : cols.numel()] = cols
        src = src.flatten().to(w_v.device)
        valid = src >= 0
        w_c = w_v.new_zeros(num_heads * C, w_v.shape[1])
        b_c = b_v.new_zeros(num_heads * C)
        w_c[valid] = w_v[src[valid]]
        b_c[valid] = b_v[src[valid]]
        const_cols = torch.nonzero(~kept.flatten()).flatten().to(w_v.device)
        return cls(num_heads, D, C, src, const_cols, b_v[const_cols].clone()), w_c, b_c

    @property
    def kept_fraction(self) -> float:
        return float((self.src >= 0).sum()) / (self.num_heads * self.head_dim)

    def scatter(self, compact: torch.Tensor) -> torch.Tensor:
        """[T, H*C] -> [T, H*D], pruned columns filled with their constants."""
        T = compact.shape[0]
        full = compact.new_empty(T, self.num_heads * self.head_dim)
        full[:, self.const_cols] = self.const_vals.to(compact.dtype)
        valid = self.src >= 0
        full[:, self.src[valid]] = compact[:, valid]
        return full

    def fold_into_output(self, w_o: torch.Tensor, b_o: torch.Tensor | None):
        """W_O [d, H*D], b_O -> (W_O gathered to the compact layout [d, H*C], b_O plus the constant columns)."""
        valid = self.src >= 0
        w_c = w_o.new_zeros(w_o.shape[0], self.src.numel())
        w_c[:, valid] = w_o[:, self.src[valid]]
        b = torch.zeros(w_o.shape[0], dtype=torch.float64, device=w_o.device) if b_o is None else b_o.double()
        b = b + w_o[:, self.const_cols].double() @ self.const_vals.double()
        return w_c, b.to(w_o.dtype)


def pruned_v_attention_reference(qkv_c, cu_seqlens, cv: CompactV, *, causal=False, key_bias=None):
    H, D = cv.num_heads, cv.head_dim
    compact = attention_reference(qkv_c, cu_seqlens, H, D, v_head_dim=cv.width, causal=causal, key_bias=key_bias)
    return cv.scatter(compact)


def pruned_v_attention(qkv_c: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, cv: CompactV, *,
                       causal: bool = False, key_bias: torch.Tensor | None = None, scatter: bool = True,
                       backend: str = "auto") -> torch.Tensor:
    """qkv_c: [T, 2*H*D + H*C] with Q, K, then the compact V. Returns [T, H*D] (or the compact [T, H*C])."""
    H, D = cv.num_heads, cv.head_dim
    if qkv_c.dim() != 2 or qkv_c.shape[1] != 2 * H * D + H * cv.width:
        raise EtformerError(f"qkv_c must be [T, {2 * H * D + H * cv.width}] (Q, K, compact V), got {tuple(qkv_c.shape)}")
    compact = attention(qkv_c, cu_seqlens, max_seqlen, H, D, v_head_dim=cv.width, causal=causal,
                        key_bias=key_bias, backend=backend)
    return cv.scatter(compact) if scatter else compact
