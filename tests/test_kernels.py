"""Every kernel against its reference on fresh random inputs: CPU through the Triton interpreter (fp32, fp16),
and on a GPU in fp16 and bf16. Outputs are poisoned with NaN first so an unwritten element fails."""
import importlib
import math

import pytest
import torch

from etformer.errors import EtformerError
from etformer.kernels import (CompactV, add_layernorm, attention, attention_proj_partials, attention_proj_reference,
                              attention_reference, embed_layernorm, embed_layernorm_reference, fused_ffn_partials,
                              pruned_v_attention, tile_linear, tile_linear_partials)
from etformer.sparse import TileSparseWeight
from kernel_utils import DEVICE, DTYPES, assert_close, needs_triton

tl_mod = importlib.import_module("etformer.kernels.tile_linear")

pytestmark = needs_triton


def _sparse_weight(out_f, in_f, tile, density, dtype, empty_row=False):
    w = torch.randn(out_f, in_f, device=DEVICE) / math.sqrt(in_f)
    nbr, nbc = -(-out_f // tile[0]), -(-in_f // tile[1])
    keep = torch.rand(nbr, nbc, device=DEVICE) < density
    if empty_row and nbr > 1:
        keep[1] = False
    full = keep.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:out_f, :in_f]
    return (w * full).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,tile,density", [
    (1, 64, 96, (16, 16), 0.5),
    (17, 96, 64, (32, 32), 0.6),
    (33, 128, 128, (64, 64), 1.0),
    (40, 80, 100, (32, 32), 0.5),   # neither dim divisible by the tile
    (16, 64, 64, (16, 64), 0.0),    # no tile at all: bias (+ residual) only
    (65, 64, 128, (64, 32), 0.7),
])
@pytest.mark.parametrize("act,res", [(None, False), ("gelu", True), ("relu", False)])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_tile_linear(dtype, M, K, N, tile, density, act, res, tma):
    W = _sparse_weight(N, K, tile, density, dtype, empty_row=True)
    w = TileSparseWeight.from_dense(W, tile)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    r = torch.randn(M, N, device=DEVICE, dtype=dtype) if res else None
    y = tile_linear(x, w, b, activation=act, residual=r, backend="triton", tma=tma)

    def f(xx, WW, bb, rr):
        z = torch.nn.functional.linear(xx, WW, bb)
        z = torch.nn.functional.gelu(z) if act == "gelu" else (torch.relu(z) if act == "relu" else z)
        return z + rr if rr is not None else z

    ref = f(x.double(), W.double(), b.double(), r.double() if res else None)
    peer = f(x, W, b, r)
    assert_close(y, peer, ref, f"tile_linear {tile} d={density}")


def _check_into_slice(dtype, M, K, N, tile, act, col, what, density=0.6, **kw):
    """tile_linear with bias, activation and residual into columns [col, col+N) of a NaN-poisoned wider buffer: the
    slice matches the reference, the columns either side stay untouched. An empty block-row is included."""
    W = _sparse_weight(N, K, tile, density, dtype, empty_row=True)
    w = TileSparseWeight.from_dense(W, tile)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    r = torch.randn(M, N, device=DEVICE, dtype=dtype)
    out = torch.full((M, N + 2 * col), float("nan"), device=DEVICE, dtype=dtype)
    tile_linear(x, w, b, activation=act, residual=r, out=out, out_col=col, backend="triton", **kw)
    assert torch.isnan(out[:, :col]).all() and torch.isnan(out[:, col + N:]).all()
    g = (lambda z: torch.nn.functional.gelu(z)) if act else (lambda z: z)
    ref = g(x.double() @ W.double().t() + b.double()) + r.double()
    peer = g(torch.nn.functional.linear(x, W, b)) + r
    assert_close(out[:, col:col + N], peer, ref, what)


@pytest.mark.parametrize("erf", ["poly", "libdevice"])
def test_tile_linear_gelu_elementwise(erf, monkeypatch):
    """The GELU epilogue element by element over [-12, 12] (and a wide tail), against the exact erf form in fp64:
    within a few fp32 ulps in fp32, within the output's rounding in fp16 and bf16, whichever erf the kernel uses."""
    monkeypatch.setattr(tl_mod, "GELU_ERF", erf)
    z = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([-60.0, -30.0, -6.0, -1e-6, 0.0, 1e-6, 6.0, 30.0, 60.0])])
    M = z.numel()
    eye = torch.zeros(16, 16)
    eye[0, 0] = 1.0
    w = TileSparseWeight.from_dense(eye, (16, 16))
    for dtype in DTYPES:
        x = torch.zeros(M, 16, dtype=dtype, device=DEVICE)
        x[:, 0] = z.to(dtype)
        y = tile_linear(x, w.to(DEVICE, dtype), activation="gelu", backend="triton")[:, 0].double().cpu()
        zz = x[:, 0].double().cpu()
        ref = 0.5 * zz * (1 + torch.erf(zz / math.sqrt(2)))
        # fp32: a few ulps; fp16 / bf16: one rounding of the output (half an ulp) plus slack
        tol = 2e-6 * (1 + zz.abs()) if dtype == torch.float32 else torch.finfo(dtype).eps * (1 + ref.abs())
        bad = (y - ref).abs() > tol
        assert not bad.any(), f"{erf} {dtype}: GELU off at x={zz[bad][:5].tolist()}: {y[bad][:5].tolist()}"


