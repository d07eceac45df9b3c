"""Tile-sparse linear for Hopper (sm_90) as a persistent, warp-specialised kernel, written in Gluon.

The same operation as tile_linear (Y = X W^T + b over a TileSparseWeight, GELU, residual, column-slice output), built
the way Hopper GEMMs reach their peak, which Triton's own compiler does not build for sm_90:

- a **loader** warp walks the program's work items (row block, block-row of tiles) and, for each kept tile, issues two
  bulk tensor copies (the X block at the tile's K offset, and the tile) into a ring of STAGES shared-memory buffers,
  each guarded by a "ready" and an "empty" mbarrier. It reads the block-row bounds and column indices as scalars,
  so no pipeline stage waits on an index load, and it runs ahead across items: the next item's first tiles load
  while the current one's epilogue runs, so a short sparse K loop pays no pipeline fill of its own;
- **consumer** warpgroups (CONSUMERS of them, 4 warps each) wait for a buffer, issue the wgmma asynchronously, and
  release the previous buffer once one wgmma is left in flight. With two consumers they take the program's items in
  turn ("ping-pong"): one runs its epilogue (bias, GELU, residual, bulk store) while the other's MMAs run. With
  coop=True they share each item of 2 x BLOCK_M rows instead, one row block each, and each stage's tile.

The grid is persistent (programs per SM x SMs, at most one program an item); items are dealt round-robin in the grid
kernel's order (groups of GROUP_M row blocks sweep the block-rows, heaviest block-row first), so the heaviest work
starts first.

tile_linear takes it from tile_linear.WS_MIN_ROWS rows for weights of at most WS_MAX_K input features, calls without
an activation and launches of at least WS_MIN_ITEMS items (BERT-base's QKV and output projection from 16384 rows).
Measured on the H200 (benchmarks/results/h200/ws/, ws_coop/, ws_route/): 0.92-0.93x the grid kernel at 4096 rows
and 1.03-1.05x at 16384 over BERT-base's four matrices, 1.12-1.21x for QKV and the output projection at 16384;
1.5-2.5% off the encoder's forward at 16384 tokens (docs/NOTES.md item 15). The cooperative form (coop=True) lost: 0.84-0.86x at 4096
rows, 1.02x at 16384.

Gluon kernels run on sm_90 GPUs only: no interpreter. tile_linear_ws_supported() says whether a call can take it;
the CPU tests compile it for sm_90 (scripts/compile_sm90.py) and check the host-side planning, and the GPU tests
check its output against tile_linear_reference.
"""
from __future__ import annotations

import functools

import torch

from ..errors import EtformerError
from ..sparse.tiles import TileSparseWeight
from ._common import capability, check_tensor, switch_module
from .tile_linear import _activation_id, _check_epilogue, _row_order, _weight_shape, tile_linear_reference

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    # Bulk tensor copies: async_load / async_store in newer Tritons (3.9, the CPU venv's), async_copy_* in 3.6 (the
    # GPU machines')
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    HAS_GLUON = True
except Exception:  # pragma: no cover - Triton without Gluon's Hopper support
    HAS_GLUON = False

# Launch by default: (BLOCK_M, STAGES, CONSUMERS, programs per SM). Same-run on the H200 against tile_linear's tabled
# grid kernel (benchmarks/results/h200/ws/ws_ab.json: BERT-base's four matrices with their bias, FFN-in with GELU,
# 128x64 tiles at densities 1, 0.5 (balanced and random block-rows) and 0.25, graphs of 20 calls), geometric mean of
# tile_linear's time over this kernel's: two consumers and 5 stages 0.917x at 4096 rows and 1.034x at 16384 (QKV
# 1.03-1.15x there); 4 stages 0.908x / 1.033x; one consumer with two programs an SM 0.859x / 0.954x.
WS_DEFAULT = (128, 5, 2, 1)
# Registers a thread of the loader warp keeps (it holds scalars only), and the consumers' with two of them.
LOADER_REGS = 40
CONSUMER_REGS = 232
# What is loaded a step ahead (bit flags): 1 the loader's next column index, 4 the consumers' next item's bounds; 0:
# each when it is used. (The same look-ahead of the next item's bounds in the loader gave wrong output on the H200,
# relative error 0.72, and hung combined with the others: ws_gluon_probe.py, benchmarks/results/h200/ws/; removed.)
WS_AHEAD = 0

