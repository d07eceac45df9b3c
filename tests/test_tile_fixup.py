"""Two programs per work item in the grid tile kernel (tile_linear(fixup=True)): each runs half of the item's K loop
and the second to finish adds the first's fp32 sum and runs the epilogue. Against an fp64 reference on fresh random
inputs, through the interpreter on the CPU (fp32, fp16) and on a GPU (fp16, bf16), with every epilogue; the result is
the same from call to call, and every arrival counter is back at zero after a launch."""
import importlib
import math

import pytest
import torch

from etformer.errors import EtformerError
from etformer.kernels import DeferredLN, tile_linear
from etformer.kernels.tile_linear import row_stats_reference
from etformer.sparse import TileSparseWeight
from kernel_utils import CUDA, DEVICE, DTYPES, INTERPRET, assert_close, needs_triton

TL = importlib.import_module("etformer.kernels.tile_linear")
pytestmark = needs_triton


def _weight(out_f, in_f, tile, density, dtype, empty_row=True):
    w = torch.randn(out_f, in_f, device=DEVICE) / math.sqrt(in_f)
    nbr, nbc = -(-out_f // tile[0]), -(-in_f // tile[1])
    keep = torch.rand(nbr, nbc, device=DEVICE) < density
    if nbr > 1 and empty_row:
        keep[1] = False  # a block-row with no kept tile: both halves have nothing to add
    if nbr > 2:
        keep[2] = False
        keep[2, 0] = True  # one kept tile: one half has it, the other none
    full = keep.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:out_f, :in_f]
    return (w * full).to(dtype)


def _counters_clear():
    for buf in TL._FIX_EAGER.values():
        assert int(buf.abs().sum()) == 0, "an arrival counter was left non-zero"


def _ref(x, W, b, act, r):
    y = x.double() @ W.double().t() + b.double()
    y = {None: lambda z: z, "gelu": torch.nn.functional.gelu, "relu": torch.relu}[act](y)
    return y if r is None else y + r.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,tile,density,act,res", [
    (1, 64, 96, (16, 16), 0.5, None, False),
    (17, 448, 192, (64, 64), 0.7, "gelu", True),     # 7 K tiles: halves of 4 and 3
    (77, 256, 384, (128, 64), 0.5, "relu", True),
    (40, 80, 100, (32, 32), 1.0, "gelu", False),    # neither dim a multiple of the tile
    (16, 64, 64, (16, 64), 0.0, None, True),        # no tile at all
])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_fixup_matches_reference(dtype, M, K, N, tile, density, act, res, tma):
    W = _weight(N, K, tile, density, dtype)
    w = TileSparseWeight.from_dense(W, tile)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    r = torch.randn(M, N, device=DEVICE, dtype=dtype) if res else None
    y = tile_linear(x, w, b, activation=act, residual=r, backend="triton", tma=tma, fixup=True)
    peer = tile_linear(x, w, b, activation=act, residual=r, backend="reference")
    assert_close(y, peer, _ref(x, W, b, act, r), f"fixup {tile} d={density}")
    again = tile_linear(x, w, b, activation=act, residual=r, backend="triton", tma=tma, fixup=True)
    assert torch.equal(y, again), "two programs an item gave different results from one call to the next"
    _counters_clear()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixup_column_slice_and_dense_weight(dtype):
    """Into a column slice of a wider output; and a dense [N, K] weight read in place (the small-batch path)."""
    M, K, N = 50, 192, 128
    W = _weight(N, K, (64, 64), 0.6, dtype)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    wide = torch.full((M, N + 128), 7.0, device=DEVICE, dtype=dtype)
    tile_linear(x, TileSparseWeight.from_dense(W, (64, 64)), b, out=wide, out_col=64, backend="triton", fixup=True)
    ref = _ref(x, W, b, None, None)
    assert_close(wide[:, 64:64 + N], tile_linear(x, W, b, backend="reference"), ref, "slice")
    assert bool((wide[:, :64] == 7).all() and (wide[:, 64 + N:] == 7).all()), "wrote outside its column slice"
    y = tile_linear(x, W, b, activation="gelu", backend="triton", fixup=True)
    assert_close(y, tile_linear(x, W, b, activation="gelu", backend="reference"), _ref(x, W, b, "gelu", None),
                 "dense weight")
    _counters_clear()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixup_with_deferred_layernorm(dtype):
    """The epilogue after the fixup: a normalised residual and the output's row moments (the engine's FFN-out)."""
    M, K, N = 70, 384, 256
    W = _weight(N, K, (64, 64), 0.6, dtype)
    w = TileSparseWeight.from_dense(W, (64, 64))
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    r = (torch.randn(M, N, device=DEVICE) * 2 + 1).to(dtype)
    g = (1 + 0.3 * torch.randn(N, device=DEVICE)).to(dtype)
    be = (0.2 * torch.randn(N, device=DEVICE)).to(dtype)
    rn = DeferredLN(row_stats_reference(r).contiguous(), N, 1e-12, g, be)
    y, st = tile_linear(x, w, b, residual=r, residual_norm=rn, row_stats=True, backend="triton", fixup=True)
    ln = torch.nn.functional.layer_norm(r.double(), (N,), g.double(), be.double(), 1e-12)
    ref = x.double() @ W.double().t() + b.double() + ln
    peer = tile_linear(x, w, b, residual=r, residual_norm=rn, backend="reference")
    assert_close(y, peer, ref, "fixup + residual LayerNorm")
    s = st.double().sum(1)
    yd = y.double()
    assert torch.allclose(s[:, 0], yd.sum(1), rtol=1e-4, atol=1e-3)
    assert torch.allclose(s[:, 1], (yd * yd).sum(1), rtol=1e-4, atol=1e-3)
    _counters_clear()


