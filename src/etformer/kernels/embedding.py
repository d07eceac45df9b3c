"""Fused embeddings + LayerNorm: y = LN(word[ids] + pos[positions] (+ type[token_types])) * weight + bias.

One program takes one token: it reads its ids, gathers its rows of the word, position and (when the model has them)
token-type tables, sums them in fp32 and normalises the sum with fp32 statistics, so the summed embeddings never
reach memory. BERT-style encoders otherwise spend three gathers, two adds and a LayerNorm launch on this.

An id outside its table (a token id not below the vocabulary size, a position or token type past its table) is not
read: its row of the output is NaN, so that the engine's finite-output check reports it instead of a wrong row or a
read out of bounds.
"""
from __future__ import annotations

import torch

from ..errors import EtformerError
from ._common import HAS_TRITON, check_tensor, next_pow2, pdl_kwargs, pdl_on, tl, triton, use_triton

if HAS_TRITON:
    from ._common import pdl_enter

INDEX_DTYPES = (torch.int64, torch.int32)


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] in fp32, NaN rows where idx is outside the table."""
    ok = (idx >= 0) & (idx < table.shape[0])
    rows = table[idx.clamp(0, table.shape[0] - 1)].float()
    return torch.where(ok[:, None], rows, torch.full_like(rows, float("nan")))


def embed_layernorm_reference(ids, positions, word, pos_table, weight, bias, eps=1e-12, token_types=None,
                              type_table=None):
    """The same in PyTorch (fp32 sums and statistics, output in the tables' dtype)."""
    h = _rows(word, ids) + _rows(pos_table, positions)
    if type_table is not None:
        tt = token_types if token_types is not None else torch.zeros_like(ids)
        h = h + _rows(type_table, tt)
    y = torch.nn.functional.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(word.dtype)


if HAS_TRITON:

    @triton.jit
    def _gather_row(table_ptr, idx, n_rows, stride, cols, ok):
        """Row idx of a [n_rows, N] table in fp32, and whether idx lies inside it (else row 0 is read instead)."""
        inside = (idx >= 0) & (idx < n_rows)
        v = tl.load(table_ptr + tl.where(inside, idx, 0) * stride + cols, mask=ok, other=0.0).to(tl.float32)
        return v, inside

    @triton.jit
    def _embed_ln_kernel(ids_ptr, pos_ptr, tt_ptr, word_ptr, posw_ptr, type_ptr, w_ptr, b_ptr, y_ptr,
                         N, n_word, n_pos, n_type, s_word, s_pos, s_type, stride_y, eps,
                         BLOCK: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_TT: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        w = tl.load(w_ptr + cols, mask=ok, other=1.0).to(tl.float32)  # parameters: no earlier kernel's output
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        pdl_enter(PDL)  # the ids and positions may come from the gathers of the unpadding before this launch
        h, inside = _gather_row(word_ptr, tl.load(ids_ptr + row).to(tl.int64), n_word, s_word, cols, ok)
        p, p_in = _gather_row(posw_ptr, tl.load(pos_ptr + row).to(tl.int64), n_pos, s_pos, cols, ok)
        h += p
        inside = inside & p_in
        if HAS_TYPE:
            if HAS_TT:
                t = tl.load(tt_ptr + row).to(tl.int64)
            else:
                t = row * 0  # no token types given: type 0 everywhere
            v, t_in = _gather_row(type_ptr, t, n_type, s_type, cols, ok)
            h += v
            inside = inside & t_in
        mean = tl.sum(h, 0) / N
        d = tl.where(ok, h - mean, 0.0)
        var = tl.sum(d * d, 0) / N
        y = d * (1.0 / tl.sqrt(var + eps)) * w + b
        y = tl.where(inside, y, float("nan"))
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def embed_layernorm(ids: torch.Tensor, positions: torch.Tensor, word: torch.Tensor, pos_table: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12, *,
                    token_types: torch.Tensor | None = None, type_table: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """LN(word[ids] + pos_table[positions] (+ type_table[token_types], type 0 without them)) -> [T, d] in the tables'
    dtype. ids, positions, token_types: [T] int64 or int32; the tables [rows, d]; weight, bias: [d]."""
    check_tensor("ids", ids, dims=1, dtypes=INDEX_DTYPES)
    T = ids.shape[0]
    check_tensor("positions", positions, dims=1, dtypes=INDEX_DTYPES, device=ids.device)
    if positions.shape[0] != T:
        raise EtformerError(f"positions has {positions.shape[0]} entries, ids {T}")
    check_tensor("word", word, dims=2, device=ids.device)
    d = word.shape[1]
    named = [("pos_table", pos_table)] + ([("type_table", type_table)] if type_table is not None else [])
    for n, t in named:
        check_tensor(n, t, dims=2, dtypes=(word.dtype,), device=ids.device)
        if t.shape[1] != d:
            raise EtformerError(f"{n} has {t.shape[1]} features, word {d}")
    for n, t in (("weight", weight), ("bias", bias)):
        check_tensor(n, t, dims=1, device=ids.device)
        if t.shape[0] != d:
            raise EtformerError(f"{n} has {t.shape[0]} entries, the tables {d} features")
    if token_types is not None:
        if type_table is None:
            raise EtformerError("token_types given without a type_table")
        check_tensor("token_types", token_types, dims=1, dtypes=INDEX_DTYPES, device=ids.device)
        if token_types.shape[0] != T:
            raise EtformerError(f"token_types has {token_types.shape[0]} entries, ids {T}")
    if not use_triton(word, backend):
        y = embed_layernorm_reference(ids, positions, word, pos_table, weight, bias, eps, token_types, type_table)
        return y if out is None else out.copy_(y)
    if any(t.stride(1) != 1 for t in [word] + [t for _, t in named]):
        raise EtformerError("the embedding tables must have unit stride along features")
    out = torch.empty(T, d, device=word.device, dtype=word.dtype) if out is None else out
    if T == 0:
        return out
    ids, positions = ids.contiguous(), positions.contiguous()  # one index a token, read at row * 1
    token_types = None if token_types is None else token_types.contiguous()
    has_type = type_table is not None
    tt = type_table if has_type else word
    block = next_pow2(d)
    pdl = pdl_on(word)
    _embed_ln_kernel[(T,)](ids, positions, token_types if token_types is not None else ids, word, pos_table, tt,
                           weight, bias, out, d, word.shape[0], pos_table.shape[0], tt.shape[0], word.stride(0),
                           pos_table.stride(0), tt.stride(0), out.stride(0), eps, BLOCK=block, HAS_TYPE=has_type,
                           HAS_TT=token_types is not None, num_warps=4 if block <= 1024 else 8, PDL=pdl,
                           **pdl_kwargs(pdl))
    return out