if HAS_GLUON:

    @gluon.jit
    def _ws_where(item, num_m, num_r, GROUP_M: gl.constexpr):
        """Work item `item`: (its row block, its place b in the heaviest-first block-row order), in the grid kernel's
        order (groups of GROUP_M row blocks sweep the block-rows)."""
        width = GROUP_M * num_r
        first_m = (item // width) * GROUP_M
        gsize = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (item % width) % gsize, (item % width) // gsize

    @gluon.jit
    def _ws_brow(brow_ptr, b):
        """The b-th block-row (heaviest first): (its index, first and last-plus-one tile), three independent loads."""
        return gl.load(brow_ptr + 4 * b), gl.load(brow_ptr + 4 * b + 1), gl.load(brow_ptr + 4 * b + 2)

    @gluon.jit
    def _ws_gelu(x):
        """GELU, erf form, erf by Abramowitz & Stegun 7.1.26 with rcp.approx / ex2.approx (tile_linear._gelu_poly)."""
        a = gl.minimum(gl.abs(x), 3.0e38)
        d = 1.0 + 0.23164190 * a
        g = x * (x * -0.7213475204444817)
        t = gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=gl.float32, is_pure=True,
                                      pack=1)
        e = gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [g], dtype=gl.float32, is_pure=True,
                                      pack=1)
        p = ((((0.5307027145 * t - 0.7265760135) * t + 0.7107068705) * t - 0.142248368) * t + 0.127414796) * t
        return gl.maximum(x, 0.0) - a * (p * e)

    @gluon.jit
    def _ws_loader(x_desc, w_desc, y_desc, x_bufs, w_bufs, c_bufs, ready, empty, turn, brow_ptr, col_idx,
                   bias_ptr, res_ptr, M, N, nnz, stride_rm, num_items,
                   BLOCK_M: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr,
                   STAGES: gl.constexpr, CONSUMERS: gl.constexpr, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
                   HAS_RES: gl.constexpr, CID: gl.constexpr, AHEAD: gl.constexpr, COOP: gl.constexpr):
        """The loader warp: every kept tile of every item of this program, into the ring, in order (AHEAD & 1: the
        next tile's column index loaded a step ahead, its latency under the wait). COOP: an item is CONSUMERS row
        blocks, and each stage holds one X block per consumer beside the shared tile."""
        ITEM_M: gl.constexpr = BLOCK_M * CONSUMERS if COOP else BLOCK_M
        XB: gl.constexpr = CONSUMERS if COOP else 1
        num_m = gl.cdiv(M, ITEM_M)
        num_r = gl.cdiv(N, BN)
        P = gl.num_programs(0)
        n = 0
        for item in range(gl.program_id(0), num_items, P):
            pid_m, b = _ws_where(item, num_m, num_r, GROUP_M)
            r, t0, t1 = _ws_brow(brow_ptr, b)
            kc = gl.load(col_idx + gl.minimum(t0, nnz - 1))
            for t in range(t0, t1):
                if AHEAD & 1:  # the next tile's column index, in flight during this one's wait
                    kc_next = gl.load(col_idx + gl.minimum(t + 1, nnz - 1))
                else:
                    kc_next = kc
                    kc = gl.load(col_idx + t)
                s = n % STAGES
                # a fresh mbarrier counts as having completed phase 1, so the first round's waits pass
                mbarrier.wait(empty.index(s), ((n // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, XB * x_desc.block_type.nbytes + w_desc.block_type.nbytes)
                for c in gl.static_range(XB):
                    _tma_load(x_desc, [pid_m * ITEM_M + c * BLOCK_M, kc * BK], bar, x_bufs.index(s * XB + c))
                _tma_load(w_desc, [t * BN, 0], bar, w_bufs.index(s))
                if AHEAD & 1:
                    kc = kc_next
                n += 1

    @gluon.jit
    def _ws_consumer(x_desc, w_desc, y_desc, x_bufs, w_bufs, c_bufs, ready, empty, turn, brow_ptr, col_idx,
                     bias_ptr, res_ptr, M, N, nnz, stride_rm, num_items,
                     BLOCK_M: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr,
                     STAGES: gl.constexpr, CONSUMERS: gl.constexpr, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
                     HAS_RES: gl.constexpr, CID: gl.constexpr, AHEAD: gl.constexpr, COOP: gl.constexpr):
        """Consumer CID: the MMAs and the epilogue of every CONSUMERS-th item of this program, from the CID-th; COOP:
        of row block CID of every item (the consumers share each stage's tile and release it together)."""
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BN, 16])
        ITEM_M: gl.constexpr = BLOCK_M * CONSUMERS if COOP else BLOCK_M
        XB: gl.constexpr = CONSUMERS if COOP else 1
        XC: gl.constexpr = CID if COOP else 0
        c_smem = c_bufs.index(CID)
        num_m = gl.cdiv(M, ITEM_M)
        num_r = gl.cdiv(N, BN)
        P = gl.num_programs(0)
        pid_m, b = _ws_where(gl.program_id(0), num_m, num_r, GROUP_M)
        r, lo, hi = _ws_brow(brow_ptr, b)
        n = 0  # ring position of the item's first tile
        j = 0  # the item's place in this program's list
        for item in range(gl.program_id(0), num_items, P):
            pid_m, b = _ws_where(item, num_m, num_r, GROUP_M)
            if AHEAD & 4:  # this item's bounds were loaded during the previous one; load the next item's
                row = r
                t0 = lo
                t1 = hi
                _, b = _ws_where(gl.minimum(item + P, num_items - 1), num_m, num_r, GROUP_M)
                r, lo, hi = _ws_brow(brow_ptr, b)
            else:
                row, t0, t1 = _ws_brow(brow_ptr, b)
            if COOP or j % CONSUMERS == CID:
                if CONSUMERS > 1 and not COOP:
                    # the ring is consumed in item order: wait until the other consumer has taken its item's last
                    # buffer (a wait on a parity is only unambiguous within one phase of the barrier). A fresh
                    # barrier counts as having completed phase 1, so consumer 0's first wait passes.
                    mbarrier.wait(turn.index(CID), ((j // CONSUMERS) & 1) ^ (1 - CID))
                acc = gl.zeros([BLOCK_M, BN], gl.float32, layout=acc_layout)
                for t in range(t0, t1):
                    s = n % STAGES
                    mbarrier.wait(ready.index(s), (n // STAGES) & 1)
                    acc = warpgroup_mma(x_bufs.index(s * XB + XC), w_bufs.index(s).permute((1, 0)), acc,
                                        is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                    # the previous step's wgmma has finished reading its buffers: hand them back to the loader
                    mbarrier.arrive(empty.index((n + STAGES - 1) % STAGES), pred=t > t0)
                    n += 1
                if CONSUMERS > 1 and not COOP:
                    mbarrier.arrive(turn.index(1 - CID))  # the other consumer's MMAs may start
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index((n + STAGES - 1) % STAGES), pred=t1 > t0)
                row0 = pid_m * ITEM_M + XC * BLOCK_M
                col0 = row * BN
                cols = col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
                if HAS_BIAS:
                    bias = gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
                    acc = acc + gl.expand_dims(bias, 0)
                if ACT == 1:
                    acc = _ws_gelu(acc)
                elif ACT == 2:
                    acc = gl.maximum(acc, 0.0)
                if HAS_RES:
                    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
                    ptrs = res_ptr + gl.expand_dims(rows.to(gl.int64) * stride_rm, 1) + gl.expand_dims(cols, 0)
                    ok = gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0)
                    acc = acc + gl.load(ptrs, mask=ok, other=0.0).to(gl.float32)
                tma.store_wait(pendings=0)  # this consumer's previous store has left c_smem
                c_smem.store(acc.to(y_desc.dtype))
                fence_async_shared()
                _tma_store(y_desc, [row0, col0], c_smem)
            else:
                n += t1 - t0
            j += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _tile_linear_ws_kernel(x_desc, w_desc, y_desc, brow_ptr, col_idx, bias_ptr, res_ptr,
                               M, N, nnz, stride_rm, num_items,
                               BLOCK_M: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr,
                               STAGES: gl.constexpr, CONSUMERS: gl.constexpr, HAS_BIAS: gl.constexpr,
                               ACT: gl.constexpr, HAS_RES: gl.constexpr, LOADER_REGS: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr, AHEAD: gl.constexpr, COOP: gl.constexpr):
        XB: gl.constexpr = CONSUMERS if COOP else 1
        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES * XB, BLOCK_M, BK], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        c_bufs = gl.allocate_shared_memory(y_desc.dtype, [CONSUMERS, BLOCK_M, BN], y_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=XB)  # COOP: every consumer releases each stage
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        if CONSUMERS == 1:
            gl.warp_specialize([
                (_ws_consumer, (x_desc, w_desc, y_desc, x_bufs, w_bufs, c_bufs, ready, empty, turn, brow_ptr, col_idx,
                                bias_ptr, res_ptr, M, N, nnz, stride_rm, num_items, BLOCK_M, BN, BK, GROUP_M,
                                STAGES, CONSUMERS, HAS_BIAS, ACT, HAS_RES, 0, AHEAD, COOP)),
                (_ws_loader, (x_desc, w_desc, y_desc, x_bufs, w_bufs, c_bufs, ready, empty, turn, brow_ptr, col_idx,
                              bias_ptr, res_ptr, M, N, nnz, stride_rm, num_items, BLOCK_M, BN, BK, GROUP_M,
                              STAGES, CONSUMERS, HAS_BIAS, ACT, HAS_RES, 0, AHEAD, COOP)),
            ], [1], [LOADER_REGS])
        else:
            gl.warp_specialize([
                (_ws_consumer, (x_desc, w_desc, y_desc, x_bufs, w_bufs, c_bufs, ready, empty, turn, brow_ptr, col_idx,
                                bias_ptr, res_ptr, M, N, nnz, stride_rm, num_items, BLOCK_M, BN, BK, GROUP_M,
                                STAGES, CONSUMERS, HAS_BIAS, ACT, HAS_RES, 0, AHEAD, COOP)),
                (_ws_consumer, (x_desc, w_desc, y_desc, x_bufs, w_bufs, c_bufs, ready, empty, turn, brow_ptr, col_idx,
                                bias_ptr, res_ptr, M, N, nnz, stride_rm, num_items, BLOCK_M, BN, BK, GROUP_M,
                                STAGES, CONSUMERS, HAS_BIAS, ACT, HAS_RES, 1, AHEAD, COOP)),
                (_ws_loader, (x_desc, w_desc, y_desc, x_bufs, w_bufs, c_bufs, ready, empty, turn, brow_ptr, col_idx,
                              bias_ptr, res_ptr, M, N, nnz, stride_rm, num_items, BLOCK_M, BN, BK, GROUP_M,
                              STAGES, CONSUMERS, HAS_BIAS, ACT, HAS_RES, 0, AHEAD, COOP)),
            ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _gl_dtype(dtype: torch.dtype):
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]


def shared_layout(block: list[int], dtype: torch.dtype):
    """The NVMMA shared layout of a bulk-copied block (the widest swizzle its rows allow)."""
    return gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(dtype))


@functools.lru_cache(maxsize=None)
def _sms(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_BROW_CACHE: dict = {}


def _block_rows(w: TileSparseWeight) -> torch.Tensor:
    """int32 [block-rows, 4]: (block-row, first tile, last-plus-one tile, 0), heaviest block-row first (the grid
    kernel's order), cached per weight: one round of three independent loads an item instead of three dependent ones."""
    key = (id(w.row_ptr), w.row_ptr.data_ptr(), w.nnz_tiles)
    hit = _BROW_CACHE.get(key)
    if hit is None or hit[0] is not w.row_ptr:
        order = _row_order(w).long()
        rp = w.row_ptr.long()
        table = torch.stack([order, rp[order], rp[order + 1], torch.zeros_like(order)], 1).to(torch.int32)
        hit = (w.row_ptr, table.contiguous())
        if len(_BROW_CACHE) > 4096:
            _BROW_CACHE.clear()
        _BROW_CACHE[key] = hit
    return hit[1]


def _maxnreg(consumers: int) -> int:
    """The launch's registers a thread. Triton hands the default partition (consumer 0) what the others leave of
    maxnreg x warpgroups: with two consumers 3 x 168 - CONSUMER_REGS - LOADER_REGS = 248 (the register file holds
    12 warps at 168); with one, 2 x 128 - LOADER_REGS = 216, so that two programs fit an SM."""
    return 168 if consumers == 2 else 128


def tile_linear_ws_supported(x: torch.Tensor, w, out: torch.Tensor | None = None, out_col: int = 0) -> str | None:
    """None when tile_linear_ws can run this call, else why not (a sentence)."""
    if not HAS_GLUON:
        return "this Triton has no Gluon Hopper support"
    if not isinstance(w, TileSparseWeight):
        return "the weight is not a TileSparseWeight"
    if not x.is_cuda or capability(x.device.index)[0] != 9:
        return "the warp-specialised kernel runs on sm_90 (Hopper) GPUs only"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the warp-specialised kernel takes fp16 or bf16, not {x.dtype}"
    if w.tile[0] not in (64, 128, 256) or w.tile[1] % 16 or w.tile[1] > 128:
        return f"tile {w.tile} is not one of its shapes (height 64, 128 or 256; width a multiple of 16, at most 128)"
    e = x.element_size()
    if x.stride(1) != 1 or x.data_ptr() % 16 or (x.stride(0) * e) % 16 or w.values.data_ptr() % 16:
        return "X and the tile values must be 16-byte aligned and row-major"
    if out is not None and out.dtype != x.dtype:
        return f"the output must be {x.dtype}, as x is, not {out.dtype}"
    if out is not None and ((out.data_ptr() + out_col * e) % 16 or (out.stride(0) * e) % 16 or out.stride(1) != 1):
        return "the output slice must be 16-byte aligned and row-major"
    if w.nnz_tiles == 0:
        return "the weight keeps no tile"
    return None


def tile_linear_ws(x: torch.Tensor, w: TileSparseWeight, bias: torch.Tensor | None = None, *,
                   activation: str | None = None, residual: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, out_col: int = 0,
                   config: tuple[int, int, int, int] | None = None, coop: bool = False) -> torch.Tensor:
    """tile_linear's Y = X W^T (+ bias) (-> GELU or ReLU) (+ residual) by the warp-specialised Hopper kernel.
    config: (BLOCK_M, STAGES, CONSUMERS, programs per SM); None: WS_DEFAULT. coop: the consumers work on one item of
    CONSUMERS x BLOCK_M rows together, each on its row block, sharing every stage's tile (instead of taking items in
    turn). Raises EtformerError where the kernel cannot run (tile_linear_ws_supported says why)."""
    check_tensor("x", x, dims=2, dtypes=(torch.float16, torch.bfloat16))
    act = _activation_id(activation)  # every GELU runs the kernel's polynomial erf
    M, K = x.shape
    N, _ = _weight_shape(x, w)
    if out is not None:
        check_tensor("out", out, dims=2, device=x.device)
        if out.shape[0] != M or out_col < 0 or out_col + N > out.shape[1]:
            raise EtformerError(f"out {tuple(out.shape)} cannot take columns [{out_col}, {out_col + N}) of {M} rows")
    why = tile_linear_ws_supported(x, w, out, out_col)
    if why:
        raise EtformerError(why)
    _check_epilogue(x, M, N, bias, residual)
    if config is not None and (config[2] not in (1, 2) or config[1] < 1 or config[0] not in (64, 128)):
        raise EtformerError(f"config {config} must have BLOCK_M 64 or 128, STAGES >= 1 and 1 or 2 consumers")
    need, have = shared_bytes(config or WS_DEFAULT, coop, w.tile, x.element_size()), _smem_limit(x.device.index)
    if need + 1024 > have:  # the compiler's alignment adds up to ~200 bytes (compile_sm90.py's figures)
        raise EtformerError(f"config {config or WS_DEFAULT}{' cooperative' if coop else ''} needs {need} bytes of "
                            f"shared memory a program, this GPU has {have}: fewer stages or 64-row blocks")
    return launch(x, w, bias, act, residual, out, out_col, config, coop)


def shared_bytes(config, coop: bool, tile: tuple[int, int], elem: int = 2) -> int:
    """Shared memory a program of the kernel allocates at launch config (BLOCK_M, STAGES, CONSUMERS, per SM), less the
    compiler's alignment: the ring (per stage one X block, or one per consumer when coop, and one tile), each
    consumer's output block and the mbarriers."""
    block_m, stages, consumers, _ = config
    bn, bk = tile
    xb = consumers if coop else 1
    return elem * (stages * (xb * block_m * bk + bn * bk) + consumers * block_m * bn) + 8 * (2 * stages + 2)


@functools.lru_cache(maxsize=None)
def _smem_limit(index) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 232448))


def launch(x, w, bias, act: int, residual, out, out_col: int, config=None, coop: bool = False) -> torch.Tensor:
    """The kernel launch, for arguments already checked (tile_linear_ws, or tile_linear routing to it after its own
    checks and tile_linear_ws_supported): act is 0 none, 1 GELU, 2 ReLU; config None: WS_DEFAULT."""
    M, K = x.shape
    N = w.out_features
    if out is None:
        out, out_col = torch.empty(M, N, device=x.device, dtype=x.dtype), 0
    if M == 0:
        return out
    block_m, stages, consumers, per_sm = config or WS_DEFAULT
    BN, BK = w.tile
    vals = w.values.view(-1, BK)
    x_desc = GluonDescriptor(x, [M, K], [x.stride(0), 1], [block_m, BK], shared_layout([block_m, BK], x.dtype))
    w_desc = GluonDescriptor(vals, [vals.shape[0], BK], [BK, 1], [BN, BK], shared_layout([BN, BK], x.dtype))
    y_desc = GluonDescriptor(out[:, out_col:], [M, N], [out.stride(0), 1], [block_m, BN],
                             shared_layout([block_m, BN], x.dtype))
    items = -(-M // (block_m * (consumers if coop else 1))) * (-(-N // BN))
    grid = (max(1, min(items, _sms(x.device.index) * per_sm)), )
    _tile_linear_ws_kernel[grid](
        x_desc, w_desc, y_desc, _block_rows(w), w.col_idx, bias if bias is not None else x,
        residual if residual is not None else x, M, N, w.nnz_tiles, residual.stride(0) if residual is not None else 0,
        items,
        BLOCK_M=block_m, BN=BN, BK=BK, GROUP_M=8, STAGES=stages, CONSUMERS=consumers, HAS_BIAS=bias is not None,
        ACT=act, HAS_RES=residual is not None, LOADER_REGS=LOADER_REGS, CONSUMER_REGS=CONSUMER_REGS, AHEAD=WS_AHEAD,
        COOP=bool(coop), num_warps=4, maxnreg=_maxnreg(consumers))
    return out


# The plain-PyTorch reference: the operation is tile_linear's.
tile_linear_ws_reference = tile_linear_reference


switch_module(__name__)  # its upper-case settings are switches: see _common.switch_module