def test_gelu_codes(monkeypatch):
    """'gelu' maps to the polynomial erf (3 on a GPU tensor, 4 in the interpreter) or libdevice's (1)."""
    monkeypatch.setattr(tl_mod, "GELU_ERF", "poly")
    assert tl_mod._act_code("gelu", torch.zeros(1)) == 4 and tl_mod._act_code("relu", torch.zeros(1)) == 2
    monkeypatch.setattr(tl_mod, "GELU_ERF", "libdevice")
    assert tl_mod._act_code("gelu", torch.zeros(1)) == 1
    monkeypatch.setattr(tl_mod, "GELU_ERF", "tanh")
    with pytest.raises(EtformerError, match="GELU_ERF"):
        tl_mod._act_code("gelu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_tile_linear_split_k(dtype, split, act, tma):
    """The small-M path: partial sums over a split of each block-row's tiles, reduced in a second kernel."""
    _check_into_slice(dtype, 9, 192, 160, (32, 64), act, 16, f"split-K {split}", split_k=split, tma=tma)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,tile,sub,density", [
    (1, 96, 160, (32, 32), 2, 0.6),    # N not a multiple of the tile: the last block-row's second half is cut off
    (70, 128, 256, (64, 32), 4, 0.5),  # an empty block-row: its four programs write bias + residual only
    (33, 64, 128, (64, 64), 2, 1.0),
    (17, 80, 200, (128, 16), 8, 0.4),  # 16-row sub-blocks of 128-row tiles
])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_tile_linear_sub_blocks(dtype, M, K, N, tile, sub, density, split, tma):
    """Each block-row of tiles split by its output rows over `sub` programs (BN = tile height / sub), directly and
    through split-K, with bias, GELU and residual into a column slice."""
    _check_into_slice(dtype, M, K, N, tile, "gelu", 8, f"sub {sub} {tile} M={M} split {split}", density=density,
                      sub=sub, split_k=split, tma=tma)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,tile,sub,density", [
    (1, 96, 160, (32, 32), 1, 0.6),    # odd and even tile counts; the last block-row cut off at N
    (70, 128, 256, (64, 32), 2, 0.5),  # an empty block-row: no trip at all
    (33, 192, 128, (64, 64), 1, 1.0),  # three tiles a block-row: one pair and a lone tile
    (17, 80, 64, (16, 16), 1, 0.4),    # K not a multiple of the tile: the lone tile's zero X is past K
])
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_tile_linear_pairs(dtype, M, K, N, tile, sub, density, split, tma):
    """Two kept tiles a K-loop trip (pair=True), directly and through split-K (odd chunks), with sub-blocks, bias,
    GELU and residual into a column slice."""
    _check_into_slice(dtype, M, K, N, tile, "gelu", 8, f"pairs {tile} M={M} split {split}", density=density,
                      sub=sub, split_k=split, tma=tma, pair=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_linear_partials_sub_blocks(dtype):
    """tile_linear_partials with sub-blocks: the sum of its splits is X W^T."""
    W = _sparse_weight(192, 256, (64, 64), 0.5, dtype, empty_row=True)
    w = TileSparseWeight.from_dense(W, (64, 64))
    x = torch.randn(20, 256, device=DEVICE, dtype=dtype)
    ws = tile_linear_partials(x, w, split=2, sub=4, backend="triton")
    assert ws.shape == (2, 20, 192)
    assert_close(ws.sum(0), x @ W.t(), x.double() @ W.double().t(), "partials, sub 4")
    ws = tile_linear_partials(x, w, split=3, sub=2, pair=True, backend="triton")
    assert_close(ws.sum(0), x @ W.t(), x.double() @ W.double().t(), "partials, sub 2, pairs")


def test_tile_linear_sub_rules(monkeypatch):
    """sub must cut the tile height into multiples of 16 rows; the table applies on a GPU only; persistent excludes it."""
    from types import SimpleNamespace
    w = TileSparseWeight.from_dense(torch.randn(128, 64, device=DEVICE, dtype=DTYPES[0]), (64, 64))
    x = torch.randn(8, 64, device=DEVICE, dtype=DTYPES[0])
    for bad in (0, 3, 8):  # 8: 8-row blocks
        with pytest.raises(EtformerError, match="sub="):
            tile_linear(x, w, sub=bad, backend="triton")
    with pytest.raises(EtformerError, match="exclusive"):
        tile_linear(x, w, sub=2, persistent=True)
    monkeypatch.setattr(tl_mod, "TILE_SUB", {(64, 64): ((128, 0.3, 4), (128, 1.0, 2), (512, 1.0, 2))})
    assert tl_mod._sub_split(100, w, True, None) == 2  # w is dense: the first entry does not hold
    assert tl_mod._sub_split(100, w, False, None) == 1  # the interpreter: only when asked
    assert tl_mod._sub_split(300, w, True, None) == 2 and tl_mod._sub_split(513, w, True, None) == 1
    Wq = torch.zeros(128, 128, device=DEVICE, dtype=DTYPES[0])
    Wq[:64, :64] = 1.0
    quarter = TileSparseWeight.from_dense(Wq, (64, 64))
    assert quarter.density == 0.25 and tl_mod._sub_split(100, quarter, True, None) == 4
    assert tl_mod._sub_split(100, w, True, 2) == 2
    assert tl_mod._plan(SimpleNamespace(shape=(100, 64), is_cuda=False), w, False, None, 2).BN == 32


def test_tile_linear_pair_rule(monkeypatch):
    """Two tiles a trip within TILE_PAIR_ROWS rows on a GPU, for tiles only; the caller's choice wins."""
    from types import SimpleNamespace
    w = TileSparseWeight.from_dense(torch.randn(128, 64), (64, 64))
    monkeypatch.setattr(tl_mod, "TILE_PAIR_ROWS", (129, 512))
    gpu = lambda m: SimpleNamespace(shape=(m, 64), is_cuda=True)  # noqa: E731
    assert [tl_mod._plan(gpu(m), w, False, None).pair for m in (128, 129, 512, 513)] == [False, True, True, False]
    assert not tl_mod._plan(SimpleNamespace(shape=(300, 64), is_cuda=False), w, False, None).pair  # interpreter
    assert tl_mod._plan(gpu(64), w, False, None, pair=True).pair and not tl_mod._plan(gpu(300), w, False, None,
                                                                                       pair=False).pair
    assert not tl_mod._plan(gpu(300), torch.randn(128, 64), False, None).pair  # a dense weight: never


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,tile", [(1, (16, 16)), (70, (32, 32)), (129, (64, 32))])
@pytest.mark.parametrize("tma_store", [False, True], ids=["ptr-store", "tma-store"])
def test_tile_linear_output_store(dtype, M, tile, tma_store):
    """Y written by pointer stores or by tensor-descriptor (bulk) stores; rows and columns past the edge clipped."""
    _check_into_slice(dtype, M, 96, 160, tile, "gelu", 8, f"store {tile} M={M}", tma_store=tma_store)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,tile,density", [
    (1, 64, 96, (16, 16), 0.5),
    (70, 96, 160, (32, 32), 0.6),   # several items a program, an empty block-row, ragged edges
    (130, 128, 192, (32, 32), 1.0),
    (40, 64, 64, (16, 64), 0.0),    # no tile at all: the epilogue-only list
    (200, 80, 100, (32, 16), 0.3),  # neither dim divisible by the tile
])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_tile_linear_persistent(dtype, M, K, N, tile, density, tma):
    """The persistent flattened kernel (one loop over a program's K steps across its work items), with bias, GELU
    and residual into a column slice."""
    _check_into_slice(dtype, M, K, N, tile, "gelu", 8, f"persistent {tile} d={density} M={M}", density=density,
                      persistent=True, tma=tma)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_linear_writes_column_slice_only(dtype):
    d = 64
    x = torch.randn(20, d, device=DEVICE, dtype=dtype)
    out = torch.full((20, 3 * d), float("nan"), device=DEVICE, dtype=dtype)
    Ws = [_sparse_weight(d, d, (32, 32), 0.5, dtype) for _ in range(3)]
    for i, W in enumerate(Ws):
        tile_linear(x, TileSparseWeight.from_dense(W, (32, 32)), out=out, out_col=i * d, backend="triton")
    ref = torch.cat([x.double() @ W.double().t() for W in Ws], 1)
    peer = torch.cat([x @ W.t() for W in Ws], 1)
    assert_close(out, peer, ref, "qkv slices")