def test_fixup_exclusive_forms():
    x = torch.randn(8, 64, device=DEVICE or "cpu")
    w = TileSparseWeight.from_dense(torch.randn(64, 64, device=x.device), (32, 32))
    with pytest.raises(EtformerError, match="fixup"):
        tile_linear(x, w, persistent=True, fixup=True, backend="triton")
    with pytest.raises(EtformerError, match="fixup"):
        tile_linear(x, w, split_k=2, fixup=True, backend="triton")


def test_fixup_auto_rule(monkeypatch):
    """FIXUP_MODE "auto" takes FIXUP_AUTO's first matching entry and its launch, on a GPU only; a given config or
    fixup= wins over it."""
    x = torch.empty(4096, 3072, device=DEVICE)
    w = TileSparseWeight.from_dense(torch.randn(768, 3072, device=DEVICE), (128, 64))
    monkeypatch.setattr(TL, "FIXUP_MODE", "auto")
    monkeypatch.setattr(TL, "FIXUP_AUTO", ((2048, 8, (64, 4, 4)), (4096, 8, (128, 4, 4))))
    want = (True, (128, 4, 4)) if x.is_cuda else (False, None)
    assert TL._fixup_plan(None, x, w, 4096, 768, None) == want
    assert TL._fixup_plan(None, x, w, 8192, 768, None) == (False, None)
    assert TL._fixup_plan(None, x, w, 4096, 768, (64, 4, 5)) == (False, (64, 4, 5))
    assert TL._fixup_plan(False, x, w, 4096, 768, None) == (False, None)
    monkeypatch.setattr(TL, "FIXUP_MODE", "on")
    assert TL._fixup_plan(None, x, w, 4096, 768, None) == (True, None)


@pytest.mark.skipif(not CUDA or INTERPRET, reason="CUDA graphs need a GPU")
def test_fixup_in_cuda_graph():
    """Captured inside fixup_scope the launch takes the graph's counters and replays to the eager result, bit for
    bit; captured outside one it runs without the fixup (no buffer may be made during a capture) and is still right."""
    from etformer.engine.encoder import capture_graph
    dtype = torch.float16
    W = _weight(768, 3072, (128, 64), 0.5, dtype)
    w = TileSparseWeight.from_dense(W, (128, 64))
    x = torch.randn(4096, 3072, device="cuda", dtype=dtype)
    b = torch.randn(768, device="cuda", dtype=dtype)
    eager = tile_linear(x, w, b, fixup=True)
    graph, out = capture_graph(lambda: tile_linear(x, w, b, fixup=True))
    assert int(graph.fixup_counters.abs().sum()) == 0
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert int(graph.fixup_counters.abs().sum()) == 0
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        out2 = tile_linear(x, w, b, fixup=True)
    g2.replay()
    torch.cuda.synchronize()
    assert_close(out2, tile_linear(x, w, b, fixup=False), _ref(x, W, b, None, None), "graph without fixup_scope")
