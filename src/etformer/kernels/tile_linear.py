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

import torch

from ..errors import EtformerError
from ..sparse.tiles import TileSparseWeight
from ._common import HAS_TRITON, check_tensor, tl, triton, use_triton


# ----------------------------------------------------------------------------- reference
ACTIVATIONS = {None: 0, "none": 0, "gelu": 1, "relu": 2}


def _act_code(activation) -> int:
    if activation not in ACTIVATIONS:
        raise EtformerError(f"activation must be one of gelu, relu or none, not {activation!r}")
    return ACTIVATIONS[activation]


def apply_activation(y: torch.Tensor, activation) -> torch.Tensor:
    code = _act_code(activation)
    return torch.nn.functional.gelu(y) if code == 1 else (torch.relu(y) if code == 2 else y)


def tile_linear_reference(x, w: TileSparseWeight, bias=None, activation=None, residual=None):
    """fp32 math on the dense form of w; returns x.dtype."""
    y = x.float() @ w.to_dense().float().t()
    if bias is not None:
        y = y + bias.float()
    y = apply_activation(y, activation)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @triton.jit
    def _activate(acc, ACT: tl.constexpr):
        if ACT == 1:  # GELU, exact erf form as in BERT
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        elif ACT == 2:  # ReLU
            acc = tl.maximum(acc, 0.0)
        return acc

    @triton.jit
    def _tile_dot(x_src, w_src, row0, M, stride_xm, col_idx, lo, hi, K,
                  BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP32_DOT: tl.constexpr,
                  TMA: tl.constexpr):
        """X[row0 : row0+BLOCK_M, tiles lo..hi) . W_tiles^T in fp32: the K loop over one block-row's kept tiles.

        TMA: x_src and w_src are tensor descriptors (X as [M, K], the tile values as [nnz*BN, BK]); each step is two
        bulk copies into shared memory, software-pipelined by the compiler. Otherwise they are the X and tile-value
        pointers, and the loads are pointer gathers."""
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BK)
        m_mask = offs_m < M
        tile_offs = tl.arange(0, BN)[:, None] * BK + offs_k[None, :]  # (BN, BK): one contiguous tile
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        for i in range(0, hi - lo):
            t = lo + i
            kc = tl.load(col_idx + t)
            if TMA:
                xa = x_src.load([row0, kc * BK])
                wt = w_src.load([t * BN, 0])
            else:
                kk = kc * BK + offs_k
                xa = tl.load(x_src + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :],
                             mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
                wt = tl.load(w_src + t.to(tl.int64) * (BN * BK) + tile_offs)
            if FP32_DOT:
                acc += tl.dot(xa, tl.trans(wt), input_precision="ieee")
            else:
                acc += tl.dot(xa, tl.trans(wt))
        return acc

    @triton.jit
    def _tile_linear_kernel(
        x_src, w_src, row_ptr, col_idx, order_ptr, bias_ptr, res_ptr, y_ptr, y_desc,
        M, N, K,
        stride_xm, stride_ym, stride_rm, out_col,
        BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, FP32_DOT: tl.constexpr,
        TMA: tl.constexpr, TMA_STORE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_r = tl.cdiv(N, BN)
        # grouped order: GROUP_M row blocks of X sweep the (sorted) block-rows together, for L2 reuse of X
        width = GROUP_M * num_r
        group = pid // width
        first_m = group * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        r = tl.load(order_ptr + (pid % width) // gsize)

        acc = _tile_dot(x_src, w_src, pid_m * BLOCK_M, M, stride_xm, col_idx, tl.load(row_ptr + r),
                        tl.load(row_ptr + r + 1), K, BLOCK_M, BN, BK, FP32_DOT, TMA)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BN)
        m_mask = offs_m < M

        cols = r * BN + offs_n
        n_mask = cols < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc = _activate(acc, ACT)
        mask = m_mask[:, None] & n_mask[None, :]
        if HAS_RES:
            res = tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + cols[None, :], mask=mask, other=0.0)
            acc += res.to(tl.float32)
        if TMA_STORE:  # bulk copy out of shared memory; rows and columns past the edge are clipped
            y_desc.store([pid_m * BLOCK_M, r * BN], acc.to(y_desc.dtype))
        else:
            y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + out_col + cols[None, :]
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _tile_linear_splitk_kernel(
        x_src, w_src, row_ptr, col_idx, ws_ptr, M, N, K, stride_xm, SPLIT,
        BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr,
    ):
        """Small-M path: each (row block, block-row) is split over SPLIT programs along its kept tiles; fp32
        partial sums go to a workspace [SPLIT, M, N] that _splitk_epilogue_kernel reduces."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        r = pid // num_m
        start = tl.load(row_ptr + r)
        end = tl.load(row_ptr + r + 1)
        chunk = tl.cdiv(end - start, SPLIT)
        lo = start + s * chunk
        hi = tl.minimum(end, lo + chunk)
        acc = _tile_dot(x_src, w_src, pid_m * BLOCK_M, M, stride_xm, col_idx, lo, hi, K, BLOCK_M, BN, BK, FP32_DOT, TMA)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = r * BN + tl.arange(0, BN)
        ws = ws_ptr + s.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(ws, acc, mask=(offs_m[:, None] < M) & (cols[None, :] < N))

    @triton.jit
    def _splitk_epilogue_kernel(
        ws_ptr, bias_ptr, res_ptr, y_ptr, M, N, SPLIT, stride_ym, stride_rm, out_col,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
        HAS_RES: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (cols[None, :] < N)
        base = ws_ptr + offs_m[:, None].to(tl.int64) * N + cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, SPLIT):
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


# Tuned launch parameters, keyed by (tile, M bucket): (BLOCK_M, num_warps, num_stages). Swept on the H200 over
# BERT-base shapes (d=768, FFN 3072) at densities 1, 0.5 and 0.25 (scripts/tune.py; benchmarks/results/h200/tune.json),
# most frequent winner per key. Other keys fall back to the heuristic in _launch_params.
# With TMA the compiler puts the col_idx load in the first pipeline stage, so num_stages s gives s - 2 copy buffers.
TUNED_TMA: dict[tuple, tuple[int, int, int]] = {
    ((64, 64), 128): (64, 4, 5), ((64, 64), 4096): (128, 4, 5), ((64, 64), 16384): (128, 4, 5),
    ((128, 64), 128): (64, 4, 5), ((128, 64), 4096): (128, 4, 4), ((128, 64), 16384): (128, 4, 4),
    ((128, 128), 128): (64, 4, 6), ((128, 128), 4096): (128, 8, 5), ((128, 128), 16384): (128, 4, 5),
}
# Long K (FFN-out, K >= 2048) at up to 4096 rows, nearly dense: the same sweep's winner there was (128, 8, 5)
# (37.2 us vs cuBLAS 29.6 dense). Measured side by side in kernels.md (FFN-out, M=4096): 0.74x cuBLAS dense with it,
# 0.61x with the bucket's (128, 4, 4); but at 25% density 1.64x with it against 2.10x without, so it applies only from
# LONG_K_MIN_DENSITY up.
TUNED_TMA_LONG_K: dict[tuple, tuple[int, int, int]] = {((128, 64), 4096): (128, 8, 5)}
LONG_K_MIN_DENSITY = 0.75
# Pointer-load kernel (GPUs before sm_90, unaligned operands), from the earlier sweep in the same file.
TUNED: dict[tuple, tuple[int, int, int]] = {
    ((32, 32), 128): (64, 4, 3), ((32, 32), 4096): (128, 4, 3), ((32, 32), 16384): (128, 4, 3),
    ((64, 64), 128): (64, 4, 3), ((64, 64), 4096): (128, 4, 2), ((64, 64), 16384): (128, 4, 2),
    ((128, 64), 128): (64, 4, 2), ((128, 64), 4096): (128, 4, 4), ((128, 64), 16384): (128, 4, 3),
    ((64, 128), 128): (64, 4, 3), ((64, 128), 4096): (128, 4, 2), ((64, 128), 16384): (128, 4, 2),
    ((128, 128), 128): (64, 4, 2), ((128, 128), 4096): (64, 4, 2), ((128, 128), 16384): (64, 4, 2),
}


# Split-K is opt-in (tile_linear(split_k=n)). A same-run A/B on the H200 at M=128 (tune_tma.json, "splitk") found the
# direct launch faster in 17 of 18 cases (e.g. FFN-out dense, 128x64 tiles, TMA: 14.7 us direct, 23.9 split), because
# the second launch and the fp32 workspace round trip cost more than the extra parallelism brings.
# Y is written through a tensor descriptor (a bulk copy out of shared memory) when the tile's output side is at least
# this wide. Same-run A/B on the H200 (tune_store_persistent.json): 1-10% faster for 128x64 tiles in all 12 cases, mixed for
# 64x64 (-19% to +8%). A persistent launch (1 or 2 programs per SM striding over the work items) was measured in the
# same run and lost (1 per SM: 1.3-1.8x slower; 2 per SM: even), so every work item is its own program.
TMA_STORE_MIN_BN = 128


def _launch_params(M: int, tile: tuple[int, int], on_gpu: bool, tma: bool, K: int = 0,
                   density: float = 1.0) -> tuple[int, int, int]:
    mb = 128 if M <= 128 else (4096 if M <= 4096 else 16384)
    if tma and K >= 2048 and density >= LONG_K_MIN_DENSITY and (tile, mb) in TUNED_TMA_LONG_K:
        return TUNED_TMA_LONG_K[(tile, mb)]
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


try:  # host-side tensor descriptors (TMA); Triton 3.4 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

USE_TMA = True  # module switch, for A/B runs; tile_linear(tma=...) overrides it per call


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _tma_ok(x: torch.Tensor, w: TileSparseWeight) -> bool:
    """Bulk tensor copies need sm_90+, 16-byte aligned bases and row strides, and at least one tile."""
    if TensorDescriptor is None or w.nnz_tiles == 0:
        return False
    if x.is_cuda and _capability(x.device.index)[0] < 9:
        return False
    e = x.element_size()
    return (x.data_ptr() % 16 == 0 and (x.stride(0) * e) % 16 == 0 and w.values.data_ptr() % 16 == 0
            and (w.tile[1] * e) % 16 == 0)


def _aligned(t: torch.Tensor, col: int = 0) -> bool:
    e = t.element_size()
    return (t.data_ptr() + col * e) % 16 == 0 and (t.stride(0) * e) % 16 == 0 and t.stride(1) == 1


def _sources(x: torch.Tensor, w: TileSparseWeight, block_m: int, tma: bool):
    """The kernel's X and W operands: tensor descriptors (TMA) or plain pointers."""
    if not tma:
        return x, w.values
    BN, BK = w.tile
    xd = TensorDescriptor(x, [x.shape[0], x.shape[1]], [x.stride(0), 1], [block_m, BK])
    vals = w.values.view(-1, BK)  # (nnz * BN, BK): tile t is rows t*BN .. t*BN+BN
    wd = TensorDescriptor(vals, [vals.shape[0], BK], [BK, 1], [BN, BK])
    return xd, wd