def test_tile_linear_bad_inputs():
    w = TileSparseWeight.from_dense(torch.randn(64, 64, device=DEVICE, dtype=DTYPES[0]), (32, 32))
    with pytest.raises(EtformerError, match="features"):
        tile_linear(torch.randn(4, 32, device=DEVICE, dtype=DTYPES[0]), w)
    with pytest.raises(EtformerError, match="convert"):
        tile_linear(torch.randn(4, 64, device=DEVICE, dtype=DTYPES[1]), w)
    with pytest.raises(EtformerError, match="must be one of"):
        tile_linear(torch.randint(0, 3, (4, 64), device=DEVICE), w)
    with pytest.raises(EtformerError, match="activation"):
        tile_linear(torch.randn(4, 64, device=DEVICE, dtype=DTYPES[0]), w, activation="tanh")
    with pytest.raises(EtformerError, match="cannot take columns"):
        tile_linear(torch.randn(4, 64, device=DEVICE, dtype=DTYPES[0]), w,
                    out=torch.empty(4, 100, device=DEVICE, dtype=DTYPES[0]), out_col=50)


def _qkv(lens, H, D, dtype, DV=None):
    DV = DV or D
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return torch.randn(T, 2 * H * D + H * DV, device=DEVICE, dtype=dtype), cu


