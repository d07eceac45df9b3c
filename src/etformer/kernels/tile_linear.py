"""Tile-sparse linear: Y = X W^T + b over a TileSparseWeight, with fused GELU / residual / column-slice output.

Each program owns a (BLOCK_M x BN) block of Y, where BN is the tile's output side: one block-row of W. It loops
only over that block-row's kept tiles (row_ptr[r] .. row_ptr[r+1]), loading each (BN x BK) tile contiguously and
the matching (BLOCK_M x BK) slab of X, and accumulates with tl.dot on the tensor cores in fp32. The epilogue adds
the bias, applies exact-erf GELU, adds a residual, and stores into columns [out_col, out_col + N) of a possibly
wider output (so Q, K and V land in one [tokens, 3d] buffer).

TMA: on sm_90 (and in the interpreter) X and the tile values are read through tensor descriptors, so each K step is
two bulk copies into shared memory that the compiler pipelines under the wgmma; elsewhere the loads are pointer gathers.

Work balance: block-rows are launched heaviest first (an LPT order, computed once per weight and cached), so the
block-rows with most tiles start early and light ones fill the tail; block-rows with no tile only write the
epilogue (bias, residual).
"""
from __future__ import annotations

import functools
import heapq
from typing import NamedTuple

import torch

from ..errors import EtformerError
from ..sparse.tiles import TileSparseWeight
from ._common import (HAS_TRITON, TensorDescriptor, capability, check_tensor, interpreting, pdl_kwargs, pdl_on,
                      switch_module, tl, triton, use_triton)

if HAS_TRITON:
    from ._common import pdl_enter, prefetch_l2


# ----------------------------------------------------------------------------- reference
ACTIVATIONS = {None: 0, "none": 0, "gelu": 1, "relu": 2}
# How the kernels evaluate GELU's erf: "poly" (Abramowitz & Stegun 7.1.26: one reciprocal, one exp2 and 13 FP32
# instructions an element; |error| <= 1.5e-7 on erf, at most 3.3e-7 on GELU in fp32 over [-12, 12], where torch's
# fp32 GELU is 3.7e-7 off: benchmarks/results/cpu/gelu_error.txt) or "libdevice" (tl.erf, ~32 SASS instructions an
# element with its branches: benchmarks/results/cpu/sm90_tile_stats.txt). Both are the erf form, not the tanh
# approximation. Same-run A/B: benchmarks/results/h200/gelu_epilogue/.
GELU_ERF = "poly"


def _activation_id(activation) -> int:
    """ACTIVATIONS[activation] (0 none, 1 GELU, 2 ReLU), or a clear error."""
    if activation not in ACTIVATIONS:
        raise EtformerError(f"activation must be one of gelu, relu or none, not {activation!r}")
    return ACTIVATIONS[activation]


def _act_code(activation, x: torch.Tensor | None = None) -> int:
    """The kernels' ACT code for an activation name: 0 none, 1 GELU (libdevice erf), 2 ReLU, 3 GELU (polynomial
    erf, reciprocal and exp2 by the approximate ftz instructions: a GPU), 4 GELU (the same polynomial in portable
    operations: the interpreter, x on the CPU). GELU_ERF picks the erf."""
    code = _activation_id(activation)
    if code != 1 or GELU_ERF == "libdevice":
        return code
    if GELU_ERF != "poly":
        raise EtformerError(f"GELU_ERF must be 'poly' or 'libdevice', not {GELU_ERF!r}")
    return 3 if x is not None and x.is_cuda else 4


def apply_activation(y: torch.Tensor, activation) -> torch.Tensor:
    code = _activation_id(activation)
    return torch.nn.functional.gelu(y) if code == 1 else (torch.relu(y) if code == 2 else y)


class DeferredLN(NamedTuple):
    """A LayerNorm not yet applied to a matrix X [M, d]: LN(X) = (X - mean) / sqrt(var + eps) * weight + bias, with
    each row's mean and variance from stats [M, P, 2] fp32, its sum and sum of squares over P column blocks (what
    tile_linear(..., row_stats=True) returns beside X). weight and bias (gamma, beta) are needed where the normalised
    values themselves are used (a residual); an input folded into the next weight (fold_layernorm) carries them there."""

    stats: torch.Tensor
    d: int
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


class FoldedLinear(NamedTuple):
    """LN(X) W^T + b as a linear of the un-normalised X (fold_layernorm): weight = W diag(gamma), colsum = weight's row
    sums (fp32, of the stored values), bias = W beta + b (fp32)."""

    weight: object  # TileSparseWeight or dense [N, K]
    colsum: torch.Tensor
    bias: torch.Tensor


def _moments(n: DeferredLN):
    s = n.stats.float().sum(1)
    mean = s[:, 0] / n.d
    var = (s[:, 1] / n.d - mean * mean).clamp_min(0)
    return mean[:, None], torch.rsqrt(var + n.eps)[:, None]


def deferred_ln_reference(x: torch.Tensor, n: DeferredLN) -> torch.Tensor:
    """LN(x) in fp32 from the deferred moments (weight and bias applied when present)."""
    mean, rstd = _moments(n)
    h = (x.float() - mean) * rstd
    if n.weight is not None:
        h = h * n.weight.float() + n.bias.float()
    return h


def row_stats_reference(y: torch.Tensor) -> torch.Tensor:
    """[M, 1, 2]: each row's sum and sum of squares of y, in fp32."""
    y = y.float()
    return torch.stack([y.sum(1), (y * y).sum(1)], 1)[:, None, :]


def tile_linear_reference(x, w, bias=None, activation=None, residual=None, x_norm=None, x_colsum=None,
                          residual_norm=None):
    """fp32 math on the dense form of w (a TileSparseWeight or a dense tensor); returns x.dtype.
    x_norm (with x_colsum): w is folded (fold_layernorm) and x un-normalised: Y = rstd (X W^T - mean colsum) + bias.
    residual_norm: the residual is normalised first (deferred_ln_reference)."""
    y = x.float() @ _dense_of(w).float().t()
    if x_norm is not None:
        mean, rstd = _moments(x_norm)
        y = (y - mean * x_colsum.float()[None, :]) * rstd
    if bias is not None:
        y = y + bias.float()
    y = apply_activation(y, activation)
    if residual is not None:
        y = y + (residual.float() if residual_norm is None else deferred_ln_reference(residual, residual_norm))
    return y.to(x.dtype)


def fold_layernorm(w, bias: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor) -> FoldedLinear:
    """Fold a LayerNorm that precedes a linear into it: LN(X) W^T + b = rstd (X W'^T - mean W' 1) + W beta + b with
    W' = W diag(gamma). w: a TileSparseWeight (its tile pattern is kept: scaling columns keeps zero tiles zero) or a
    dense [N, K] tensor. The column sums are taken from W' as stored, so the mean cancels exactly against the GEMM."""
    dense = _dense_of(w)
    K = dense.shape[1]
    for name, t in (("gamma", gamma), ("beta", beta)):
        check_tensor(name, t, dims=1, device=dense.device)
        if t.shape[0] != K:
            raise EtformerError(f"{name} has {t.shape[0]} entries, the weight has {K} input features")
    if isinstance(w, TileSparseWeight):  # scale each stored tile by its columns' gamma: the same tiles, kept or not
        bk = w.tile[1]
        g = torch.zeros(w.n_block_cols * bk, device=w.device, dtype=torch.float32)
        g[:K] = gamma.float()
        scale = g.view(-1, bk)[w.col_idx.long()][:, None, :]
        folded = TileSparseWeight(w.out_features, K, w.tile, w.row_ptr, w.col_idx,
                                  (w.values.float() * scale).to(w.dtype).contiguous())
        scaled = folded.to_dense()
    else:
        scaled = (dense.float() * gamma.float()[None, :]).to(dense.dtype)
        folded = scaled
    c = dense.float() @ beta.float()
    if bias is not None:
        c = c + bias.float()
    return FoldedLinear(folded, scaled.float().sum(1), c)