def tile_linear(x: torch.Tensor, w: TileSparseWeight, bias: torch.Tensor | None = None, *, activation: str | None = None,
                residual: torch.Tensor | None = None, out: torch.Tensor | None = None, out_col: int = 0,
                backend: str = "auto", _config: tuple[int, int, int] | None = None,
                split_k: int | None = None, tma: bool | None = None, tma_store: bool | None = None) -> torch.Tensor:
    """Y = X W^T (+ bias) (-> GELU or ReLU) (+ residual). x: [M, K]; returns [M, N], or writes out[:, out_col:out_col+N]."""
    check_tensor("x", x, dims=2)
    _act_code(activation)
    M, K = x.shape
    N = w.out_features
    if K != w.in_features:
        raise EtformerError(f"x has {K} features, the weight expects {w.in_features}")
    if w.dtype != x.dtype or w.device != x.device:
        raise EtformerError(f"weight is {w.dtype} on {w.device}, x is {x.dtype} on {x.device}; convert one of them")
    if bias is not None:
        check_tensor("bias", bias, dims=1, device=x.device)
        if bias.shape[0] != N:
            raise EtformerError(f"bias has {bias.shape[0]} entries, expected {N}")
    if residual is not None:
        check_tensor("residual", residual, dims=2, device=x.device)
        if tuple(residual.shape) != (M, N) or residual.stride(1) != 1:
            raise EtformerError(f"residual must be a row-major [{M}, {N}] tensor, got {tuple(residual.shape)}")
    if out is not None:
        check_tensor("out", out, dims=2, device=x.device)
        if out.shape[0] != M or out_col < 0 or out_col + N > out.shape[1] or out.stride(1) != 1:
            raise EtformerError(f"out {tuple(out.shape)} cannot take columns [{out_col}, {out_col + N}) of {M} rows")
    if not use_triton(x, backend):
        y = tile_linear_reference(x, w, bias, activation, residual)
        if out is None:
            return y
        out[:, out_col:out_col + N] = y.to(out.dtype)
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out, out_col = torch.empty(M, N, device=x.device, dtype=x.dtype), 0
    if M == 0:
        return out
    BN, BK = w.tile
    tma = (USE_TMA if tma is None else tma) and _tma_ok(x, w)
    block_m, warps, stages = _config or _launch_params(M, w.tile, x.is_cuda, tma, K, w.density)
    num_m, num_r = triton.cdiv(M, block_m), w.n_block_rows
    dummy = x
    act = _act_code(activation)
    split_k = split_k or 1
    x_src, w_src = _sources(x, w, block_m, tma)
    if split_k > 1:
        ws = torch.empty(split_k, M, N, device=x.device, dtype=torch.float32)
        _tile_linear_splitk_kernel[(num_m * num_r, split_k)](
            x_src, w_src, w.row_ptr, w.col_idx, ws, M, N, K, x.stride(0), split_k,
            BN=BN, BK=BK, BLOCK_M=block_m, FP32_DOT=x.dtype == torch.float32 and not x.is_cuda, TMA=tma,
            num_warps=warps, num_stages=stages)
        _splitk_epilogue_kernel[(triton.cdiv(M, 32), triton.cdiv(N, 128))](
            ws, bias if bias is not None else dummy, residual if residual is not None else dummy, out,
            M, N, split_k, out.stride(0), residual.stride(0) if residual is not None else 0, out_col,
            BLOCK_M=32, BLOCK_N=128, HAS_BIAS=bias is not None, ACT=act, HAS_RES=residual is not None, num_warps=4)
        return out
    if tma_store is None:
        tma_store = BN >= TMA_STORE_MIN_BN
    tma_store = tma_store and tma and _aligned(out, out_col)
    y_desc = TensorDescriptor(out[:, out_col:], [M, N], [out.stride(0), 1], [block_m, BN]) if tma_store else dummy
    _tile_linear_kernel[(num_m * num_r,)](
        x_src, w_src, w.row_ptr, w.col_idx, _row_order(w), bias if bias is not None else dummy,
        residual if residual is not None else dummy, out, y_desc,
        M, N, K, x.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0, out_col,
        BN=BN, BK=BK, BLOCK_M=block_m, GROUP_M=8, HAS_BIAS=bias is not None, ACT=act,
        HAS_RES=residual is not None, FP32_DOT=x.dtype == torch.float32 and not x.is_cuda, TMA=tma,
        TMA_STORE=tma_store, num_warps=warps, num_stages=stages,
    )
    return out


def flops(M: int, w: TileSparseWeight) -> float:
    return 2.0 * M * w.nnz_tiles * w.tile[0] * w.tile[1]


def min_bytes(M: int, w: TileSparseWeight, elem: int = 2) -> float:
    """Each operand read once, the output written once."""
    return elem * (M * w.in_features + w.nnz_tiles * w.tile[0] * w.tile[1] + M * w.out_features)