def _sdpa_peer(qkv, cu, H, D, DV, causal, bias):
    """PyTorch at the same precision, sequence by sequence (the peer for the error bound)."""
    out = torch.empty(qkv.shape[0], H * DV, device=qkv.device, dtype=qkv.dtype)
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        L = e - s
        q = qkv[s:e, : H * D].view(L, H, D).transpose(0, 1)
        k = qkv[s:e, H * D: 2 * H * D].view(L, H, D).transpose(0, 1)
        v = qkv[s:e, 2 * H * D:].view(L, H, DV).transpose(0, 1)
        m = None
        if bias is not None:
            m = bias[b, :L].to(qkv.dtype).view(1, 1, L).expand(H, L, L)
        if causal:
            c = torch.zeros(L, L, device=qkv.device, dtype=qkv.dtype).masked_fill(
                torch.triu(torch.ones(L, L, dtype=torch.bool, device=qkv.device), 1), float("-inf"))
            m = c if m is None else m + c
        if DV != D:  # SDPA wants equal head dims on the CPU; do it by hand
            sc = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(D)
            sc = sc + m.float() if m is not None else sc
            o = (torch.softmax(sc, -1).to(qkv.dtype) @ v)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        out[s:e] = o.transpose(0, 1).reshape(L, H * DV)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,H,D,causal,bias", [
    ([1], 2, 64, False, False),
    ([17, 1, 5], 2, 32, False, True),
    ([128, 64], 1, 64, False, False),      # one-pass kernel at its limit
    ([129, 20], 1, 64, True, False),        # online-softmax kernel, causal
    ([511], 1, 32, False, True),
    ([40, 7], 2, 128, False, False),
    ([33], 1, 200, True, False),            # head dim 200: padded to 256 inside
    ([50, 9], 2, 80, False, True),
    ([300], 1, 96, False, False),
    ([128, 100], 2, 128, False, True),      # one-pass with a 128-key block, at the other head widths
    ([120, 3], 2, 32, True, False),
    ([128, 5, 60, 1, 33], 2, 64, False, True),  # ragged short batch: on the GPU the online kernel, 32-key blocks
])
@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
def test_attention(dtype, lens, H, D, causal, bias, tma):
    """tma: Q, K and V as bulk tensor copies; head widths that are not a power of two must refuse it."""
    qkv, cu = _qkv(lens, H, D, dtype)
    kb = None
    if bias:
        kb = torch.zeros(len(lens), max(lens), device=DEVICE, dtype=torch.float32)
        kb[:, ::3] = -10000.0  # mask every third key
        kb[:, 0] = 0.0
    out = torch.full((qkv.shape[0], H * D), float("nan"), device=DEVICE, dtype=dtype)
    if tma and D & (D - 1):
        with pytest.raises(EtformerError, match="tma=True"):
            attention(qkv, cu, max(lens), H, D, causal=causal, key_bias=kb, out=out, backend="triton", tma=True)
        return
    attention(qkv, cu, max(lens), H, D, causal=causal, key_bias=kb, out=out, backend="triton", tma=tma)
    ref = attention_reference(qkv.double(), cu, H, D, causal=causal, key_bias=kb.double() if kb is not None else None)
    peer = _sdpa_peer(qkv, cu, H, D, D, causal, kb)
    assert_close(out, peer, ref, f"attention lens={lens} D={D}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[64, 64], [200, 70], [128, 1]])
@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
def test_attention_sequences_stay_apart(dtype, lens, tma):
    """A non-finite value in one sequence never reaches another's output: key blocks that reach past a sequence are
    read with masks, not as bulk copies of the next sequence's rows."""
    H, D = 2, 32
    qkv, cu = _qkv(lens, H, D, dtype)
    qkv[lens[0]:] = float("nan")
    out = attention(qkv, cu, max(lens), H, D, backend="triton", tma=tma)
    ref = attention_reference(qkv[:lens[0]].double(), cu[:2], H, D)
    assert torch.isfinite(out[:lens[0]]).all(), "the next sequence's NaN reached this one"
    assert_close(out[:lens[0]], _sdpa_peer(qkv[:lens[0]], cu[:2], H, D, D, False, None), ref, f"lens={lens}")


def test_attention_launch_rule():
    """Which kernel and blocks the GPU launch takes: one pass up to SHORT_MAX keys, the online kernel with 32-key
    blocks for ragged short batches (heads up to 64 wide) and with 64-key blocks for full ones from
    SHORT_ONLINE_MIN_TOKENS tokens, online beyond."""
    import importlib
    A = importlib.import_module("etformer.kernels.attention")
    assert A._blocks(128, 64, True)[0] and A._blocks(128, 64, True, fill=0.61)[0]
    assert A._blocks(128, 64, True, fill=0.5) == A.RAGGED_SHORT_LAUNCH
    assert A._blocks(64, 32, True, fill=0.3) == A.RAGGED_SHORT_LAUNCH
    assert A._blocks(128, 128, True, fill=0.5)[0]   # wider heads: not swept, one pass stays
    assert not A._blocks(384, 64, True, fill=0.5)[0]
    assert A._blocks(128, 64, False, fill=0.5)[0]   # the interpreter keeps its own blocks
    n = A.SHORT_ONLINE_MIN_TOKENS
    assert A._blocks(128, 64, True, tokens=n - 1)[0]
    assert A._blocks(128, 64, True, tokens=n) == A.SHORT_ONLINE_LAUNCH
    assert A._blocks(128, 64, True, fill=0.5, tokens=n) == A.RAGGED_SHORT_LAUNCH   # ragged first
    assert A._blocks(128, 128, True, tokens=n)[0] and A._blocks(128, 64, False, tokens=n)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,S,D,causal,mdtype", [
    ([13, 13, 13], 13, 32, False, torch.int64),   # a padded batch: every sequence S long, the mask does the rest
    ([1, 1], 1, 64, False, torch.bool),
    ([128, 128], 128, 64, False, torch.int32),    # one-pass kernel
    ([200], 200, 64, True, torch.bool),           # online kernel, causal
])
@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
def test_attention_key_mask(dtype, lens, S, D, causal, mdtype, tma):
    """key_mask (zeros not attended) equals the additive 0 / -inf bias; a row whose keys are all masked gives 0."""
    H = 2
    qkv, cu = _qkv(lens, H, D, dtype)
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(len(lens), S, generator=g) < 0.7).to(DEVICE)
    mask[:, 0] = True
    if len(lens) > 1:
        mask[1] = False  # a sequence with nothing to attend to
    bias = torch.zeros(len(lens), S, device=DEVICE).masked_fill(~mask, float("-inf"))
    out = torch.full((qkv.shape[0], H * D), float("nan"), device=DEVICE, dtype=dtype)
    attention(qkv, cu, S, H, D, causal=causal, key_mask=mask.to(mdtype), out=out, backend="triton", tma=tma)
    ref = attention_reference(qkv.double(), cu, H, D, causal=causal, key_mask=mask)
    assert torch.equal(ref, attention_reference(qkv.double(), cu, H, D, causal=causal, key_bias=bias.double())
                       .nan_to_num(0.0))
    live = torch.ones(qkv.shape[0], dtype=torch.bool, device=DEVICE)
    if len(lens) > 1:
        assert torch.all(out[lens[0]:lens[0] + lens[1]] == 0)
        live[lens[0]:lens[0] + lens[1]] = False
    peer = _sdpa_peer(qkv, cu, H, D, D, causal, bias)
    assert_close(out[live], peer[live], ref[live], f"attention key_mask lens={lens}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,H,D,DV,HID,causal,keys", [
    ([1], 2, 64, 64, 96, False, None),
    ([17, 1, 5], 2, 32, 32, 64, False, "bias"),
    ([128, 64], 2, 64, 64, 128, False, None),     # one key block covers the sequence on the GPU
    ([129, 20], 1, 64, 64, 72, True, None),       # several key blocks, causal; HID not a multiple of the steps
    ([40, 7, 9], 2, 128, 128, 160, False, "mask"),  # the second sequence attends to nothing: zeros
    ([50, 9], 2, 32, 16, 100, False, None),       # compact V (DV < D), as the pruned-V plan makes it
])
@pytest.mark.parametrize("ghosts", [0, 3])
def test_attention_proj(dtype, lens, H, D, DV, HID, causal, keys, ghosts):
    """Attention with the output projection as per-head fp32 partial sums, against the fp64 reference (and PyTorch's
    attention + projection at the input precision as the peer). Ghost rows past every sequence stay untouched; the
    sum of the partials through add_layernorm gives LN(ctx W_O^T + b + X)."""
    qkv, cu = _qkv(lens, H, D, dtype, DV)
    T0 = qkv.shape[0]
    qkv = torch.cat([qkv, torch.randn(ghosts, qkv.shape[1], device=DEVICE, dtype=dtype)])
    w_o = (torch.randn(HID, H * DV, device=DEVICE) / math.sqrt(H * DV)).to(dtype)
    S = max(lens)
    kb = km = bias = None
    if keys == "bias":
        kb = torch.zeros(len(lens), S, device=DEVICE, dtype=torch.float32)
        kb[:, 1::3] = -10000.0
        bias = kb
    elif keys == "mask":
        km = torch.rand(len(lens), S, generator=torch.Generator().manual_seed(2)).to(DEVICE) < 0.7
        km[:, 0] = True
        km[1] = False
        bias = torch.zeros(len(lens), S, device=DEVICE).masked_fill(~km, float("-inf"))
    out = torch.full((H, qkv.shape[0], HID), float("nan"), device=DEVICE, dtype=torch.float32)
    got = attention_proj_partials(qkv, cu, S, H, D, w_o, v_head_dim=DV, causal=causal, key_bias=kb, key_mask=km,
                                  out=out, backend="triton")
    assert got is out and torch.isnan(out[:, T0:]).all()
    ref = attention_proj_reference(qkv[:T0].double(), cu, H, D, w_o.double(), v_head_dim=DV, causal=causal,
                                   key_bias=kb.double() if kb is not None else None, key_mask=km)
    ctx = _sdpa_peer(qkv[:T0], cu, H, D, DV, causal, bias).nan_to_num(0.0)
    peer = torch.einsum("thd,nhd->htn", ctx.view(T0, H, DV), w_o.view(HID, H, DV))
    assert_close(out[:, :T0], peer, ref, f"attention_proj lens={lens} D={D} DV={DV}")
    if keys == "mask":
        assert torch.all(out[:, lens[0]:lens[0] + lens[1]] == 0)
    x = torch.randn(qkv.shape[0], HID, device=DEVICE, dtype=dtype)
    b, g, beta = (torch.randn(HID, device=DEVICE, dtype=dtype) for _ in range(3))
    y = add_layernorm(out[:, :T0], x[:T0], g, beta, backend="triton", x_bias=b)
    want = torch.nn.functional.layer_norm(ref.sum(0) + b.double() + x[:T0].double(), (HID,), g.double(), beta.double(),
                                          1e-12)
    want_peer = torch.nn.functional.layer_norm(peer.sum(0) + b + x[:T0], (HID,), g, beta, 1e-12)
    assert_close(y, want_peer, want, "attention_proj + add_layernorm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_proj_bad_inputs(dtype):
    H, D = 2, 32
    qkv, cu = _qkv([4, 3], H, D, dtype)
    w_o = torch.randn(48, H * D, device=DEVICE, dtype=dtype)
    with pytest.raises(EtformerError, match="Q, K and V only"):
        attention_proj_partials(torch.cat([qkv, qkv[:, :8]], 1), cu, 4, H, D, w_o)
    with pytest.raises(EtformerError, match="w_o must be"):
        attention_proj_partials(qkv, cu, 4, H, D, w_o[:, :40])
    with pytest.raises(EtformerError, match="w_o must be"):
        attention_proj_partials(qkv, cu, 4, H, D, w_o.double())
    with pytest.raises(EtformerError, match="out must be"):
        attention_proj_partials(qkv, cu, 4, H, D, w_o, out=torch.empty(H, 7, 40, device=DEVICE))
    with pytest.raises(EtformerError, match="int32"):
        attention_proj_partials(qkv, cu.long(), 4, H, D, w_o)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,N", [(1, 1, 64), (3, 13, 100), (2, 128, 768)])
def test_finish_padded(dtype, B, S, N):
    """Padded rows zeroed, the real tokens of each sequence counted, non-finite values of real rows counted (not those
    of padded rows, which are dropped)."""
    from etformer.kernels.padded import finish_padded, finish_padded_reference

    x = torch.randn(B * S, N, device=DEVICE, dtype=dtype)
    mask = (torch.arange(S, device=DEVICE)[None, :] < torch.randint(1, S + 1, (B,), device=DEVICE)[:, None]).long()
    if B > 2:
        mask[2] = 0
    for poison in (False, True):
        if poison:
            x[0, 0] = float("nan")
            x[0, 1] = float("inf")
            if S > 1:
                x[S - 1, 2] = float("nan")  # row S-1 of sequence 0: counted only if real
        y, st = finish_padded(x, mask, backend="triton")
        y_ref, st_ref = finish_padded_reference(x, mask)
        assert st.dtype == torch.int32 and torch.equal(st.cpu(), st_ref.cpu()), (st, st_ref)
        keep = mask.reshape(-1).bool()
        assert torch.all(y[~keep] == 0) and torch.equal(y[keep].nan_to_num(7.0), x[keep].nan_to_num(7.0))
        assert int(st[0]) == (0 if not poison else 2 + int(S > 1 and bool(mask[0, S - 1])))
        assert st[1:].tolist() == mask.sum(1).tolist()
    with pytest.raises(EtformerError, match="rows"):
        finish_padded(x[:-1], mask, backend="triton")
    with pytest.raises(EtformerError, match="mask must be one of"):
        finish_padded(x, mask.float(), backend="triton")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_bad_inputs(dtype):
    qkv, cu = _qkv([4], 2, 32, dtype)
    with pytest.raises(EtformerError, match="int32"):
        attention(qkv, cu.long(), 4, 2, 32)
    with pytest.raises(EtformerError, match="too narrow"):
        attention(qkv, cu, 4, 4, 32)
    with pytest.raises(EtformerError, match="key_bias"):
        attention(qkv, cu, 4, 2, 32, key_bias=torch.zeros(3, 4, device=DEVICE))
    with pytest.raises(EtformerError, match="not both"):
        attention(qkv, cu, 4, 2, 32, key_bias=torch.zeros(1, 4, device=DEVICE),
                  key_mask=torch.ones(1, 4, device=DEVICE, dtype=torch.bool))
    with pytest.raises(EtformerError, match="key_mask must be one of"):
        attention(qkv, cu, 4, 2, 32, key_mask=torch.ones(1, 4, device=DEVICE))
    with pytest.raises(EtformerError, match="key_mask must be"):
        attention(qkv, cu, 4, 2, 32, key_mask=torch.ones(1, 3, device=DEVICE, dtype=torch.bool))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 64, 96), (17, 72, 100), (130, 128, 192)])