# ----------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @triton.jit
    def _gelu_poly(x, FAST: tl.constexpr):
        """GELU(x) = x Phi(x), erf by Abramowitz & Stegun 7.1.26. With a = |x| and t = 1/(1 + p a/sqrt(2)),
        q = erfc(a/sqrt(2))/2 = (a1 t + ... + a5 t^5) exp(-a^2/2)/2 (coefficients halved), and x Phi(x) is x - a q
        for x >= 0 and -a q below, i.e. max(x, 0) - a q. a is capped below inf so that GELU(+-inf) = inf, 0.
        FAST: reciprocal and exp2 by rcp.approx.ftz / ex2.approx.ftz (one MUFU op each, no denormal fix-ups)."""
        a = tl.minimum(tl.abs(x), 3.0e38)
        d = 1.0 + 0.23164190 * a
        g = x * (x * -0.7213475204444817)  # log2 of exp(-x^2 / 2)
        if FAST:
            t = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32,
                                          is_pure=True, pack=1)
            e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [g], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            t = 1.0 / d
            e = tl.exp2(g)
        p = ((((0.5307027145 * t - 0.7265760135) * t + 0.7107068705) * t - 0.142248368) * t + 0.127414796) * t
        return tl.maximum(x, 0.0) - a * (p * e)

    @triton.jit
    def _activate(acc, ACT: tl.constexpr):
        if ACT == 1:  # GELU, exact erf form as in BERT (libdevice erf)
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        elif ACT == 2:  # ReLU
            acc = tl.maximum(acc, 0.0)
        elif ACT == 3:  # GELU, erf form, polynomial erf (GPU)
            acc = _gelu_poly(acc, True)
        elif ACT == 4:  # the same, portable operations (interpreter)
            acc = _gelu_poly(acc, False)
        return acc

    @triton.jit
    def _prefetch_w(w_ptr, lo, hi, w_row, N, K, BN: tl.constexpr, BK: tl.constexpr, DENSE_W: tl.constexpr,
                    LINE: tl.constexpr, SUB: tl.constexpr):
        """L2 prefetch of the weights one program reads: K blocks lo..hi of rows w_row..w_row+BN of a dense W [N, K],
        or rows w_row..w_row+BN of the tiles lo..hi (each tile BN * SUB rows, contiguous). LINE elements apart, one
        hint per 128-byte line; nothing waits for them."""
        if DENSE_W:
            rows = tl.minimum(w_row + tl.arange(0, BN), N - 1).to(tl.int64)
            offs = tl.arange(0, BK // LINE) * LINE
            for t in range(lo, hi):
                cols = tl.minimum(t * BK + offs, K - 1)
                prefetch_l2(w_ptr + rows[:, None] * K + cols[None, :])
        else:
            offs = tl.arange(0, (BN * BK) // LINE).to(tl.int64) * LINE
            for t in range(lo, hi):
                prefetch_l2(w_ptr + t.to(tl.int64) * (BN * SUB * BK) + w_row * BK + offs)

    @triton.jit
    def _operands(x_src, w_src, row0, offs_m, m_mask, offs_k, tile_offs, rows_w, t, kc, K, N, stride_xm, w_row,
                  BN: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr, DENSE_W: tl.constexpr,
                  X_CACHE: tl.constexpr, SUB: tl.constexpr):
        """One K step's X block (K block kc) and W block (K block kc of a dense W, or tile t)."""
        if TMA:
            xa = x_src.load([row0, kc * BK])
            if DENSE_W:
                wt = w_src.load([w_row, kc * BK])
            else:
                wt = w_src.load([t * (BN * SUB) + w_row, 0])
        else:
            kk = kc * BK + offs_k
            xa = tl.load(x_src + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :],
                         mask=m_mask[:, None] & (kk[None, :] < K), other=0.0, cache_modifier=X_CACHE)
            if DENSE_W:
                wt = tl.load(w_src + rows_w[:, None].to(tl.int64) * K + kk[None, :],
                             mask=(rows_w[:, None] < N) & (kk[None, :] < K), other=0.0)
            else:
                wt = tl.load(w_src + t.to(tl.int64) * (BN * SUB * BK) + tile_offs)
        return xa, wt

    @triton.jit
    def _mma(acc, xa, wt, FP32_DOT: tl.constexpr):
        if FP32_DOT:
            acc += tl.dot(xa, tl.trans(wt), input_precision="ieee")
        else:
            acc += tl.dot(xa, tl.trans(wt))
        return acc

    @triton.jit
    def _tile_dot(x_src, w_src, w_ptr, row0, M, stride_xm, col_idx, lo, hi, K, w_row, N,
                  BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP32_DOT: tl.constexpr,
                  TMA: tl.constexpr, DENSE_W: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                  LINE: tl.constexpr, X_CACHE: tl.constexpr, SUB: tl.constexpr, PAIR: tl.constexpr):
        """X[row0 : row0+BLOCK_M, tiles lo..hi) . W_tiles^T in fp32: the K loop over one block-row's kept tiles.

        First the weights (no earlier kernel's output) are prefetched to L2 from w_ptr, the raw values: by every
        program (PREFETCH 2) or the first row block's (1); then, under PDL, the wait for the previous kernel.

        TMA: x_src and w_src are tensor descriptors (X as [M, K], the tile values as [nnz*BN, BK]); each step is two
        bulk copies into shared memory, software-pipelined by the compiler. Otherwise they are the X and tile-value
        pointers, and the loads are pointer gathers.
        DENSE_W: w_src is a plain dense W [N, K] (descriptor or pointer) and lo..hi count K blocks of rows
        w_row .. w_row+BN: the small-batch path, which needs no tile copy of a dense matrix.
        Otherwise each stored tile is BN * SUB rows high and the program reads rows w_row .. w_row+BN of each (SUB > 1:
        a tile's output rows are split over SUB programs, for more programs at few rows of X).
        X_CACHE: the pointer loads' cache modifier for X (".cg" where X was written by the same launch).
        PAIR: two tiles a loop trip (tiles only)."""
        if PREFETCH == 2 or (PREFETCH == 1 and row0 == 0):
            _prefetch_w(w_ptr, lo, hi, w_row, N, K, BN, BK, DENSE_W, LINE, SUB)
        pdl_enter(PDL)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BK)
        m_mask = offs_m < M
        tile_offs = (w_row + tl.arange(0, BN))[:, None] * BK + offs_k[None, :]  # (BN, BK): rows of one tile
        rows_w = w_row + tl.arange(0, BN)
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        if PAIR and not DENSE_W:
            # two kept tiles a trip: half the loop's dependent steps where a short loop is latency-bound. An odd
            # block-row's last trip repeats its last tile with X read from past column K (zeros: TMA fills boxes out
            # of bounds with zeros, the pointer loads mask them), so it adds nothing.
            for i in range(0, (hi - lo + 1) // 2):
                t0 = lo + 2 * i
                t1 = tl.minimum(t0 + 1, hi - 1)
                kc0 = tl.load(col_idx + t0)
                kc1 = tl.where(t0 + 1 < hi, tl.load(col_idx + t1), tl.cdiv(K, BK))
                xa0, wt0 = _operands(x_src, w_src, row0, offs_m, m_mask, offs_k, tile_offs, rows_w, t0, kc0, K, N,
                                     stride_xm, w_row, BN, BK, TMA, False, X_CACHE, SUB)
                xa1, wt1 = _operands(x_src, w_src, row0, offs_m, m_mask, offs_k, tile_offs, rows_w, t1, kc1, K, N,
                                     stride_xm, w_row, BN, BK, TMA, False, X_CACHE, SUB)
                acc = _mma(acc, xa0, wt0, FP32_DOT)
                acc = _mma(acc, xa1, wt1, FP32_DOT)
        else:
            for i in range(0, hi - lo):
                t = lo + i
                if DENSE_W:
                    kc = t
                else:
                    kc = tl.load(col_idx + t)
                xa, wt = _operands(x_src, w_src, row0, offs_m, m_mask, offs_k, tile_offs, rows_w, t, kc, K, N,
                                   stride_xm, w_row, BN, BK, TMA, DENSE_W, X_CACHE, SUB)
                acc = _mma(acc, xa, wt, FP32_DOT)
        return acc

    @triton.jit
    def _row_moments(stats_ptr, offs_m, m_mask, inv_d, eps, P: tl.constexpr):
        """Mean and 1/sqrt(var + eps) of rows offs_m from their P partial (sum, sum of squares) pairs, stats
        [M, P, 2] fp32 (tile_linear's row_stats). P is a compile-time count: the loads unroll and issue together."""
        base = stats_ptr + offs_m.to(tl.int64) * (2 * P)
        s = tl.load(base, mask=m_mask, other=0.0)
        q = tl.load(base + 1, mask=m_mask, other=0.0)
        for p in tl.static_range(1, P):
            s += tl.load(base + 2 * p, mask=m_mask, other=0.0)
            q += tl.load(base + 2 * p + 1, mask=m_mask, other=0.0)
        mean = s * inv_d
        var = tl.maximum(q * inv_d - mean * mean, 0.0)
        return mean, tl.rsqrt(var + eps)

    @triton.jit
    def _epilogue(acc, row0, col0, M, N, bias_ptr, res_ptr, y_ptr, y_desc, stride_ym, stride_rm, out_col,
                  xs_ptr, colsum_ptr, rs_ptr, rg_ptr, rb_ptr, so_ptr, x_inv_d, x_eps, r_inv_d, r_eps, r_desc,
                  BLOCK_M: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                  HAS_RES: tl.constexpr, TMA_STORE: tl.constexpr, XS_P: tl.constexpr = 0, RS_P: tl.constexpr = 0,
                  SO_P: tl.constexpr = 0, RES_TMA: tl.constexpr = False):
        """The (BLOCK_M x BN) block of Y at (row0, col0): + bias, activation, + residual, store (into the column
        slice at out_col; through the descriptor y_desc when TMA_STORE).

        Deferred LayerNorm (XS_P, RS_P, SO_P: partial-stat counts, 0 = off):
        XS_P: X is the un-normalised input of a LayerNorm folded into W (W' = W diag(gamma)); with its row moments
        from xs_ptr and colsum = W' 1, acc becomes rstd (acc - mean colsum), so bias_ptr carries W beta + b.
        RS_P: the residual is un-normalised too; it is normalised on load (moments from rs_ptr, gamma rg_ptr, beta rb_ptr).
        SO_P: each row's sum and sum of squares over this block's stored (rounded) values go to so_ptr [M, SO_P, 2]
        at this block's column index, for the next consumer's moments.
        RES_TMA: the residual block comes through the descriptor r_desc (a bulk copy into shared memory), so the
        epilogue stays in the accumulator's register layout. A pointer load is coalesced along the row: the compiler
        then moves the accumulator into a layout where every thread holds one column of all the block's rows, and each
        per-row value (the moments, the row sums) is computed by every thread. sm_90 compile
        (benchmarks/results/cpu/sm90_tile_stats.txt, Triton 3.6): the deferred-LayerNorm residual epilogue at 64-row
        blocks 255 registers, 1980 bytes spilled, 31 FP32 instructions an output element with the pointer load; 168
        registers, no spills, 6.6 with the descriptor; the plain residual at 128-row blocks 255 registers and 66 bytes
        spilled against 157 and none."""
        offs_m = row0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        cols = col0 + tl.arange(0, BN)
        n_mask = cols < N
        if XS_P > 0:
            mean, rstd = _row_moments(xs_ptr, offs_m, m_mask, x_inv_d, x_eps, XS_P)
            cs = tl.load(colsum_ptr + cols, mask=n_mask, other=0.0)
            acc = (acc - mean[:, None] * cs[None, :]) * rstd[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc = _activate(acc, ACT)
        mask = m_mask[:, None] & n_mask[None, :]
        if HAS_RES:
            if RES_TMA:
                res = r_desc.load([row0, col0]).to(tl.float32)
            else:
                res = tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + cols[None, :], mask=mask,
                              other=0.0).to(tl.float32)
            if RS_P > 0:
                r_mean, r_rstd = _row_moments(rs_ptr, offs_m, m_mask, r_inv_d, r_eps, RS_P)
                g = tl.load(rg_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
                b = tl.load(rb_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
                res = (res * r_rstd[:, None] - r_mean[:, None] * r_rstd[:, None]) * g[None, :] + b[None, :]
            acc += res
        if TMA_STORE:
            yv = acc.to(y_desc.dtype)
        else:
            yv = acc.to(y_ptr.dtype.element_ty)
        if SO_P > 0:  # rows past M are never stored; columns past N hold zeros (zero tiles, bias and residual)
            v = yv.to(tl.float32)
            so = so_ptr + offs_m.to(tl.int64) * (2 * SO_P) + 2 * (col0 // BN)
            tl.store(so, tl.sum(v, 1), mask=m_mask)
            tl.store(so + 1, tl.sum(v * v, 1), mask=m_mask)
        if TMA_STORE:  # bulk copy out of shared memory; rows and columns past the edge are clipped
            y_desc.store([row0, col0], yv)
        else:
            y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + out_col + cols[None, :]
            tl.store(y, yv, mask=mask)

    @triton.jit
    def _grid_item(pid, M, N, K, order_ptr, row_ptr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
                   GROUP_M: tl.constexpr, DENSE_W: tl.constexpr, SUB: tl.constexpr):
        """Program pid's work in the grid kernel: (row block pid_m, its tiles lo..hi, the row w_row of W or of each
        tile it reads, its first output column col0). Grouped order: GROUP_M row blocks of X sweep the (sorted)
        block-rows together, for L2 reuse of X. DENSE_W: every K block. SUB: programs per block-row of tiles, each
        BN of its BN * SUB rows."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_r = tl.cdiv(N, BN)
        width = GROUP_M * num_r
        group = pid // width
        first_m = group * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        b = (pid % width) // gsize
        if DENSE_W:
            lo = 0
            hi = tl.cdiv(K, BK)
            w_row = b * BN
            col0 = b * BN
        else:
            r = tl.load(order_ptr + b // SUB)
            lo = tl.load(row_ptr + r)
            hi = tl.load(row_ptr + r + 1)
            w_row = (b % SUB) * BN
            col0 = r * (BN * SUB) + w_row
        return pid_m, lo, hi, w_row, col0

    @triton.jit
    def _tile_linear_kernel(
        x_src, w_src, w_ptr, row_ptr, col_idx, order_ptr, bias_ptr, res_ptr, y_ptr, y_desc,
        M, N, K,
        stride_xm, stride_ym, stride_rm, out_col,
        xs_ptr, colsum_ptr, rs_ptr, rg_ptr, rb_ptr, so_ptr, x_inv_d, x_eps, r_inv_d, r_eps, r_desc,
        BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, FP32_DOT: tl.constexpr,
        TMA: tl.constexpr, TMA_STORE: tl.constexpr, DENSE_W: tl.constexpr,
        PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64,
        BIAS_EARLY: tl.constexpr = True, SUB: tl.constexpr = 1, PAIR: tl.constexpr = False,
        XS_P: tl.constexpr = 0, RS_P: tl.constexpr = 0, SO_P: tl.constexpr = 0, RES_TMA: tl.constexpr = False,
    ):
        pid_m, lo, hi, w_row, col0 = _grid_item(tl.program_id(0), M, N, K, order_ptr, row_ptr, BN, BK, BLOCK_M,
                                                GROUP_M, DENSE_W, SUB)
        # The small-batch path (DENSE_W) fetches the bias, a parameter and no kernel's output, before the PDL wait and
        # the K loop: its kernels are latency-bound chains (small_latency_bias.json: 258.0 -> 243.6 us at B=1, S=32,
        # 369.7 -> 357.2 at 1 x 256). The tile kernels keep the load in the epilogue: a later kernels run had the
        # short-loop, low-density shapes 7-17% slower with it there (kernels_bias_early/), not measured side by side.
        # BIAS_EARLY=False reads it in the epilogue in every form (the earlier kernel, for scripts/small_latency_ab.py).
        # A folded LayerNorm (XS_P) scales the product before its bias is added: there the bias waits for the epilogue.
        if HAS_BIAS and DENSE_W and BIAS_EARLY and XS_P == 0:
            bcols = col0 + tl.arange(0, BN)
            bias = tl.load(bias_ptr + bcols, mask=bcols < N, other=0.0).to(tl.float32)
        acc = _tile_dot(x_src, w_src, w_ptr, pid_m * BLOCK_M, M, stride_xm, col_idx, lo, hi, K, w_row, N,
                        BLOCK_M, BN, BK, FP32_DOT, TMA, DENSE_W, PDL, PREFETCH, LINE, "", SUB, PAIR)
        if HAS_BIAS and DENSE_W and BIAS_EARLY and XS_P == 0:
            acc += bias[None, :]
        _epilogue(acc, pid_m * BLOCK_M, col0, M, N, bias_ptr, res_ptr, y_ptr, y_desc, stride_ym, stride_rm, out_col,
                  xs_ptr, colsum_ptr, rs_ptr, rg_ptr, rb_ptr, so_ptr, x_inv_d, x_eps, r_inv_d, r_eps, r_desc,
                  BLOCK_M, BN, HAS_BIAS and not (DENSE_W and BIAS_EARLY and XS_P == 0), ACT, HAS_RES, TMA_STORE, XS_P,
                  RS_P, SO_P, RES_TMA)


    @triton.jit
    def _tile_linear_splitk_kernel(
        x_src, w_src, w_ptr, row_ptr, col_idx, ws_ptr, M, N, K, stride_xm, SPLIT,
        BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr,
        DENSE_W: tl.constexpr, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64,
        SUB: tl.constexpr = 1, PAIR: tl.constexpr = False,
    ):
        """Small-M path: each (row block, block-row) is split over SPLIT programs along its kept tiles; fp32
        partial sums go to a workspace [SPLIT, M, N] that _splitk_epilogue_kernel (or add_layernorm) reduces."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        b = pid // num_m
        if DENSE_W:
            start = 0
            end = tl.cdiv(K, BK)
            w_row = b * BN
        else:
            start = tl.load(row_ptr + b // SUB)
            end = tl.load(row_ptr + b // SUB + 1)
            w_row = (b % SUB) * BN
        chunk = tl.cdiv(end - start, SPLIT)
        lo = start + s * chunk
        hi = tl.minimum(end, lo + chunk)
        acc = _tile_dot(x_src, w_src, w_ptr, pid_m * BLOCK_M, M, stride_xm, col_idx, lo, hi, K, w_row, N,
                        BLOCK_M, BN, BK, FP32_DOT, TMA, DENSE_W, PDL, PREFETCH, LINE, "", SUB, PAIR)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = b * BN + tl.arange(0, BN)
        ws = ws_ptr + s.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(ws, acc, mask=(offs_m[:, None] < M) & (cols[None, :] < N))

    @triton.jit
    def _tile_linear_flat_kernel(
        x_src, w_src, step_ptr, steps, ends, items_ptr, bias_ptr, res_ptr, y_ptr, y_desc,
        M, N, K, stride_xm, stride_ym, stride_rm, out_col, num_r,
        BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
        HAS_RES: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr, TMA_STORE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """Persistent, flattened: program p runs K steps step_ptr[p] .. step_ptr[p+1] of a host-built step list as ONE
        loop. Step s is three int32s at steps + 3s: the work item (row block m, block-row r) coded m * num_r + r, or
        ~code on the item's last step; the tile's index t in the values; its K block. No step depends on the one
        before, so the software pipeline runs across item boundaries: the next item's first tiles are in flight while
        the current one finishes and writes its epilogue, where a program per item pays a pipeline fill and drain for
        each (a block-row of a 50%-sparse BERT-base matrix is 6-24 K steps). Then the program's items without a kept
        tile, items_ptr[ends[p] .. ends[p+1]], get the epilogue alone."""
        pid = tl.program_id(0)
        s0 = tl.load(step_ptr + pid)
        s1 = tl.load(step_ptr + pid + 1)
        pdl_enter(PDL)
        offs_k = tl.arange(0, BK)
        tile_offs = tl.arange(0, BN)[:, None] * BK + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        for s in range(s0, s1):
            code = tl.load(steps + 3 * s)
            t = tl.load(steps + 3 * s + 1)
            kc = tl.load(steps + 3 * s + 2)
            last = code < 0
            code = tl.where(last, -1 - code, code)
            row0 = (code // num_r) * BLOCK_M
            if TMA:
                xa = x_src.load([row0, kc * BK])
                wt = w_src.load([t * BN, 0])
            else:
                offs_m = row0 + tl.arange(0, BLOCK_M)
                kk = kc * BK + offs_k
                xa = tl.load(x_src + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :],
                             mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
                wt = tl.load(w_src + t.to(tl.int64) * (BN * BK) + tile_offs)
            if FP32_DOT:
                acc = tl.dot(xa, tl.trans(wt), acc, input_precision="ieee")
            else:
                acc = tl.dot(xa, tl.trans(wt), acc)
            if last:  # the item's last tile: its epilogue, then a fresh accumulator
                _epilogue(acc, row0, (code % num_r) * BN, M, N, bias_ptr, res_ptr, y_ptr, y_desc, stride_ym,
                          stride_rm, out_col, y_ptr, y_ptr, y_ptr, y_ptr, y_ptr, y_ptr, 1.0, 1.0, 1.0, 1.0, y_ptr,
                          BLOCK_M, BN, HAS_BIAS, ACT, HAS_RES, TMA_STORE)
                acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        for e in range(tl.load(ends + pid), tl.load(ends + pid + 1)):  # block-rows without a kept tile
            code = tl.load(items_ptr + e)
            _epilogue(tl.zeros((BLOCK_M, BN), dtype=tl.float32), (code // num_r) * BLOCK_M, (code % num_r) * BN,
                      M, N, bias_ptr, res_ptr, y_ptr, y_desc, stride_ym, stride_rm, out_col,
                      y_ptr, y_ptr, y_ptr, y_ptr, y_ptr, y_ptr, 1.0, 1.0, 1.0, 1.0, y_ptr,
                      BLOCK_M, BN, HAS_BIAS, ACT, HAS_RES, TMA_STORE)

    @triton.jit
    def _splitk_epilogue_kernel(
        ws_ptr, bias_ptr, res_ptr, y_ptr, M, N, stride_ym, stride_rm, out_col,
        SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
        HAS_RES: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """Y = sum of the SPLIT partial sums (+ bias, activation, + residual). SPLIT is a compile-time constant, so
        the partial loads unroll and are all issued before the first add (as add_layernorm's are)."""
        pdl_enter(PDL)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (cols[None, :] < N)
        base = ws_ptr + offs_m[:, None].to(tl.int64) * N + cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            acc += tl.load(base + s * M * N, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        acc = _activate(acc, ACT)
        if HAS_RES:
            acc += tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + out_col + cols[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher
_ORDER_CACHE: dict = {}


def _row_order(w: TileSparseWeight) -> torch.Tensor:
    """Block-rows heaviest first (stable), cached per weight."""
    key = (id(w.row_ptr), w.row_ptr.data_ptr(), w.nnz_tiles)
    hit = _ORDER_CACHE.get(key)
    if hit is None or hit[0] is not w.row_ptr:
        order = torch.argsort(-w.tiles_per_row, stable=True).to(torch.int32).to(w.device)
        hit = (w.row_ptr, order)
        if len(_ORDER_CACHE) > 4096:
            _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = hit
    return hit[1]


_FLAT_CACHE: dict = {}


def _flat_schedule(w: TileSparseWeight, M: int, block_m: int, programs: int, group_m: int = 8):
    """The persistent kernel's work: (step_ptr [P+1], steps [S, 3], ends [P+1], empty items) as int32 on w's device,
    and the program count P.

    Work items (row block m, block-row r), coded m * num_r + r, are ordered as the grid kernel's programs are (groups
    of group_m row blocks sweep the block-rows, heaviest first, for L2 reuse of X) and dealt in that order, each to
    the program with the fewest K steps so far: programs' step counts then differ by at most one item's, and the
    items in flight at any time sit close together in that order. Each program's items become its run of steps (see
    _tile_linear_flat_kernel); items without a tile are dealt round-robin to an epilogue-only list. Cached per
    weight, M and launch; the first call for a shape must not be inside a CUDA graph capture (it copies to the
    device)."""
    key = (id(w.row_ptr), w.row_ptr.data_ptr(), w.nnz_tiles, M, block_m, programs, group_m)
    hit = _FLAT_CACHE.get(key)
    if hit is not None and hit[0] is w.row_ptr:
        return hit[1]
    import numpy as np

    counts = w.tiles_per_row.numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    col_idx = w.col_idx.cpu().numpy().astype(np.int64)
    num_r, num_m = counts.shape[0], -(-M // block_m)
    order_r = np.argsort(-counts, kind="stable")
    items = np.concatenate([(np.arange(g, min(g + group_m, num_m))[None, :] * num_r + order_r[:, None]).ravel()
                            for g in range(0, num_m, group_m)])
    c = counts[items % num_r]
    full, empty = items[c > 0], items[c == 0]
    P = max(1, min(programs, full.size or empty.size))
    load = [(0, p) for p in range(P)]  # greedy list scheduling: each item to the least-loaded program so far
    prog = np.empty(full.size, np.int64)
    full_steps = counts[full % num_r]
    for i, n in enumerate(full_steps.tolist()):
        steps_so_far, p = load[0]
        prog[i] = p
        heapq.heapreplace(load, (steps_so_far + n, p))
    full = full[np.argsort(prog, kind="stable")]  # program by program, each in dealing order
    n = counts[full % num_r]
    first = np.repeat(np.cumsum(n) - n, n)  # step index where each step's item begins
    k = np.arange(int(n.sum())) - first
    code = np.repeat(full, n)
    t = starts[code % num_r] + k
    code = np.where(k == np.repeat(n, n) - 1, -1 - code, code)
    steps = np.stack([code, t, col_idx[t] if t.size else t], axis=1)
    step_ptr = np.zeros(P + 1, np.int64)
    np.cumsum(np.bincount(prog, weights=full_steps, minlength=P), out=step_ptr[1:])
    ends = np.zeros(P + 1, np.int64)
    np.cumsum(np.bincount(np.arange(empty.size) % P, minlength=P), out=ends[1:])
    empty = empty[np.argsort(np.arange(empty.size) % P, kind="stable")]
    dev = w.row_ptr.device

    def put(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(dev)

    out = (put(step_ptr), put(steps if steps.size else np.zeros((1, 3))), put(ends),
           put(empty if empty.size else np.zeros(1)), P)
    if len(_FLAT_CACHE) > 256:  # step lists grow with M; keep at most a few hundred shapes' worth
        _FLAT_CACHE.clear()
    _FLAT_CACHE[key] = (w.row_ptr, out)
    return out


# Tuned launch parameters, keyed by (tile, M bucket): (BLOCK_M, num_warps, num_stages). Swept on the H200 over
# BERT-base shapes (d=768, FFN 3072) at densities 1, 0.5 and 0.25 (scripts/tune.py; benchmarks/results/h200/tune.json),
# most frequent winner per key. Other keys fall back to the heuristic in _launch_params.
# With TMA the compiler puts the col_idx load in the first pipeline stage, so num_stages s gives s - 2 copy buffers.
TUNED_TMA: dict[tuple, tuple[int, int, int]] = {
    ((64, 64), 128): (64, 4, 5), ((64, 64), 4096): (128, 4, 5), ((64, 64), 16384): (128, 4, 5),
    ((128, 64), 128): (64, 4, 5), ((128, 64), 4096): (128, 4, 4), ((128, 64), 16384): (128, 4, 4),
    ((128, 128), 128): (64, 4, 6), ((128, 128), 4096): (128, 8, 5), ((128, 128), 16384): (128, 4, 5),
}
# Few block-rows (N <= NARROW_BLOCK_ROWS tile heights: BERT-base's output projection and FFN-out, N = 768) at 129-4096
# rows: 64-row blocks, 4 warps, 5 stages at every density. At 4096 rows 128-row blocks make only 192 programs for
# N = 768, a ragged single wave on 132 SMs; 64-row blocks double them. Swept with graphs of 20 calls (128x64 tiles,
# M = 4096): FFN-out (small_m/tune_m4096.json) dense 35.3 us against 41.0 for an earlier entry (128, 8, 5), half
# density 18.4 against 25.3 for the bucket's (128, 4, 4), a quarter 10.9 against 13.3 (cuBLAS dense 27.5); the
# output projection with its bias (small_m/tune_m4096_o_bias.json) 7.2 against 7.9 us at half density, 5.8 against
# 6.2 at a quarter, dense 10.3-10.6 against 11.6 (1.10x the bucket's launch by geometric mean), and with a residual
# (tune_m4096_o_ffn_out_residual.json) 7.9-8.1 against 9.3 at half density. QKV and FFN-in (18 and 24 block-rows)
# keep the bucket's launch (64-row blocks 10-28% slower there), and so does M = 16384 (tune_m16384.json,
# tune_m16384_o_bias.json: the table within 5% of the best everywhere). Until the output projection's sweep the rule
# was K >= 2048 (FFN-out alone).
NARROW_BLOCK_ROWS = 8
TUNED_TMA_NARROW: dict[tuple, tuple[int, int, int]] = {((128, 64), 4096): (64, 4, 5)}
# Pointer-load kernel (GPUs before sm_90, unaligned operands), from the earlier sweep in the same file.
TUNED: dict[tuple, tuple[int, int, int]] = {
    ((32, 32), 128): (64, 4, 3), ((32, 32), 4096): (128, 4, 3), ((32, 32), 16384): (128, 4, 3),
    ((64, 64), 128): (64, 4, 3), ((64, 64), 4096): (128, 4, 2), ((64, 64), 16384): (128, 4, 2),
    ((128, 64), 128): (64, 4, 2), ((128, 64), 4096): (128, 4, 4), ((128, 64), 16384): (128, 4, 3),
    ((64, 128), 128): (64, 4, 3), ((64, 128), 4096): (128, 4, 2), ((64, 128), 16384): (128, 4, 2),
    ((128, 128), 128): (64, 4, 2), ((128, 128), 4096): (64, 4, 2), ((128, 128), 16384): (64, 4, 2),
}


# Split-K (tile_linear(split_k=n)). A same-run A/B on the H200 at M=128 (tune_tma.json, "splitk") had found the
# direct launch faster in 17 of 18 cases, but it timed graphs of one call, where the host's ~8 us submission cost
# hides a short kernel's own time. Timed as graphs of 20 calls, with the epilogue's split count a compile-time
# constant (small_m/tune_small_m.json, 128 rows, BERT-base shapes): for K = 768 (QKV, FFN-in) split-K loses 0.6-7.3 us
# at every density; for FFN-out (K = 3072) 4 splits win when at least half the tiles are kept — 128x64 tiles: dense
# 10.0 us against 16.6 direct, half 8.2 against 9.7 (cuBLAS dense 6.8); 64x64: 9.4 against 15.7, 7.8 against 9.1 —
# and lose at a quarter (7.3 against 6.2). Hence the split is automatic for a TileSparseWeight at up to
# SPLIT_AUTO_MAX_ROWS rows, K >= SPLIT_AUTO_MIN_K and density >= SPLIT_AUTO_MIN_DENSITY on the GPU; split_k=1 turns
# it off. (The run before the constant split count, small_m/tune_small_m_runtime_split.json: dense FFN-out 11.6 us in
# 4 splits, half 9.9.)
SPLIT_AUTO_MAX_ROWS = 128
SPLIT_AUTO_MIN_K = 2048
SPLIT_AUTO_MIN_DENSITY = 0.4
SPLIT_AUTO = 4


def _auto_split_k(x: torch.Tensor, w) -> int:
    """The split tile_linear takes when split_k is None (1: the direct launch)."""
    if (isinstance(w, TileSparseWeight) and x.is_cuda and x.shape[0] <= SPLIT_AUTO_MAX_ROWS
            and w.in_features >= SPLIT_AUTO_MIN_K and w.density >= SPLIT_AUTO_MIN_DENSITY):
        return SPLIT_AUTO
    return 1


# Y is written through a tensor descriptor (a bulk copy out of shared memory) when the tile's output side is at least
# this wide. Same-run A/B on the H200 (tune_store_persistent.json): 1-10% faster for 128x64 tiles in all 12 cases, mixed for
# 64x64 (-19% to +8%). A persistent launch (1 or 2 programs per SM striding over the work items) was measured in the
# same run and lost (1 per SM: 1.3-1.8x slower; 2 per SM: even), so every work item is its own program.
TMA_STORE_MIN_BN = 128


# Persistent flattened kernel (_tile_linear_flat_kernel): FLAT_PROGRAMS_PER_SM programs per SM each run a list of K
# steps across their work items as one software-pipelined loop. tile_linear(persistent=True) asks for it; by default
# it would serve tile-sparse weights from FLAT_MIN_ROWS rows on a GPU (None: only when asked). Launch (BLOCK_M,
# num_warps, num_stages) by (tile, M bucket) in FLAT_LAUNCH, else the grid kernel's.
# Measured against the grid kernel on the H200 (benchmarks/results/h200/flat/flat_ab.json, same run, BERT-base shapes,
# each case's best of 16 launches): geometric mean 0.92x (128x64, M=4096), 0.89x (128x64, 16384), 0.92x and 1.02x
# (64x64); dense 0.64-0.99x; only the 25%-dense K=768 matrices gain (0-12%). An item's epilogue stalls its program's
# MMAs, where two co-resident grid programs overlap one's epilogue with the other's loop. Hence off by default.
# Two programs per SM won in 45 of the 48 cases; FLAT_LAUNCH holds each bucket's best by that geometric mean.
FLAT_MIN_ROWS: int | None = None
FLAT_PROGRAMS_PER_SM = 2
FLAT_LAUNCH: dict[tuple, tuple[int, int, int]] = {
    ((128, 64), 4096): (128, 4, 4), ((128, 64), 16384): (64, 4, 6),
    ((64, 64), 4096): (128, 4, 6), ((64, 64), 16384): (128, 4, 5),
}
# Programs of the persistent kernel in the interpreter (no SMs to count): small and odd, so lists hold several items
# and the greedy dealing is exercised.
INTERPRETER_SMS = 3


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _use_flat(x: torch.Tensor, w, persistent: bool | None, split_k: int | None) -> bool:
    if not isinstance(w, TileSparseWeight) or (split_k or 1) > 1:
        return False
    if persistent is not None:
        return persistent
    return FLAT_MIN_ROWS is not None and x.is_cuda and x.shape[0] >= FLAT_MIN_ROWS


def _m_bucket(M: int) -> int:
    """The row-count bucket the launch tables are keyed by."""
    return 128 if M <= 128 else (4096 if M <= 4096 else 16384)


def _launch_params(M: int, tile: tuple[int, int], on_gpu: bool, tma: bool, N: int = 0) -> tuple[int, int, int]:
    """(BLOCK_M, warps, stages) for M rows of X against tiles of this shape and N output features."""
    mb = _m_bucket(M)
    if tma and 0 < N <= NARROW_BLOCK_ROWS * tile[0] and (tile, mb) in TUNED_TMA_NARROW:
        return TUNED_TMA_NARROW[(tile, mb)]
    table = TUNED_TMA if tma else TUNED
    if (tile, mb) in table:
        return table[(tile, mb)]
    if not on_gpu:
        return (32, 4, 1)
    bm = 64 if M <= 128 else 128
    if tma:
        return (bm, 4, 5)
    warps = 4 if tile[0] * bm <= 64 * 128 else 8
    return (bm, warps, 3)


USE_TMA = True  # module switch, for A/B runs; tile_linear(tma=...) overrides it per call
# The grid kernel reads a residual through a tensor descriptor where it stores through one (see _epilogue, RES_TMA).
RES_TMA = True


# The small-batch path reads a dense W [N, K] in place, as (BN x BK) blocks, through the same kernels (DENSE_W), so a
# dense matrix gets the fused epilogues (GELU) and split-K partial sums without a tile copy of its weights.
# Block and launch (BLOCK_M, num_warps, num_stages) by row bucket (_dense_bucket).
# Up to 128 rows: 32 x 128 blocks with (64, 4, 4). Swept in the 12-layer BERT-base chain on the H200 (GPU time of a
# graphed forward with PDL, every output checked against the previous default; small_batch_deep*.json): 308.6-308.8
# us against 333.0 for 64 x 64 blocks at B=1, S=128, 268.0 against 299.2 at S=64, 279.2 against 291.9 at S=32. Narrow
# blocks give a 128-row GEMM ~2x more programs to spread its weight stream over the SMs, and 128-deep K steps halve
# the loop's trips. Deeper pipelines (5, 6, 8 stages), 8 warps, 32- or 128-row blocks, 16- or 256-deep blocks and
# 128 x 64 blocks were slower there; the isolated per-matrix sweep in small_batch_ab.json ("sweep") could not see
# the difference (a ~9 us launch floor per replay dominates).
# 129-256 rows: 64 x 128 blocks with (64, 4, 3) (small_batch_deep256.json, against 64 x 64 with (128, 4, 4)):
# 366.7 us against 414.7 at B=2, S=128; 347.8 against 422.3 at 1x192; 356.3 against 400.6 at 4x64; 379.9 against
# 418.1 at 1x256.
# 257 rows and up (the engine's dense FFN-in with its GELU from 4096 rows): 128x64 blocks with (128, 4, 2), two 32 KB
# pipeline buffers, as the tile kernel keeps at its (128, 4, 4) (its col_idx load takes a stage). Same-run on the
# H200 (tile_sub/tile_sub_ab_913531c.json, part b, BERT-base shapes with bias, graphs of 20 calls), FFN-in with GELU:
# 35.8 us at 4096 rows against 50.9 at (128, 4, 4) (four buffers, 128 KB: one program an SM), 40.1 at (128, 4, 3),
# 44.9 for 64x64 blocks at (128, 4, 3), 38.2 for density-1 tiles, 51.1 for cuBLAS + GELU; 165.9 at 16384 (tiles
# 167.9, cuBLAS + GELU 198.5). QKV 26.1 (cuBLAS 23.9) and FFN-out 46.4 (cuBLAS 27.6; 32.6 at (64, 4, 3)) stay on
# cuBLAS in the engine. 257-4095 rows: not measured with this launch.
DENSE_TILE: dict[int, tuple[int, int]] = {128: (32, 128), 256: (64, 128), 4096: (128, 64), 16384: (128, 64)}
DENSE_LAUNCH: dict[int, tuple[int, int, int]] = {128: (64, 4, 4), 256: (64, 4, 3), 4096: (128, 4, 2),
                                                 16384: (128, 4, 2)}


# Programs per block-row of tiles on a GPU, by tile: ((up to rows, up to density, sub), ...), the first entry that
# holds, else 1. With
# few rows of X a grid of (row blocks x block-rows) programs leaves SMs idle (BERT-base QKV at 128 rows: 2 x 18
# programs of 128x64 tiles on 132 SMs), so each block-row's output rows are split over `sub` programs that each read
# their rows of every kept tile. Same-run on the H200 (benchmarks/results/h200/tile_sub/tile_sub_ab_913531c.json,
# part a: BERT-base's four matrices with their epilogues, 128x64 tiles at densities 0.5 and 0.25, graphs of 20 calls;
# the sub of best geometric mean at each row count): 4 up to 256 rows (128: 3.14 us against 3.20 for 1; 256: 4.03
# against 4.76), 2 at 512 (4.77 against 5.24), 1 from 1024 (5.93 against 6.47 for 2). At 128 rows that holds for a
# quarter density only (2.74 against 3.00 us; half density 3.59 against 3.41, density 1 worse still: QKV 5.68
# against 4.99; the kernels bench likewise: QKV dense 7.4 us with 4 at be3f1c8, kernels_earlier/be3f1c8/, against
# 6.4 with 1 in kernels.md), so denser tiles keep 1 there.
# 64x64 tiles: not measured.
TILE_SUB: dict[tuple, tuple[tuple[int, float, int], ...]] = {
    (128, 64): ((128, 0.3, 4), (128, 1.0, 1), (256, 1.0, 4), (512, 1.0, 2))}
# From TILE_PAIR_ROWS[0] to TILE_PAIR_ROWS[1] rows the tile kernels take two kept tiles a K-loop trip (PAIR) on a GPU:
# a short loop at few rows is latency-bound, each trip a dependent round of loads and MMAs, and a half-density
# K = 768 block-row is up to 10 trips of 64 columns (mean 6; benchmarks/results/cpu/plan_tile_counts.txt) where the
# dense weight's small-batch kernel takes 6 of 128. Same-run on the H200 (benchmarks/results/h200/tile_sub/
# tile_pair_ab_2835e07.json and tile_pair_engine_extra_2835e07.log, BERT-base encoder on its tiles, GPU time of the
# graphed forward, one tile a trip -> two; outputs bit-identical): 50% tiles 584 -> 516 us at 4x128, 554-563 ->
# 487-489 at 3x128, 651 -> 581 at 1x512, 600 -> 533 at 2x256, 591 -> 511 at 1x384, 413 -> 403 at 2x128; 75% tiles
# 440 -> 409, 417 -> 386, 503 -> 474, 454 -> 427, 448 -> 410, 330 -> 329. Outside that window two a trip lose:
# 263 -> 271 (75%, 1x128), 675 -> 686 and 526 -> 533 at 8x128. Alone (graphs of 20 calls of one matrix, no PDL) they
# mostly lose at every row count (up to 2x at 1024 rows, where four loads a trip leave the pipeline fewer stages in
# flight), so the gain is the chained, PDL-launched engine's.
TILE_PAIR_ROWS: tuple[int, int] = (129, 512)


# From WS_MIN_ROWS rows a TileSparseWeight on an sm_90 GPU takes the warp-specialised Gluon kernel
# (kernels/tile_linear_ws.py, its ping-pong form) where it can run and no launch form was asked for (split_k, sub,
# pair, persistent, _config, tma=False, the deferred LayerNorm), for weights of at most WS_MAX_K input features, calls
# without an activation (unless WS_WITH_ACTIVATION), and launches of at least WS_MIN_ITEMS work items of its 128-row
# blocks; None: never. Its two consumer warpgroups hide one item's epilogue under the other's K loop, which pays where
# the loop is short (K = 768 at half density: 6 steps) and the items many (one program an SM deals them out).
# Same-run on the H200 (ws_coop/ws_coop_ab.json, graphs of 20 calls, BERT-base matrices against this grid kernel): at
# 16384 rows QKV 1.15x at half density and 1.21x at a quarter, the output projection 1.12x and 1.15x, FFN-in with its
# GELU 1.03x and 0.94x, FFN-out 1.01x and 1.05x; at 4096 rows 1.03-1.08x for QKV (576 items) and 0.82-0.86x for the
# output projection (192 items). FFN-in (its GELU epilogue) and FFN-out (K = 3072) were left out of the routing and of
# its engine A/B. In the encoder (ws_route/ws_route_ab.json,
# GPU time of the graphed forward, two rounds each, QKV and the output projection routed from 16384 rows): 50% tiles
# 4573/4615 -> 4519/4515 us at 128x128 and 5243/5152 -> 5154/5090 at 32x512, 70% tiles 3698/3677 -> 3595/3598 and
# 4274/4253 -> 4164/4187; from 8192 rows (the output projection's 384 items included) 64x128 gained 0.5-1.2% and
# 16x512 was even, so the rows stay at 16384, where BERT-base's output projection has its 768 items.
# Up to WS_MAX_ROWS rows (None: any): the A/B timed graphed forwards, whose rows stopped at the engine's graph bound
# then (GRAPH_MAX_TOKENS, 16384; now 65536, with the kernel still untimed above 16384 rows). The one bench run with the routing on above that too (bench_ws_route/, 128x512 tokens,
# eager forwards) had those slower and far more spread (70% tiles 1.92x -> 1.79x the peer; variable length, 30% tiles
# 13.3 -> 18.1 ms, p10-p90 14.9-19.3), plausibly the Gluon launcher's host cost on every eager call. With this bound
# (bench_ws_bounded/) they are back at 1.92x and 12.9 ms (p10-p90 12.7-13.1).
WS_MIN_ROWS: int | None = 16384
WS_MAX_ROWS: int | None = 16384
WS_MAX_K: int | None = 1024
WS_WITH_ACTIVATION = False
WS_MIN_ITEMS = 768


def _ws_route(x: torch.Tensor, w, M: int, N: int, K: int, activation) -> bool:
    """Whether a call that asked for no launch form of its own takes the warp-specialised kernel (the WS_* rule
    above; tile_linear_ws_supported then says whether it can)."""
    if not (WS_MIN_ROWS is not None and WS_MIN_ROWS <= M and (WS_MAX_ROWS is None or M <= WS_MAX_ROWS)
            and isinstance(w, TileSparseWeight) and x.is_cuda and (WS_MAX_K is None or K <= WS_MAX_K)
            and (WS_WITH_ACTIVATION or _activation_id(activation) == 0)):
        return False
    from . import tile_linear_ws as ws
    return -(-M // ws.WS_DEFAULT[0]) * -(-N // w.tile[0]) >= WS_MIN_ITEMS  # items of its default launch


def _dense_bucket(M: int) -> int:
    """The row bucket of the dense-weight tables: the small-batch path's 128 and 256 rows, then _m_bucket's."""
    return 128 if M <= 128 else (256 if M <= 256 else _m_bucket(M))


# Split-K for partial sums aims at this many programs (about one per SM of an H100/H200) ...
SPLIT_TARGET_PROGRAMS = 128
# ... with at least this many K blocks per split, and at most SPLIT_MAX splits.
SPLIT_MIN_BLOCKS = 2
SPLIT_MAX = 8


# Up to this many rows a program prefetches its weight slab into L2 before the K loop (and, under PDL, while the
# previous kernel still runs): a small-M GEMM is a weight stream, and a software pipeline a few stages deep keeps too
# few bytes in flight to draw the bandwidth. 0 turns it off. PREFETCH_ALL_BLOCKS: every row block's programs issue
# the hints (True) or only the first row block's, the others finding the lines in flight (False).
# Measured on the H200, BERT-base GPU time per forward on the small-batch kernel path: same-run A/B
# (benchmarks/results/h200/pdl_ab.json, every program prefetching) at B=1, S=128: 425 us plain, 370 with PDL, 356 with
# PDL and the prefetch, 435 with the prefetch alone; at 512 rows the prefetch cost 38-40 us with PDL, 121-123 without.
# Sweep (small_batch_sweep.json): first row block only 334 us against 354 for every program at B=1, S=128, 420 vs 437
# at 256 rows. Hence the first row block, up to 256 rows.
PREFETCH_MAX_ROWS = 256
PREFETCH_ALL_BLOCKS = False


def _extras(x: torch.Tensor, L) -> dict:
    """The PDL / prefetch launch arguments of the tile kernels for this call."""
    pdl = pdl_on(x)
    pre = x.is_cuda and not interpreting() and x.shape[0] <= PREFETCH_MAX_ROWS
    line = min(L.BK, 128 // x.element_size())
    return dict(PDL=pdl, PREFETCH=(2 if PREFETCH_ALL_BLOCKS else 1) if pre else 0, LINE=line, **pdl_kwargs(pdl))


def _dense_of(w) -> torch.Tensor:
    return w.to_dense() if isinstance(w, TileSparseWeight) else w


def _weight_shape(x: torch.Tensor, w) -> tuple[int, int]:
    """(N, K) of w, after checking it against x."""
    if isinstance(w, TileSparseWeight):
        N, K, dtype, device = w.out_features, w.in_features, w.dtype, w.device
    elif isinstance(w, torch.Tensor):
        check_tensor("weight", w, dims=2)
        (N, K), dtype, device = w.shape, w.dtype, w.device
    else:
        raise EtformerError(f"weight must be a TileSparseWeight or a dense [out, in] tensor, not {type(w).__name__}")
    if x.shape[1] != K:
        raise EtformerError(f"x has {x.shape[1]} features, the weight expects {K}")
    if dtype != x.dtype or device != x.device:
        raise EtformerError(f"weight is {dtype} on {device}, x is {x.dtype} on {x.device}; convert one of them")
    return N, K


def _check_epilogue(x: torch.Tensor, M: int, N: int, bias, residual) -> None:
    """A clear error for a bias or residual that does not fit Y [M, N] on x's device."""
    if bias is not None:
        check_tensor("bias", bias, dims=1, device=x.device)
        if bias.shape[0] != N:
            raise EtformerError(f"bias has {bias.shape[0]} entries, expected {N}")
    if residual is not None:
        check_tensor("residual", residual, dims=2, device=x.device)
        if tuple(residual.shape) != (M, N) or residual.stride(1) != 1:
            raise EtformerError(f"residual must be a row-major [{M}, {N}] tensor, got {tuple(residual.shape)}")


def _check_ln(name: str, n, M: int, device, affine: bool) -> None:
    if not isinstance(n, DeferredLN):
        raise EtformerError(f"{name} must be a DeferredLN, not {type(n).__name__}")
    check_tensor(f"{name}.stats", n.stats, dims=3, dtypes=(torch.float32,), device=device)
    if n.stats.shape[0] != M or n.stats.shape[2] != 2 or n.stats.shape[1] < 1 or not n.stats.is_contiguous():
        raise EtformerError(f"{name}.stats must be a contiguous [{M}, P, 2] fp32 tensor, got {tuple(n.stats.shape)}")
    if not (isinstance(n.d, int) and n.d > 0 and float(n.eps) > 0):
        raise EtformerError(f"{name} needs a row length d > 0 and eps > 0, got d={n.d!r}, eps={n.eps!r}")
    if affine and (n.weight is None or n.bias is None):
        raise EtformerError(f"{name} needs the LayerNorm's weight and bias")


def _check_deferred(x, M, N, K, x_norm, x_colsum, residual, residual_norm) -> None:
    """Clear errors for tile_linear's deferred-LayerNorm arguments."""
    if (x_norm is None) != (x_colsum is None):
        raise EtformerError("x_norm and x_colsum go together (fold_layernorm gives the column sums)")
    if x_norm is not None:
        _check_ln("x_norm", x_norm, M, x.device, affine=False)
        if x_norm.d != K:
            raise EtformerError(f"x_norm.d is {x_norm.d}, x has {K} features")
        check_tensor("x_colsum", x_colsum, dims=1, dtypes=(torch.float32,), device=x.device)
        if x_colsum.shape[0] != N or x_colsum.stride(0) != 1:
            raise EtformerError(f"x_colsum must be a contiguous [{N}] fp32 tensor, got {tuple(x_colsum.shape)}")
    if residual_norm is not None:
        if residual is None:
            raise EtformerError("residual_norm without a residual")
        _check_ln("residual_norm", residual_norm, M, x.device, affine=True)
        for nm, t in (("weight", residual_norm.weight), ("bias", residual_norm.bias)):
            check_tensor(f"residual_norm.{nm}", t, dims=1, device=x.device)
            if t.shape[0] != N or t.stride(0) != 1:
                raise EtformerError(f"residual_norm.{nm} has {t.shape[0]} entries, expected {N}")


def _tma_ok(x: torch.Tensor, w) -> bool:
    """Bulk tensor copies need sm_90+, 16-byte aligned bases and row strides, and at least one tile."""
    if TensorDescriptor is None:
        return False
    if x.is_cuda and capability(x.device.index)[0] < 9:
        return False
    e = x.element_size()
    if not (x.data_ptr() % 16 == 0 and (x.stride(0) * e) % 16 == 0):
        return False
    if isinstance(w, TileSparseWeight):
        return w.nnz_tiles > 0 and w.values.data_ptr() % 16 == 0 and (w.tile[1] * e) % 16 == 0
    return _aligned(w)


def _tma_on(x: torch.Tensor, w) -> bool:
    """Whether a launch for x and w takes TMA loads by default: the USE_TMA switch and _tma_ok."""
    return USE_TMA and _tma_ok(x, w)


def _aligned(t: torch.Tensor, col: int = 0) -> bool:
    e = t.element_size()
    return (t.data_ptr() + col * e) % 16 == 0 and (t.stride(0) * e) % 16 == 0 and t.stride(1) == 1


def _values(w) -> torch.Tensor:
    """The weight's raw values: the dense tensor, or the tile values (what the prefetch walks)."""
    return w if isinstance(w, torch.Tensor) else w.values


def _sources(x: torch.Tensor, w, block_m: int, tma: bool, BN: int, BK: int):
    """The kernel's X and W operands: tensor descriptors (TMA) or plain pointers."""
    wt = _values(w)
    if not tma:
        return x, wt
    xd = TensorDescriptor(x, [x.shape[0], x.shape[1]], [x.stride(0), 1], [block_m, BK])
    if isinstance(w, torch.Tensor):
        return xd, TensorDescriptor(w, [w.shape[0], w.shape[1]], [w.stride(0), 1], [BN, BK])
    vals = wt.view(-1, BK)  # (nnz * tile height, BK): tile t is rows t*height .. (t+1)*height; boxes of BN rows
    return xd, TensorDescriptor(vals, [vals.shape[0], BK], [BK, 1], [BN, BK])


class _Launch(NamedTuple):
    """Everything a launch of the tile kernels needs."""

    w: object  # the TileSparseWeight, or the dense [N, K] weight (row-major)
    BN: int
    BK: int
    block_m: int
    warps: int
    stages: int
    tma: bool
    dense: bool
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    sub: int  # programs per block-row of tiles (BN = tile height / sub); 1 for a dense weight
    pair: bool  # two tiles a K-loop trip (tiles only)


def _sub_split(M: int, w, on_gpu: bool, sub: int | None) -> int:
    """Programs per block-row of tiles: the caller's, else TILE_SUB's for the tile and M rows on a GPU, else 1."""
    if sub is None:
        sub = next((s for rows, dens, s in TILE_SUB.get(w.tile, ()) if M <= rows and w.density <= dens), 1) \
            if on_gpu else 1
    if sub < 1 or w.tile[0] % sub or (w.tile[0] // sub) % 16:
        raise EtformerError(f"sub={sub} must divide the tile height {w.tile[0]} into blocks of a multiple of 16 rows")
    return sub


def _plan(x: torch.Tensor, w, tma, config, sub: int | None = None, pair: bool | None = None) -> _Launch:
    """The launch for X W^T: the operand form, block sizes and launch parameters, TMA or pointer loads."""
    M, K = x.shape
    dense = isinstance(w, torch.Tensor)
    if dense:
        w = w if w.stride(1) == 1 and w.stride(0) == K else w.contiguous()
        BN, BK = DENSE_TILE[_dense_bucket(M)]
        sub, pair = 1, False
    else:
        sub = _sub_split(M, w, x.is_cuda, sub)
        pair = (x.is_cuda and TILE_PAIR_ROWS[0] <= M <= TILE_PAIR_ROWS[1]) if pair is None else pair
        BN, BK = w.tile[0] // sub, w.tile[1]
    tma = _tma_on(x, w) if tma is None else (tma and _tma_ok(x, w))
    if config is not None:
        block_m, warps, stages = config
    elif dense:
        block_m, warps, stages = DENSE_LAUNCH[_dense_bucket(M)] if x.is_cuda else (32, 4, 1)
    else:
        block_m, warps, stages = _launch_params(M, w.tile, x.is_cuda, tma, w.out_features)
    row_ptr, col_idx = (x, x) if dense else (w.row_ptr, w.col_idx)  # x: a placeholder the dense kernel ignores
    return _Launch(w, BN, BK, block_m, warps, stages, tma, dense, row_ptr, col_idx, sub, pair)


def _auto_split(x: torch.Tensor, N: int, K: int, BN: int, BK: int, block_m: int) -> int:
    """Splits so that about SPLIT_TARGET_PROGRAMS programs run, each over at least SPLIT_MIN_BLOCKS K blocks."""
    base = triton.cdiv(x.shape[0], block_m) * triton.cdiv(N, BN)
    want = triton.cdiv(SPLIT_TARGET_PROGRAMS, base)
    return max(1, min(want, SPLIT_MAX, triton.cdiv(K, BK) // SPLIT_MIN_BLOCKS))


def _partials(x, w, N, K, split, tma, config, sub=None, pair=None) -> torch.Tensor:
    """Launch the split-K kernel: fp32 partial sums [split, M, N] of X W^T (split None: chosen by _auto_split)."""
    L = _plan(x, w, tma, config, sub, pair)
    M = x.shape[0]
    split = split or _auto_split(x, N, K, L.BN, L.BK, L.block_m)
    ws = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    if M == 0:
        return ws
    x_src, w_src = _sources(x, L.w, L.block_m, L.tma, L.BN, L.BK)
    _tile_linear_splitk_kernel[(triton.cdiv(M, L.block_m) * triton.cdiv(N, L.BN), split)](
        x_src, w_src, _values(L.w), L.row_ptr, L.col_idx, ws, M, N, K, x.stride(0), split,
        BN=L.BN, BK=L.BK, BLOCK_M=L.block_m, FP32_DOT=x.dtype == torch.float32 and not x.is_cuda, TMA=L.tma,
        DENSE_W=L.dense, SUB=L.sub, PAIR=L.pair, num_warps=L.warps, num_stages=L.stages, **_extras(x, L))
    return ws


def tile_linear_partials(x: torch.Tensor, w, *, split: int | None = None, backend: str = "auto",
                         tma: bool | None = None, _config: tuple[int, int, int] | None = None,
                         sub: int | None = None, pair: bool | None = None) -> torch.Tensor:
    """fp32 partial sums of X W^T, [split, M, N], for a consumer that reduces them in its own pass (add_layernorm
    takes them, with the bias, in place of x): split-K without a second launch. w: a TileSparseWeight or a dense
    [N, K] tensor. split=None picks enough splits to fill the GPU; sub and pair as in tile_linear. The reference
    path returns one split."""
    check_tensor("x", x, dims=2)
    N, K = _weight_shape(x, w)
    if split is not None and split < 1:
        raise EtformerError(f"split must be at least 1, not {split}")
    if not use_triton(x, backend):
        return (x.float() @ _dense_of(w).float().t()).unsqueeze(0)
    return _partials(x if x.stride(1) == 1 else x.contiguous(), w, N, K, split, tma, _config, sub, pair)


def tile_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, activation: str | None = None,
                residual: torch.Tensor | None = None, out: torch.Tensor | None = None, out_col: int = 0,
                backend: str = "auto", _config: tuple[int, int, int] | None = None,
                split_k: int | None = None, tma: bool | None = None, tma_store: bool | None = None,
                persistent: bool | None = None, sub: int | None = None, pair: bool | None = None,
                x_norm: DeferredLN | None = None, x_colsum: torch.Tensor | None = None,
                residual_norm: DeferredLN | None = None, row_stats: bool = False):
    """Y = X W^T (+ bias) (-> GELU or ReLU) (+ residual). x: [M, K]; returns [M, N], or writes out[:, out_col:out_col+N].

    Deferred LayerNorm (the engine's post-LN layers at scale; grid kernel only, not with split_k, persistent):
    x_norm and x_colsum: x is un-normalised and w, bias and x_colsum come from fold_layernorm, so Y = LN(x) W^T + b.
    residual_norm: the residual is un-normalised; LN(residual) is added (residual_norm needs weight and bias).
    row_stats: also return the output's row moments, [M, P, 2] fp32, for the next consumer's DeferredLN: (Y, stats).

    w: a TileSparseWeight (the kernel visits its kept tiles only) or a dense [N, K] tensor (read in place as
    DENSE_TILE blocks: the small-batch path, for the fused epilogues).
    persistent: run the persistent flattened kernel (True), the grid kernel (False), or choose by FLAT_MIN_ROWS (None).
    split_k: split each block-row's tiles over that many programs and reduce their fp32 partial sums in a second
    kernel (None: SPLIT_AUTO for long-K weights at least SPLIT_AUTO_MIN_DENSITY dense at few rows, see _auto_split_k;
    1: never).
    sub: split each block-row of tiles by its output rows over that many programs (tile height / sub rows each, a
    multiple of 16); None: TILE_SUB's entry on a GPU, else 1. Not for the persistent kernel.
    pair: two kept tiles a K-loop trip (None: within TILE_PAIR_ROWS rows on a GPU). Not for the persistent kernel.
    _config: (BLOCK_M, num_warps, num_stages), plus programs per SM for the persistent kernel."""
    check_tensor("x", x, dims=2)
    _act_code(activation)
    M, K = x.shape
    N, _ = _weight_shape(x, w)
    _check_epilogue(x, M, N, bias, residual)
    if out is not None:
        check_tensor("out", out, dims=2, device=x.device)
        if out.shape[0] != M or out_col < 0 or out_col + N > out.shape[1] or out.stride(1) != 1:
            raise EtformerError(f"out {tuple(out.shape)} cannot take columns [{out_col}, {out_col + N}) of {M} rows")
    if persistent and not isinstance(w, TileSparseWeight):
        raise EtformerError("persistent=True needs a TileSparseWeight (a dense weight takes the grid kernel)")
    if persistent and (split_k or 1) > 1:
        raise EtformerError("persistent=True and split_k > 1 are exclusive")
    if persistent and (sub or 1) > 1:
        raise EtformerError("persistent=True and sub > 1 are exclusive")
    deferred = x_norm is not None or residual_norm is not None or row_stats
    _check_deferred(x, M, N, K, x_norm, x_colsum, residual, residual_norm)
    if deferred and (persistent or (split_k or 1) > 1):
        raise EtformerError("x_norm, residual_norm and row_stats run on the grid kernel: not with persistent or split_k")
    if not use_triton(x, backend):
        y = tile_linear_reference(x, w, bias, activation, residual, x_norm, x_colsum, residual_norm)
        result = y
        if out is not None:
            out[:, out_col:out_col + N] = y.to(out.dtype)
            result, y = out, out[:, out_col:out_col + N]
        return (result, row_stats_reference(y)) if row_stats else result
    if x.stride(1) != 1:
        x = x.contiguous()
    if deferred:
        split_k, persistent = 1, False
    if (not deferred and split_k in (None, 1) and not persistent and sub in (None, 1) and not pair and _config is None
            and tma is not False and _ws_route(x, w, M, N, K, activation)):
        from . import tile_linear_ws as ws  # the arguments are checked above; what Gluon needs, here
        if ws.tile_linear_ws_supported(x, w, out, out_col) is None:
            return ws.launch(x, w, bias, _activation_id(activation), residual, out, out_col)
    if out is None:
        out, out_col = torch.empty(M, N, device=x.device, dtype=x.dtype), 0
    if M == 0:
        return (out, torch.zeros(0, 1, 2, device=x.device, dtype=torch.float32)) if row_stats else out
    dummy = x
    act = _act_code(activation, x)
    if split_k is None and not persistent:
        split_k = _auto_split_k(x, w)
    if split_k is not None and split_k > 1:
        ws = _partials(x, w, N, K, split_k, tma, _config, sub, pair)
        pdl = pdl_on(x)
        _splitk_epilogue_kernel[(triton.cdiv(M, 32), triton.cdiv(N, 128))](
            ws, bias if bias is not None else dummy, residual if residual is not None else dummy, out,
            M, N, out.stride(0), residual.stride(0) if residual is not None else 0, out_col, SPLIT=split_k,
            BLOCK_M=32, BLOCK_N=128, HAS_BIAS=bias is not None, ACT=act, HAS_RES=residual is not None, num_warps=4,
            PDL=pdl, **pdl_kwargs(pdl))
        return out
    flat = _use_flat(x, w, persistent, split_k)
    if flat and _config is None:
        mb = _m_bucket(M)
        _config = FLAT_LAUNCH.get((w.tile, mb)) if x.is_cuda else None
    per_sm = FLAT_PROGRAMS_PER_SM
    if _config is not None and len(_config) == 4:
        _config, per_sm = _config[:3], _config[3]
    L = _plan(x, w, tma, _config, 1 if flat else sub, False if flat else pair)
    x_src, w_src = _sources(x, L.w, L.block_m, L.tma, L.BN, L.BK)
    if tma_store is None:
        tma_store = L.BN >= TMA_STORE_MIN_BN
    tma_store = tma_store and L.tma and _aligned(out, out_col)
    y_desc = TensorDescriptor(out[:, out_col:], [M, N], [out.stride(0), 1], [L.block_m, L.BN]) if tma_store else dummy
    if flat:
        sms = _sm_count(x.device.index) if x.is_cuda else INTERPRETER_SMS
        step_ptr, steps, ends, empty, P = _flat_schedule(L.w, M, L.block_m, sms * per_sm)
        pdl = pdl_on(x)
        _tile_linear_flat_kernel[(P,)](
            x_src, w_src, step_ptr, steps, ends, empty, bias if bias is not None else dummy,
            residual if residual is not None else dummy, out, y_desc,
            M, N, K, x.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0, out_col,
            triton.cdiv(N, L.BN), BN=L.BN, BK=L.BK, BLOCK_M=L.block_m, HAS_BIAS=bias is not None, ACT=act,
            HAS_RES=residual is not None, FP32_DOT=x.dtype == torch.float32 and not x.is_cuda, TMA=L.tma,
            TMA_STORE=tma_store, PDL=pdl, num_warps=L.warps, num_stages=L.stages, **pdl_kwargs(pdl))
        return out
    stats = torch.empty(M, triton.cdiv(N, L.BN), 2, device=x.device, dtype=torch.float32) if row_stats else None
    res_tma = RES_TMA and tma_store and residual is not None and _aligned(residual)
    r_desc = TensorDescriptor(residual, [M, N], [residual.stride(0), 1], [L.block_m, L.BN]) if res_tma else dummy
    xn, rn = x_norm, residual_norm
    _tile_linear_kernel[(triton.cdiv(M, L.block_m) * triton.cdiv(N, L.BN),)](
        x_src, w_src, _values(L.w), L.row_ptr, L.col_idx, dummy if L.dense else _row_order(L.w),
        bias if bias is not None else dummy,
        residual if residual is not None else dummy, out, y_desc,
        M, N, K, x.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0, out_col,
        xn.stats if xn else dummy, x_colsum if xn else dummy, rn.stats if rn else dummy, rn.weight if rn else dummy,
        rn.bias if rn else dummy, stats if row_stats else dummy, 1.0 / xn.d if xn else 1.0, xn.eps if xn else 1.0,
        1.0 / rn.d if rn else 1.0, rn.eps if rn else 1.0, r_desc,
        BN=L.BN, BK=L.BK, BLOCK_M=L.block_m, GROUP_M=8, HAS_BIAS=bias is not None, ACT=act,
        HAS_RES=residual is not None, FP32_DOT=x.dtype == torch.float32 and not x.is_cuda, TMA=L.tma,
        TMA_STORE=tma_store, DENSE_W=L.dense, SUB=L.sub, PAIR=L.pair,
        XS_P=xn.stats.shape[1] if xn else 0, RS_P=rn.stats.shape[1] if rn else 0,
        SO_P=stats.shape[1] if row_stats else 0, RES_TMA=res_tma, num_warps=L.warps, num_stages=L.stages,
        **_extras(x, L),
    )
    return (out, stats) if row_stats else out


def flops(M: int, w: TileSparseWeight) -> float:
    return 2.0 * M * w.nnz_tiles * w.tile[0] * w.tile[1]


def min_bytes(M: int, w: TileSparseWeight, elem: int = 2) -> float:
    """Each operand read once, the output written once."""
    return elem * (M * w.in_features + w.nnz_tiles * w.tile[0] * w.tile[1] + M * w.out_features)


switch_module(__name__)  # its upper-case settings are switches: see _common.switch_module
