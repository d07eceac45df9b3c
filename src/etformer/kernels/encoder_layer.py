"""A whole post-LN encoder layer in one persistent launch, for small batches.

At a few hundred tokens every operator of a layer is latency-bound: seven launches of a few µs each, however little
work they hold. Here one grid of about one program per SM runs the layer's six phases in turn, separated by grid-wide
barriers (an atomic arrival counter in global memory, spun on with acquire loads):

    A  qkv = X W_qkv^T + b_qkv                                    (row block x 64-column block items)
    B  per (sequence, row block, head, column chunk): attention on the fly (online softmax), then that head's slice of
       the output projection, ctx_h W_O[:, h]^T, as fp32 partial sums ws[h]  (split-K over heads; the attention
       output never reaches memory)
    C  h = LN(sum_h ws[h] + b_O + X)                              (one row an item)
    D  f = act(h W_1^T + b_1)
    E  ws[s] = f[:, chunk s] W_2[:, chunk s]^T                    (split-K partial sums)
    F  Y = LN(sum_s ws[s] + b_2 + h)

Before its first wait each program asks L2 for its share of the layer's weights (they depend on no earlier kernel),
so under programmatic dependent launch the next layer's weights stream in while this layer computes.

Rows past the real tokens (the engine's graph-bucket ghost rows: no sequence of cu_seqlens holds them) go through
the row-wise phases like any row, but phase B writes no partial sums for them, so their values are undefined; no
real row ever reads them.

The engine keeps this off by default (etformer.engine.encoder.FUSED_LAYER): on the H200 it measured slower than the
seven separate PDL launches at every small shape (benchmarks/results/h200/layer_ab.json, layer_ab_tuned.json).

Every program of the grid must be resident at once (they wait on each other): the launcher caps the grid at the SM
count, and the Triton interpreter, which runs programs one after another, gets a grid of one.
"""
from __future__ import annotations

import math

import torch

from ..errors import EtformerError
from ._common import (HAS_TRITON, check_tensor, interpreting, next_pow2, pdl_kwargs, pdl_on, switch_module, tl, triton,
                      use_triton)
from .attention import LOG2E, attention_reference, head_blocks
from .layernorm import add_layernorm_reference
from .tile_linear import _act_code, tile_linear_reference

if HAS_TRITON:
    from ._common import pdl_enter, prefetch_l2
    from .attention_proj import _attend_project
    from .tile_linear import _activate, _tile_dot

# Most rows the launcher takes: the attention phase keeps one row block's online softmax per item, which is fine at
# any length, but the layer kernel already loses to the separate kernels at 256 rows (layer_ab.json).
MAX_ROWS = 1024
# Whether each program prefetches its share of the layer's weights into L2 before its first wait. Module switch, for
# A/B runs. Same-run A/B in the engine (layer_ab_tuned.json, GPU time): 362-363 us with it against 366-367 without at
# B=1, S=128, 578 against 616 at 2 x 128 (at the first launch shape it cost: 461 against 443 at B=1, layer_ab.json).
PREFETCH = True


def encoder_layer_reference(x, cu_seqlens, num_heads, head_dim, w_qkv, b_qkv, w_o, b_o, ln1, w_1, b_1, w_2, b_2, ln2,
                            eps=1e-12, v_head_dim=None, activation="gelu"):
    """The same layer from the operators' references, each output rounded to x's dtype as the kernels store it."""
    H, D = num_heads, head_dim
    qkv = tile_linear_reference(x, w_qkv, b_qkv)
    ctx = attention_reference(qkv, cu_seqlens, H, D, v_head_dim=v_head_dim or D)
    h = add_layernorm_reference(ctx.float() @ w_o.float().t(), x, ln1[0], ln1[1], eps, x_bias=b_o, out_dtype=x.dtype)
    f = tile_linear_reference(h, w_1, b_1, activation=activation)
    return add_layernorm_reference(f.float() @ w_2.float().t(), h, ln2[0], ln2[1], eps, x_bias=b_2,
                                   out_dtype=x.dtype)