@pytest.mark.parametrize("act,res", [(None, False), ("gelu", False), ("relu", True)])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_linear_on_dense_weight(dtype, M, K, N, act, res, tma):
    """The small-batch path: a plain dense W read in place (K and N not multiples of its 64-wide blocks), with the
    fused epilogues, into a column slice of a NaN-poisoned buffer."""
    W = (torch.randn(N, K, device=DEVICE) / math.sqrt(K)).to(dtype)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    r = torch.randn(M, N, device=DEVICE, dtype=dtype) if res else None
    out = torch.full((M, N + 16), float("nan"), device=DEVICE, dtype=dtype)
    tile_linear(x, W, b, activation=act, residual=r, out=out, out_col=8, backend="triton", tma=tma)
    assert torch.isnan(out[:, :8]).all() and torch.isnan(out[:, 8 + N:]).all()

    def f(xx, WW, bb, rr):
        z = torch.nn.functional.linear(xx, WW, bb)
        z = torch.nn.functional.gelu(z) if act == "gelu" else (torch.relu(z) if act == "relu" else z)
        return z + rr if rr is not None else z

    ref = f(x.double(), W.double(), b.double(), r.double() if res else None)
    assert_close(out[:, 8:8 + N], f(x, W, b, r), ref, "dense-weight linear")


# add+LayerNorm launches: one row a program (the default at few rows), and several, the last program's rows partly
# past M (layernorm.MULTI_ROW_LAUNCH: (min rows, ROWS, num_warps))
LN_LAUNCHES = {"row": (), "rows4": ((1, 4, 8),), "rows2": ((1, 2, 4),)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "tiles"])
@pytest.mark.parametrize("split", [None, 1, 3])
@pytest.mark.parametrize("launch", ["row", "rows4"])
def test_partial_sums_into_add_layernorm(dtype, dense, split, launch, monkeypatch):
    """Split-K partial sums (fp32, [splits, M, N]) reduced by add_layernorm with the linear's bias and the residual:
    LN(x W^T + b + r) in two launches. Covers a block-row with no tile and K not a multiple of the split."""
    monkeypatch.setattr(importlib.import_module("etformer.kernels.layernorm"), "MULTI_ROW_LAUNCH", LN_LAUNCHES[launch])
    M, K, N = 33, 320, 96
    W = _sparse_weight(N, K, (32, 32), 0.6, dtype, empty_row=True)
    w = W if dense else TileSparseWeight.from_dense(W, (32, 32))
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    r = torch.randn(M, N, device=DEVICE, dtype=dtype)
    g, beta = torch.rand(N, device=DEVICE, dtype=dtype) + 0.5, torch.randn(N, device=DEVICE, dtype=dtype)
    ws = tile_linear_partials(x, w, split=split, backend="triton")
    assert ws.dtype == torch.float32 and ws.shape[1:] == (M, N) and (split is None or ws.shape[0] == split)
    lin64 = x.double() @ W.double().t()
    assert_close(ws.sum(0), x.float() @ W.float().t(), lin64, "partial sums")
    y = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
    add_layernorm(ws, r, g, beta, 1e-12, out=y, backend="triton", x_bias=b)
    ref = torch.nn.functional.layer_norm(lin64 + b.double() + r.double(), (N,), g.double(), beta.double(), 1e-12)
    peer = torch.nn.functional.layer_norm(torch.nn.functional.linear(x, W, b) + r, (N,), g, beta, 1e-12)
    assert_close(y, peer, ref, "add_layernorm of partial sums")
    y_ref = add_layernorm(tile_linear_partials(x, w, backend="reference"), r, g, beta, 1e-12, backend="reference",
                          x_bias=b)
    assert y_ref.dtype == dtype
    assert_close(y_ref, peer, ref, "reference path")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,I", [(1, 64, 128), (17, 96, 200), (70, 64, 96)])
@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("use_tma", [True, False])
def test_fused_ffn_into_add_layernorm(dtype, M, D, I, act, use_tma, monkeypatch):
    """act(x W1^T + b1) W2^T as partial sums in one launch, then add+LN with b2 and the residual: the whole post-LN
    FFN block. I and D not multiples of the slice and chunk widths. Both load forms: tile_linear.USE_TMA switches
    the fused FFN too."""
    monkeypatch.setattr(importlib.import_module("etformer.kernels.tile_linear"), "USE_TMA", use_tma)
    x = torch.randn(M, D, device=DEVICE, dtype=dtype)
    w1 = (torch.randn(I, D, device=DEVICE) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(D, I, device=DEVICE) / math.sqrt(I)).to(dtype)
    b1, b2 = torch.randn(I, device=DEVICE, dtype=dtype), torch.randn(D, device=DEVICE, dtype=dtype)
    g, beta = torch.rand(D, device=DEVICE, dtype=dtype) + 0.5, torch.randn(D, device=DEVICE, dtype=dtype)
    ws = fused_ffn_partials(x, w1, b1, w2, act, backend="triton")
    assert ws.dtype == torch.float32 and ws.shape[1:] == (M, D)
    fa = torch.nn.functional.gelu if act == "gelu" else torch.relu

    def ffn(xx, a, bb1, c):
        return torch.nn.functional.linear(fa(torch.nn.functional.linear(xx, a, bb1)), c)

    ref = ffn(x.double(), w1.double(), b1.double(), w2.double())
    assert_close(ws.sum(0), ffn(x, w1, b1, w2).float(), ref, "fused FFN partial sums")
    y = torch.full((M, D), float("nan"), device=DEVICE, dtype=dtype)
    add_layernorm(ws, x, g, beta, 1e-12, out=y, backend="triton", x_bias=b2)
    ln_ref = torch.nn.functional.layer_norm(ref + b2.double() + x.double(), (D,), g.double(), beta.double(), 1e-12)
    ln_peer = torch.nn.functional.layer_norm(ffn(x, w1, b1, w2) + b2 + x, (D,), g, beta, 1e-12)
    assert_close(y, ln_peer, ln_ref, "fused FFN block")