if HAS_TRITON:

    @triton.jit
    def _grid_sync(cnt_ptr, target):
        """Wait until target arrivals are counted: every program's earlier stores are then visible to all."""
        tl.debug_barrier()  # the whole program has stored its results
        tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
        while tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()

    @triton.jit
    def _stamp(t_ptr, pid, k: tl.constexpr):
        """Diagnostic: this program's %globaltimer (ns) into slot k of its row of t_ptr [programs, 8]."""
        c = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(t_ptr + pid * 8 + k, c)

    @triton.jit
    def _phase_end(t_ptr, cnt_ptr, pid, P, K: tl.constexpr, TIMING: tl.constexpr):
        """End of phase K (1-5): this program's %globaltimer into slot K (TIMING), then the K-th grid barrier."""
        if TIMING:
            _stamp(t_ptr, pid, K)
        _grid_sync(cnt_ptr, K * P)

    @triton.jit
    def _prefetch_share(ptr, n_elem, pid, P, LINE: tl.constexpr, CH: tl.constexpr):
        """L2 prefetch of every P-th chunk of CH lines of a flat array of n_elem elements, from chunk pid."""
        n_lines = tl.cdiv(n_elem, LINE)
        for c0 in range(pid * CH, n_lines, P * CH):
            idx = tl.minimum(c0 + tl.arange(0, CH), n_lines - 1).to(tl.int64) * LINE
            prefetch_l2(ptr + idx)

    @triton.jit
    def _gemm(a_ptr, w_ptr, row0, col0, lo, hi, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, FP32_DOT: tl.constexpr):
        """A[row0:+BM, K blocks lo..hi) . W[col0:+BN, same]^T in fp32, A [M, K] and W [N, K] row-major: the tile
        kernels' dense-weight K loop, with A (written by this launch) read past L1."""
        return _tile_dot(a_ptr, w_ptr, w_ptr, row0, M, K, w_ptr, lo, hi, K, col0, N, BM, BN, BK, FP32_DOT,
                         False, True, False, 0, 64, ".cg", 1, False)

    @triton.jit
    def _linear_phase(a_ptr, w_ptr, b_ptr, y_ptr, T, N, K: tl.constexpr, pid, P, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, ACT: tl.constexpr, FP32_DOT: tl.constexpr):
        """y = act(a W^T + b) over T rows, [BM, BN] blocks shared out over the P programs from pid."""
        n_mb = tl.cdiv(T, BM)
        for it in range(pid, n_mb * tl.cdiv(N, BN), P):
            r0 = (it % n_mb) * BM
            c0 = (it // n_mb) * BN
            acc = _gemm(a_ptr, w_ptr, r0, c0, 0, tl.cdiv(K, BK), T, N, K, BM, BN, BK, FP32_DOT)
            cols = c0 + tl.arange(0, BN)
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            _store_block(y_ptr, N, _activate(acc, ACT), r0, c0, T, N, BM, BN)

    @triton.jit
    def _store_block(y_ptr, stride_y, acc, row0, col0, M, N, BM: tl.constexpr, BN: tl.constexpr):
        offs_m = row0 + tl.arange(0, BM)
        offs_n = col0 + tl.arange(0, BN)
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _reduce_ln(ws_ptr, NS, T, r, xb_ptr, res_ptr, w_ptr, b_ptr, y_ptr, eps,
                   HID: tl.constexpr, BLOCK_HID: tl.constexpr):
        """y[r] = LN(sum of NS fp32 partial rows + x_bias + res[r]), statistics in fp32."""
        cols = tl.arange(0, BLOCK_HID)
        ok = cols < HID
        row = ws_ptr + r * HID + cols
        h = tl.zeros((BLOCK_HID,), dtype=tl.float32)
        for s in range(0, NS):
            h += tl.load(row + s * T * HID, mask=ok, other=0.0, cache_modifier=".cg")
        h += tl.load(xb_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        h += tl.load(res_ptr + r * HID + cols, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        mean = tl.sum(h, 0) / HID
        d = tl.where(ok, h - mean, 0.0)
        inv = 1.0 / tl.sqrt(tl.sum(d * d, 0) / HID + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + r * HID + cols, (d * inv * w + b).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _ln_phase(ws_ptr, NS, T, pid, P, xb_ptr, res_ptr, w_ptr, b_ptr, y_ptr, eps, HID: tl.constexpr,
                  BLOCK_HID: tl.constexpr):
        """_reduce_ln over T rows, one row an item, shared out over the P programs from pid."""
        for r in range(pid, T, P):
            _reduce_ln(ws_ptr, NS, T, r, xb_ptr, res_ptr, w_ptr, b_ptr, y_ptr, eps, HID, BLOCK_HID)

    @triton.jit
    def _encoder_layer_kernel(
        x_ptr, cu_ptr, wqkv_ptr, bqkv_ptr, wo_ptr, bo_ptr, ln1w_ptr, ln1b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
        ln2w_ptr, ln2b_ptr, qkv_ptr, h_ptr, f_ptr, ws_ptr, y_ptr, cnt_ptr, t_ptr,
        T, NSEQ, MAX_LEN, qk_scale, eps,
        H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, INTER: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        BM_ATT: tl.constexpr, BN_ATT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NCH: tl.constexpr,
        BNO: tl.constexpr, BLOCK_HID: tl.constexpr, SPLIT: tl.constexpr, ACT: tl.constexpr,
        FP32_DOT: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr,
        TIMING: tl.constexpr = False,
    ):
        QKV_W: tl.constexpr = 2 * H * D + H * DV
        pid = tl.program_id(0)
        P = tl.num_programs(0)
        if PREFETCH:  # this program's share of the layer's weights, before waiting on the previous kernel
            _prefetch_share(wqkv_ptr, QKV_W * HID, pid, P, LINE, 256)
            _prefetch_share(wo_ptr, HID * H * DV, pid, P, LINE, 256)
            _prefetch_share(w1_ptr, INTER * HID, pid, P, LINE, 256)
            _prefetch_share(w2_ptr, HID * INTER, pid, P, LINE, 256)
        pdl_enter(PDL)
        if TIMING:
            _stamp(t_ptr, pid, 0)

        # A: qkv = X W_qkv^T + b
        _linear_phase(x_ptr, wqkv_ptr, bqkv_ptr, qkv_ptr, T, QKV_W, HID, pid, P, BM, BN, BK, 0, FP32_DOT)
        _phase_end(t_ptr, cnt_ptr, pid, P, 1, TIMING)

        # B: attention and the output projection's per-head partial sums
        n_mba = tl.cdiv(MAX_LEN, BM_ATT)
        CW: tl.constexpr = ((HID + NCH * BNO - 1) // (NCH * BNO)) * BNO
        for it in range(pid, NSEQ * n_mba * H * NCH, P):
            nc = it % NCH
            t = it // NCH
            hh = t % H
            t = t // H
            _attend_project(qkv_ptr, cu_ptr, wo_ptr, ws_ptr, qkv_ptr, T, t // n_mba, t % n_mba, hh, nc, qk_scale,
                            H, D, DV, HID, QKV_W, BM_ATT, BN_ATT, BD, BDV, CW, BNO, False, False, False, FP32_DOT,
                            ".cg")
        _phase_end(t_ptr, cnt_ptr, pid, P, 2, TIMING)

        # C: h = LN(sum_h ws[h] + b_O + X)
        _ln_phase(ws_ptr, H, T, pid, P, bo_ptr, x_ptr, ln1w_ptr, ln1b_ptr, h_ptr, eps, HID, BLOCK_HID)
        _phase_end(t_ptr, cnt_ptr, pid, P, 3, TIMING)

        # D: f = act(h W_1^T + b_1)
        _linear_phase(h_ptr, w1_ptr, b1_ptr, f_ptr, T, INTER, HID, pid, P, BM, BN, BK, ACT, FP32_DOT)
        _phase_end(t_ptr, cnt_ptr, pid, P, 4, TIMING)

        # E: ws[s] = f[:, chunk s] W_2[:, chunk s]^T
        n_mb = tl.cdiv(T, BM)
        nb = tl.cdiv(HID, BN)
        CHUNK: tl.constexpr = ((INTER + SPLIT * BK - 1) // (SPLIT * BK)) * BK
        for it in range(pid, n_mb * nb * SPLIT, P):
            s = it % SPLIT
            t = it // SPLIT
            r0 = (t % n_mb) * BM
            c0 = (t // n_mb) * BN
            lo = s * (CHUNK // BK)
            acc = _gemm(f_ptr, w2_ptr, r0, c0, lo, tl.minimum(lo + CHUNK // BK, tl.cdiv(INTER, BK)), T, HID, INTER,
                        BM, BN, BK, FP32_DOT)
            _store_block(ws_ptr + s * T * HID, HID, acc, r0, c0, T, HID, BM, BN)
        _phase_end(t_ptr, cnt_ptr, pid, P, 5, TIMING)

        # F: Y = LN(sum_s ws[s] + b_2 + h)
        _ln_phase(ws_ptr, SPLIT, T, pid, P, b2_ptr, h_ptr, ln2w_ptr, ln2b_ptr, y_ptr, eps, HID, BLOCK_HID)
        if TIMING:
            _stamp(t_ptr, pid, 6)


# Launch shape. BM x BN blocks with BK-deep steps for the three GEMM phases; BM_ATT query rows and BN_ATT keys a step
# for attention, each item projecting HID / NCH output columns in BNO-wide steps; FFN-out split SPLIT ways.
# Swept on the H200 over a graphed chain of 12 BERT-base layers with distinct weights (layer_sweep.json,
# layer_sweep2.json): 4 column chunks, 8 warps and 4 stages take 347 us at 128 tokens and 608 at 256, against 449 and
# 721 for (NCH 2, 4 warps, 3 stages); 5 or 6 stages, 128-deep steps, 32-row attention blocks, 8 FFN-out splits and
# 6 column chunks were slower.
CONFIG = dict(BM=64, BN=64, BK=64, BM_ATT=64, BN_ATT=64, NCH=4, BNO=64, SPLIT=4, num_warps=8, num_stages=4)


def _programs(x: torch.Tensor, programs: int | None) -> int:
    if interpreting() or not x.is_cuda:
        if programs not in (None, 1):
            raise EtformerError("the Triton interpreter runs programs one after another: a grid-synchronised "
                                "kernel needs programs=1 there")
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    if programs is not None and not 1 <= programs <= sms:
        raise EtformerError(f"programs must be 1..{sms} (the SM count: all must be resident), got {programs}")
    return programs or sms


def encoder_layer(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, head_dim: int,
                  w_qkv: torch.Tensor, b_qkv: torch.Tensor, w_o: torch.Tensor, b_o: torch.Tensor, ln1: tuple,
                  w_1: torch.Tensor, b_1: torch.Tensor, w_2: torch.Tensor, b_2: torch.Tensor, ln2: tuple, *,
                  eps: float = 1e-12, v_head_dim: int | None = None, activation: str = "gelu",
                  counter: torch.Tensor | None = None, programs: int | None = None, backend: str = "auto",
                  _config: dict | None = None, _timings: torch.Tensor | None = None) -> torch.Tensor:
    """One post-LN layer, Y = LN2(FFN(h) + h), h = LN1(Attn(X) W_O^T + b_O + X), on packed tokens x [T, d].

    Weights are dense [out, in]; qkv holds Q, K (H*D rows each) and V (H*DV rows). counter: a zeroed int32 tensor of
    at least one element that this call consumes (the grid barrier; None allocates one). programs: grid size, at
    most the SM count (default: the SM count; 1 under the interpreter). _timings (a diagnostic, compiled GPU kernel
    only): an int64 tensor of at least programs * 8 elements that receives, per program, the %globaltimer (ns) after
    its wait (slot 0) and at the end of each of the six phases (slots 1-6)."""
    check_tensor("x", x, dims=2)
    check_tensor("cu_seqlens", cu_seqlens, dims=1, dtypes=(torch.int32,), device=x.device)
    T, HID = x.shape
    H, D = int(num_heads), int(head_dim)
    DV = int(v_head_dim or D)
    INTER = w_1.shape[0] if isinstance(w_1, torch.Tensor) else 0
    shapes = {"w_qkv": (w_qkv, (2 * H * D + H * DV, HID)), "b_qkv": (b_qkv, (2 * H * D + H * DV,)),
              "w_o": (w_o, (HID, H * DV)), "b_o": (b_o, (HID,)), "ln1.weight": (ln1[0], (HID,)),
              "ln1.bias": (ln1[1], (HID,)), "w_1": (w_1, (INTER, HID)), "b_1": (b_1, (INTER,)),
              "w_2": (w_2, (HID, INTER)), "b_2": (b_2, (HID,)), "ln2.weight": (ln2[0], (HID,)),
              "ln2.bias": (ln2[1], (HID,))}
    for name, (t, shape) in shapes.items():
        check_tensor(name, t, device=x.device)
        if tuple(t.shape) != shape:
            raise EtformerError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if name.startswith("w_") and t.dtype != x.dtype:
            raise EtformerError(f"{name} is {t.dtype}, x is {x.dtype}; convert one of them")
    if D > 256 or DV > 256 or H < 1 or D < 1:
        raise EtformerError(f"need 1 <= head_dim <= 256 and at least one head, got H={H}, D={D}, DV={DV}")
    act = _act_code(activation, x)
    if act == 0:
        raise EtformerError("the layer needs an activation: gelu or relu")
    if T > MAX_ROWS:
        raise EtformerError(f"encoder_layer takes at most {MAX_ROWS} rows (the separate kernels serve more), got {T}")
    if cu_seqlens.numel() < 2:
        raise EtformerError("cu_seqlens needs at least two entries (one sequence)")
    if not use_triton(x, backend):
        return encoder_layer_reference(x, cu_seqlens, H, D, w_qkv, b_qkv, w_o, b_o, ln1, w_1, b_1, w_2, b_2, ln2,
                                       eps, DV, activation)
    if x.stride(1) != 1 or x.stride(0) != HID:
        x = x.contiguous()
    wts = [t.contiguous() for t in (w_qkv, w_o, w_1, w_2)]
    P = _programs(x, programs)
    if counter is None:
        counter = torch.zeros(1, device=x.device, dtype=torch.int32)
    elif counter.dtype != torch.int32 or counter.numel() < 1 or counter.device != x.device:
        raise EtformerError("counter must be a zeroed int32 tensor on x's device")
    if _timings is not None and (interpreting() or not x.is_cuda or _timings.dtype != torch.int64
                                 or _timings.numel() < 8 * P or _timings.device != x.device):
        raise EtformerError(f"_timings needs the compiled GPU kernel and an int64 tensor of {8 * P} elements there")
    cfg = dict(CONFIG, **(_config or {}))
    split = max(1, min(cfg["SPLIT"], triton.cdiv(INTER, cfg["BK"])))
    QKV_W = 2 * H * D + H * DV
    y = torch.empty_like(x)
    if T == 0:
        return y
    qkv = torch.empty(T, QKV_W, device=x.device, dtype=x.dtype)
    h = torch.empty_like(x)
    f = torch.empty(T, INTER, device=x.device, dtype=x.dtype)
    ws = torch.empty(max(H, split), T, HID, device=x.device, dtype=torch.float32)
    pdl = pdl_on(x)
    prefetch = PREFETCH and x.is_cuda and not interpreting()
    fp32_dot = x.dtype == torch.float32 and not x.is_cuda
    bd, bdv = head_blocks(D, DV, x.is_cuda)
    _encoder_layer_kernel[(P,)](
        x, cu_seqlens, wts[0], b_qkv, wts[1], b_o, ln1[0], ln1[1], wts[2], b_1, wts[3], b_2, ln2[0], ln2[1],
        qkv, h, f, ws, y, counter, _timings if _timings is not None else counter,
        T, cu_seqlens.numel() - 1, max(1, int(max_seqlen)), LOG2E / math.sqrt(D), eps,
        H=H, D=D, DV=DV, HID=HID, INTER=INTER, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
        BM_ATT=cfg["BM_ATT"], BN_ATT=cfg["BN_ATT"], BD=bd, BDV=bdv,
        NCH=cfg["NCH"], BNO=cfg["BNO"], BLOCK_HID=next_pow2(HID), SPLIT=split, ACT=act, FP32_DOT=fp32_dot,
        PDL=pdl, PREFETCH=prefetch, LINE=128 // x.element_size(), TIMING=_timings is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(pdl),
    )
    return y


switch_module(__name__)  # its upper-case settings are switches: see _common.switch_module