def test_fused_ffn_bad_inputs():
    x = torch.randn(4, 64, device=DEVICE)
    w1, w2 = torch.randn(96, 64, device=DEVICE), torch.randn(64, 96, device=DEVICE)
    with pytest.raises(EtformerError, match="do not chain"):
        fused_ffn_partials(x, w1, None, w2.t().contiguous(), backend="triton")
    with pytest.raises(EtformerError, match="must match"):
        fused_ffn_partials(x, w1.half(), None, w2, backend="triton")
    with pytest.raises(EtformerError, match="b1"):
        fused_ffn_partials(x, w1, torch.zeros(5, device=DEVICE), w2, backend="triton")
    with pytest.raises(EtformerError, match="activation"):
        fused_ffn_partials(x, w1, None, w2, "swish", backend="triton")


def test_partial_sums_bad_inputs():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(EtformerError, match="split"):
        tile_linear_partials(x, torch.randn(8, 64, device=DEVICE), split=0, backend="triton")
    with pytest.raises(EtformerError, match="features"):
        tile_linear_partials(x, torch.randn(8, 32, device=DEVICE), backend="triton")
    with pytest.raises(EtformerError, match="TileSparseWeight or a dense"):
        tile_linear(x, [[1.0]], backend="triton")
    g = torch.ones(8, device=DEVICE)
    with pytest.raises(EtformerError, match="float32"):
        add_layernorm(torch.zeros(2, 4, 8, device=DEVICE, dtype=torch.float16), None, g, g)
    with pytest.raises(EtformerError, match="x_bias"):
        add_layernorm(torch.zeros(2, 4, 8, device=DEVICE), None, g, g, x_bias=torch.ones(7, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,res", [(1, 384, True), (17, 768, True), (5, 100, False), (64, 1024, True)])
@pytest.mark.parametrize("launch", list(LN_LAUNCHES))
def test_add_layernorm(dtype, M, N, res, launch, monkeypatch):
    monkeypatch.setattr(importlib.import_module("etformer.kernels.layernorm"), "MULTI_ROW_LAUNCH", LN_LAUNCHES[launch])
    x = torch.randn(M, N, device=DEVICE, dtype=dtype) * 3 + 1
    r = torch.randn(M, N, device=DEVICE, dtype=dtype) if res else None
    w = torch.randn(N, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    y = torch.full_like(x, float("nan"))
    add_layernorm(x, r, w, b, 1e-12, out=y, backend="triton")
    h64 = x.double() + (r.double() if res else 0)
    ref = torch.nn.functional.layer_norm(h64, (N,), w.double(), b.double(), 1e-12)
    peer = torch.nn.functional.layer_norm(x + r if res else x, (N,), w, b, 1e-12)
    assert_close(y, peer, ref, "add_layernorm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,types", [(1, 64, "given"), (17, 96, "none"), (33, 384, "zero"), (5, 768, "given")])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_embed_layernorm(dtype, T, d, types, idx_dtype):
    """Gathers + sum + LayerNorm in one launch against fp64 math and PyTorch's own ops at the same precision: with
    token types given, with the model's type table but no types (type 0), and without a type table."""
    V, P, NT = 50, 40, 3
    word = torch.randn(V, d, device=DEVICE, dtype=dtype)
    pos = torch.randn(P, d, device=DEVICE, dtype=dtype)
    typ = torch.randn(NT, d, device=DEVICE, dtype=dtype) if types != "none" else None
    w = torch.randn(d, device=DEVICE, dtype=dtype)
    b = torch.randn(d, device=DEVICE, dtype=dtype)
    ids = torch.randint(0, V, (T,), device=DEVICE).to(idx_dtype)
    positions = torch.randint(0, P, (T,), device=DEVICE).to(idx_dtype)
    tt = torch.randint(0, NT, (T,), device=DEVICE).to(idx_dtype) if types == "given" else None
    y = torch.full((T, d), float("nan"), device=DEVICE, dtype=dtype)
    embed_layernorm(ids, positions, word, pos, w, b, 1e-12, token_types=tt, type_table=typ, out=y, backend="triton")

    def summed(cast):
        h = cast(word)[ids.long()] + cast(pos)[positions.long()]
        if typ is not None:
            h = h + cast(typ)[tt.long() if tt is not None else torch.zeros(T, dtype=torch.long, device=DEVICE)]
        return h

    ref = torch.nn.functional.layer_norm(summed(torch.Tensor.double), (d,), w.double(), b.double(), 1e-12)
    peer = torch.nn.functional.layer_norm(summed(lambda t: t), (d,), w, b, 1e-12)
    assert_close(y, peer, ref, "embed_layernorm")
    assert_close(embed_layernorm_reference(ids, positions, word, pos, w, b, 1e-12, tt, typ), peer, ref, "reference")


def test_embed_layernorm_out_of_range_and_bad_inputs():
    """An id outside its table makes its row NaN (never read out of bounds), the other rows are unchanged; the
    launcher refuses mismatched inputs."""
    d = 64
    word = torch.randn(10, d, device=DEVICE)
    pos = torch.randn(8, d, device=DEVICE)
    typ = torch.randn(2, d, device=DEVICE)
    w, b = torch.ones(d, device=DEVICE), torch.zeros(d, device=DEVICE)
    ids = torch.tensor([1, 10, 3, -1, 4, 5], device=DEVICE)
    positions = torch.tensor([0, 1, 8, 3, 4, 5], device=DEVICE)
    tt = torch.tensor([0, 1, 0, 1, 2, 1], device=DEVICE)
    for backend in ("triton", "reference"):
        y = embed_layernorm(ids, positions, word, pos, w, b, token_types=tt, type_table=typ, backend=backend)
        bad = torch.tensor([False, True, True, True, True, False], device=DEVICE)  # id 10, position 8, id -1, type 2
        assert torch.isnan(y[bad]).all(), backend
        assert torch.isfinite(y[~bad]).all(), backend
        good = embed_layernorm(ids[~bad], positions[~bad], word, pos, w, b, token_types=tt[~bad], type_table=typ,
                               backend=backend)
        assert torch.allclose(y[~bad], good), backend
    with pytest.raises(EtformerError, match="positions has"):
        embed_layernorm(ids, positions[:3], word, pos, w, b)
    with pytest.raises(EtformerError, match="without a type_table"):
        embed_layernorm(ids, positions, word, pos, w, b, token_types=tt)
    with pytest.raises(EtformerError, match="features"):
        embed_layernorm(ids, positions, word, pos[:, :32], w, b)
    with pytest.raises(EtformerError, match="ids must be one of"):
        embed_layernorm(ids.float(), positions, word, pos, w, b)
    with pytest.raises(EtformerError, match="weight has"):
        embed_layernorm(ids, positions, word, pos, w[:5], b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,D,keep", [(2, 64, 0.5), (4, 32, 0.25), (2, 64, 1.0), (1, 128, 0.1)])
def test_pruned_v_attention(dtype, H, D, keep):
    d_in, lens = 64, [17, 1, 30]
    x = torch.randn(sum(lens), d_in, device=DEVICE, dtype=torch.float64)
    Wqk = torch.randn(2 * H * D, d_in, device=DEVICE, dtype=torch.float64) / 8
    Wv = torch.randn(H * D, d_in, device=DEVICE, dtype=torch.float64) / 8
    Wv[torch.rand(H * D, device=DEVICE) >= keep] = 0  # whole rows of W_V pruned
    bv = torch.randn(H * D, device=DEVICE, dtype=torch.float64)
    cv, wc, bc = CompactV.from_weight(Wv, bv, H)
    assert cv.width % 16 == 0 and cv.width <= max(16, D)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    full = torch.cat([x @ Wqk.t(), x @ Wv.t() + bv], 1)
    compact = torch.cat([x @ Wqk.t(), x @ wc.t() + bc], 1).to(dtype)
    y = pruned_v_attention(compact, cu, max(lens), cv, backend="triton")
    ref = attention_reference(full, cu, H, D)
    peer = _sdpa_peer(full.to(dtype), cu, H, D, D, False, None)
    assert_close(y, peer, ref, "pruned-V")
    pruned_cols = cv.const_cols
    if pruned_cols.numel():  # the constant columns are exactly the V bias
        assert torch.equal(y[:, pruned_cols], bv[pruned_cols].to(dtype).expand(y.shape[0], -1))


def test_head_blocks_v_never_narrower_than_qk_on_the_gpu():
    """The launchers' V block: on the GPU at least the Q/K block (narrower ones faulted in the one-pass kernel on the
    H200), in the interpreter the narrowest power of two from MIN_BLOCK_DV."""
    from etformer.kernels.attention import MIN_BLOCK_DV, head_blocks

    def v_block(dv, d, on_gpu):
        return head_blocks(d, dv, on_gpu)[1]

    assert [v_block(dv, 64, True) for dv in (16, 32, 48, 64)] == [64, 64, 64, 64]
    assert v_block(32, 32, True) == 32 and v_block(16, 128, True) == 128 and v_block(200, 200, True) == 256
    assert [v_block(dv, 64, False) for dv in (8, 16, 32, 48)] == [max(MIN_BLOCK_DV, 8), 16, 32, 64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("DV", [16, 32])
def test_narrow_v_heads_at_one_pass_lengths(dtype, DV):
    """Compact V narrower than the Q/K heads at lengths the one-pass kernel takes with 128-key blocks (a V block of
    16 or 32 columns there faulted on the H200; the launcher now pads it to MIN_BLOCK_DV on the GPU)."""
    H, D, lens = 2, 64, [128, 65, 128]
    T = sum(lens)
    qkv = torch.randn(T, 2 * H * D + H * DV, device=DEVICE, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    y = attention(qkv.to(dtype), cu, max(lens), H, D, v_head_dim=DV, backend="triton")
    assert y.shape == (T, H * DV)
    ref = attention_reference(qkv, cu, H, D, v_head_dim=DV)
    peer = _sdpa_peer(qkv.to(dtype), cu, H, D, DV, False, None)
    assert_close(y, peer, ref, f"attention DV={DV}")


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("M", [16, 128, 1024])
def test_tile_linear_captures_in_cuda_graph(M):
    """Both the split-K (small M) and the direct path must launch without reading anything back from the GPU."""
    W = _sparse_weight(256, 128, (64, 64), 0.5, torch.float16)
    w = TileSparseWeight.from_dense(W, (64, 64))
    x = torch.randn(M, 128, device="cuda", dtype=torch.float16)
    for persistent in (False, True):
        tile_linear(x, w, persistent=persistent)  # compile (and build the step lists) outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = tile_linear(x, w, persistent=persistent)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert_close(y, torch.nn.functional.linear(x, W), x.double() @ W.double().t(), f"graphed {persistent}")


def test_flat_schedule_visits_every_tile_once():
    """The persistent kernel's step lists: each (row block, block-row) item with tiles appears in exactly one
    program, as a run of its own tiles in order with the last step flagged; items without tiles are in the
    epilogue-only list exactly once; programs' step counts differ by at most one item's."""
    import importlib
    tl_mod = importlib.import_module("etformer.kernels.tile_linear")
    torch.manual_seed(3)
    W = torch.randn(20 * 16, 12 * 16)
    keep = torch.rand(20, 12) < torch.linspace(0.05, 0.95, 20)[:, None]
    keep[4] = False
    W = W * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)
    w = TileSparseWeight.from_dense(W, (16, 16))
    M, bm, programs = 1000, 64, 7
    step_ptr, steps, ends, empty, P = tl_mod._flat_schedule(w, M, bm, programs)
    step_ptr, steps, ends, empty = (t.cpu().tolist() for t in (step_ptr, steps, ends, empty))
    counts, row_ptr, col_idx = w.tiles_per_row.tolist(), w.row_ptr.tolist(), w.col_idx.tolist()
    num_r, num_m = len(counts), -(-M // bm)
    assert P == programs and step_ptr[0] == 0 and step_ptr[-1] == len(steps) == num_m * w.nnz_tiles
    seen = {}
    for p in range(P):
        run = steps[step_ptr[p]:step_ptr[p + 1]]
        i = 0
        while i < len(run):
            code = run[i][0] if run[i][0] >= 0 else -1 - run[i][0]
            r, n = code % num_r, counts[code % num_r]
            assert code not in seen and n > 0
            seen[code] = p
            for k in range(n):
                c, t, kc = run[i + k]
                assert (c < 0) == (k == n - 1) and (c if c >= 0 else -1 - c) == code
                assert t == row_ptr[r] + k and kc == col_idx[t]
            i += n
    full = {m * num_r + r for m in range(num_m) for r in range(num_r) if counts[r]}
    assert set(seen) == full
    assert sorted(empty[:ends[-1]]) == sorted(m * num_r + r for m in range(num_m) for r in range(num_r)
                                              if not counts[r])
    per = [step_ptr[p + 1] - step_ptr[p] for p in range(P)]
    assert max(per) - min(per) <= max(counts)


def test_tile_linear_persistent_bad_inputs():
    x = torch.randn(8, 64, dtype=torch.float16)
    W = torch.randn(32, 64, dtype=torch.float16)
    with pytest.raises(EtformerError, match="TileSparseWeight"):
        tile_linear(x, W, persistent=True)
    with pytest.raises(EtformerError, match="exclusive"):
        tile_linear(x, TileSparseWeight.from_dense(W, (16, 16)), persistent=True, split_k=2)


def test_tile_linear_tma_eligibility():
    """Descriptors are used only where bulk copies are legal: aligned rows and at least one tile."""
    import importlib
    tl_mod = importlib.import_module("etformer.kernels.tile_linear")
    if tl_mod.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    w = TileSparseWeight.from_dense(_sparse_weight(64, 64, (32, 32), 1.0, torch.float16), (32, 32))
    x = torch.randn(8, 64, device=DEVICE, dtype=torch.float16)
    if DEVICE == "cpu":
        assert tl_mod._tma_ok(x, w)
    wide = torch.randn(8, 72, device=DEVICE, dtype=torch.float16)
    assert not tl_mod._tma_ok(wide[:, 1:65], w)  # base 2 bytes off a 16-byte boundary
    empty = TileSparseWeight.from_dense(torch.zeros(64, 64, device=DEVICE, dtype=torch.float16), (32, 32))
    assert not tl_mod._tma_ok(x, empty)


def test_tile_linear_launch_table_choice():
    """The narrow entry serves matrices of few block-rows (the output projection, FFN-out) at up to 4096 rows, at
    every density; wide ones and 16384 rows keep the bucket's launch."""
    import importlib
    tl_mod = importlib.import_module("etformer.kernels.tile_linear")
    narrow = tl_mod.TUNED_TMA_NARROW[((128, 64), 4096)]
    bucket = tl_mod.TUNED_TMA[((128, 64), 4096)]
    assert tl_mod._launch_params(4096, (128, 64), True, True, 768) == narrow != bucket  # FFN-out, O
    assert tl_mod._launch_params(4096, (128, 64), True, True, 8 * 128) == narrow
    assert tl_mod._launch_params(4096, (128, 64), True, True, 8 * 128 + 1) == bucket
    assert tl_mod._launch_params(4096, (128, 64), True, True, 2304) == bucket  # QKV
    assert tl_mod._launch_params(4096, (128, 64), False, False, 768) == tl_mod.TUNED[((128, 64), 4096)]  # no TMA
    assert tl_mod._launch_params(16384, (128, 64), True, True, 768) == tl_mod.TUNED_TMA[((128, 64), 16384)]


def test_tile_linear_auto_split_rule():
    """Split-K is taken by itself only for a TileSparseWeight on the GPU at few rows, long K, nearly dense."""
    import importlib
    from types import SimpleNamespace
    tl_mod = importlib.import_module("etformer.kernels.tile_linear")
    W = torch.randn(96, 2048)
    dense_w = TileSparseWeight.from_dense(W, (32, 64))
    quarter = TileSparseWeight.from_dense(_sparse_weight(96, 2048, (32, 64), 0.2, torch.float32), (32, 64))
    short = TileSparseWeight.from_dense(torch.randn(96, 768), (32, 64))
    gpu = lambda m: SimpleNamespace(is_cuda=True, shape=(m, 2048))  # noqa: E731
    assert tl_mod._auto_split_k(gpu(128), dense_w) == tl_mod.SPLIT_AUTO
    assert tl_mod._auto_split_k(gpu(129), dense_w) == 1
    assert quarter.density < tl_mod.SPLIT_AUTO_MIN_DENSITY and tl_mod._auto_split_k(gpu(64), quarter) == 1
    assert tl_mod._auto_split_k(SimpleNamespace(is_cuda=True, shape=(64, 768)), short) == 1
    assert tl_mod._auto_split_k(gpu(64), W) == 1  # a dense tensor (the small-batch path) keeps its launch
    assert tl_mod._auto_split_k(torch.randn(64, 2048), dense_w) == 1  # the interpreter


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_linear_long_k_few_rows(dtype):
    """A long-K, dense tile weight at few rows (on the GPU: the automatic split-K), with bias, GELU and residual."""
    _check_into_slice(dtype, 9, 2048, 256, (32, 64), "gelu", 8, "long K, few rows", density=1.0)  # 7 of 8 rows kept


def _layer_chain(x, ws, ln, H, D, cu, rounds):
    """A post-LN layer's kernels on dense weights, `rounds` times: QKV, attention, O partials + add&LN, FFN-in with
    GELU, FFN-out partials + add&LN (the small-batch path's launches, each consuming the one before)."""
    wqkv, wo, w1, w2 = ws
    for _ in range(rounds):
        qkv = tile_linear(x, wqkv)
        ctx = attention(qkv, cu, x.shape[0], H, D)
        h = add_layernorm(tile_linear_partials(ctx, wo), x, ln[0], ln[1])
        f = tile_linear(h, w1, activation="gelu")
        x = add_layernorm(tile_linear_partials(f, w2), h, ln[0], ln[1])
    return x


@pytest.mark.skipif(DEVICE != "cuda", reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("graphed", [False, True])
def test_pdl_and_prefetch_change_nothing(graphed):
    """Launching every kernel with programmatic dependent launch (each waits for its predecessor inside the kernel)
    and prefetching weights to L2 must give bit-identical results to plain launches: a missing wait would read a
    buffer before its producer finished, and the chain below reads every output right after it is written."""
    import importlib
    kc = importlib.import_module("etformer.kernels._common")
    tl_mod = importlib.import_module("etformer.kernels.tile_linear")
    torch.manual_seed(0)
    d, H, D, M = 256, 4, 64, 128
    mk = lambda n, k: (torch.randn(n, k, device="cuda") / math.sqrt(k)).half()  # noqa: E731
    ws = (mk(3 * d, d), mk(d, d), mk(4 * d, d), mk(d, 4 * d))
    ln = (torch.rand(d, device="cuda").half() + 0.5, torch.randn(d, device="cuda").half() * 0.1)
    cu = torch.tensor([0, 50, M], device="cuda", dtype=torch.int32)
    x0 = torch.randn(M, d, device="cuda").half()
    saved = kc.USE_PDL, tl_mod.PREFETCH_MAX_ROWS
    outs = []
    try:
        for pdl, pre in ((False, 0), (True, 1 << 20)):
            kc.USE_PDL, tl_mod.PREFETCH_MAX_ROWS = pdl, pre
            extras = tl_mod._extras(x0, tl_mod._plan(x0, ws[0], None, None))
            assert extras["PDL"] == (pdl and kc.HAS_PDL) and (extras["PREFETCH"] > 0) == (pre > 0)
            run = lambda: _layer_chain(x0, ws, ln, H, D, cu, 6)  # noqa: E731
            if graphed:
                run()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    y = run()
                g.replay()
            else:
                y = run()
            torch.cuda.synchronize()
            outs.append(y.clone())
    finally:
        kc.USE_PDL, tl_mod.PREFETCH_MAX_ROWS = saved
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def test_pdl_off_without_a_gpu():
    """On the CPU (the interpreter) nothing is launched with PDL and nothing is prefetched."""
    import importlib
    kc = importlib.import_module("etformer.kernels._common")
    tl_mod = importlib.import_module("etformer.kernels.tile_linear")
    x = torch.randn(8, 64)
    extras = tl_mod._extras(x, tl_mod._plan(x, torch.randn(32, 64), None, None))
    assert not kc.pdl_on(x) and extras["PDL"] is False and extras["PREFETCH"] == 0
    assert "launch_pdl" not in extras
