"""Deferred LayerNorm in the tile kernels: a LayerNorm folded into the next weight (fold_layernorm + x_norm), a
residual normalised on load (residual_norm), and the row moments a GEMM writes for them (row_stats). Each against
plain LayerNorm-then-linear math in fp64, on fresh random inputs; through the interpreter on the CPU (fp32, fp16) and
on a GPU (fp16, bf16)."""
import math

import pytest
import torch

from etformer.errors import EtformerError
from etformer.kernels import DeferredLN, fold_layernorm, tile_linear
from etformer.kernels.tile_linear import row_stats_reference
from etformer.sparse import TileSparseWeight
from kernel_utils import DEVICE, DTYPES, assert_close, needs_triton

pytestmark = needs_triton


def _weight(out_f, in_f, tile, density, dtype):
    w = torch.randn(out_f, in_f, device=DEVICE) / math.sqrt(in_f)
    nbr, nbc = -(-out_f // tile[0]), -(-in_f // tile[1])
    keep = torch.rand(nbr, nbc, device=DEVICE) < density
    if nbr > 1:
        keep[1] = False  # a block-row with no kept tile
    full = keep.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:out_f, :in_f]
    return (w * full).to(dtype)


def _ln64(x, g, b, eps):
    return torch.nn.functional.layer_norm(x.double(), (x.shape[1],), g.double(), b.double(), eps)


def _raw(M, K, dtype):
    """An un-normalised input with a row mean and scale far from 0 and 1, as a residual stream has."""
    return (torch.randn(M, K, device=DEVICE) * 2.0 + torch.randn(M, 1, device=DEVICE)).to(dtype)


def _stats(x):
    return row_stats_reference(x).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,tile,density,act", [
    (1, 64, 96, (16, 16), 0.5, None),
    (17, 96, 64, (32, 32), 0.6, "gelu"),
    (65, 128, 128, (64, 64), 1.0, "relu"),
    (40, 80, 100, (32, 32), 0.5, "gelu"),   # neither dim a multiple of the tile
    (16, 64, 64, (16, 64), 0.0, None),      # no tile at all: the folded bias only
])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_folded_input(dtype, M, K, N, tile, density, act, tma):
    """tile_linear(x, fold_layernorm(W, b, gamma, beta), x_norm) = act(LN(x) W^T + b)."""
    W = _weight(N, K, tile, density, dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    g = (1 + 0.3 * torch.randn(K, device=DEVICE)).to(dtype)
    be = (0.2 * torch.randn(K, device=DEVICE)).to(dtype)
    x = _raw(M, K, dtype)
    eps = 1e-12
    f = fold_layernorm(TileSparseWeight.from_dense(W, tile), b, g, be)
    assert f.weight.nnz_tiles == TileSparseWeight.from_dense(W, tile).nnz_tiles
    y = tile_linear(x, f.weight, f.bias, activation=act, x_norm=DeferredLN(_stats(x), K, eps), x_colsum=f.colsum,
                    backend="triton", tma=tma)
    act_fn = {None: lambda z: z, "gelu": torch.nn.functional.gelu, "relu": torch.relu}[act]
    ref = act_fn(_ln64(x, g, be, eps) @ W.double().t() + b.double())
    h = torch.nn.functional.layer_norm(x.float(), (K,), g.float(), be.float(), eps).to(dtype)
    peer = act_fn(torch.nn.functional.linear(h, W, b))  # PyTorch: LN rounded to dtype, then the linear
    assert_close(y, peer, ref, f"folded {tile} d={density}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,tile,P", [(33, 64, 96, (32, 32), 1), (70, 96, 128, (64, 32), 3)])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
def test_residual_norm_and_row_stats(dtype, M, K, N, tile, P, tma):
    """Y = X W^T + b + LN(R), with LN(R)'s moments from P partial blocks; Y's row moments come back per column block
    and add up to its rows' sums and sums of squares."""
    W = _weight(N, K, tile, 0.6, dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    r = _raw(M, N, dtype)
    g = (1 + 0.3 * torch.randn(N, device=DEVICE)).to(dtype)
    be = (0.2 * torch.randn(N, device=DEVICE)).to(dtype)
    eps = 1e-5
    parts = torch.stack([_stats(c)[:, 0] for c in r.chunk(P, dim=1)], 1).contiguous()  # [M, P, 2]
    y, st = tile_linear(x, TileSparseWeight.from_dense(W, tile), b, residual=r,
                        residual_norm=DeferredLN(parts, N, eps, g, be), row_stats=True, backend="triton", tma=tma)
    ref = x.double() @ W.double().t() + b.double() + _ln64(r, g, be, eps)
    peer = torch.nn.functional.linear(x, W, b) + torch.nn.functional.layer_norm(r.float(), (N,), g.float(),
                                                                                   be.float(), eps).to(dtype)
    assert_close(y, peer, ref, "residual_norm")
    assert st.dtype == torch.float32 and st.shape[0] == M and st.shape[2] == 2
    want = _stats(y)[:, 0]
    torch.testing.assert_close(st.sum(1), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_post_ln_layer_chain(dtype):
    """A post-LN block with its LayerNorms deferred, as the engine runs it at scale: h1 = LN1(a Wo^T + bo + h0),
    out = LN2(gelu(h1 W1^T + b1) W2^T + b2 + h1), with h1 never written, against the same math in fp64."""
    M, d, di, tile = 75, 96, 192, (32, 32)
    eps = 1e-12
    Wo, W1, W2 = (_weight(n, k, tile, 0.6, dtype) for n, k in ((d, d), (di, d), (d, di)))
    bo, b1, b2 = (torch.randn(n, device=DEVICE, dtype=dtype) * 0.1 for n in (d, di, d))
    g1, be1, g2, be2 = ((1 + 0.2 * torch.randn(d, device=DEVICE)).to(dtype) if i % 2 == 0 else
                        (0.1 * torch.randn(d, device=DEVICE)).to(dtype) for i in range(4))
    a = torch.randn(M, d, device=DEVICE, dtype=dtype)
    h0 = torch.randn(M, d, device=DEVICE, dtype=dtype)
    ts = lambda W: TileSparseWeight.from_dense(W, tile)  # noqa: E731
    x1, s1 = tile_linear(a, ts(Wo), bo, residual=h0, row_stats=True, backend="triton")
    n1 = DeferredLN(s1, d, eps, g1, be1)
    f1 = fold_layernorm(ts(W1), b1, g1, be1)
    f = tile_linear(x1, f1.weight, f1.bias, activation="gelu", x_norm=n1, x_colsum=f1.colsum, backend="triton")
    x2, s2 = tile_linear(f, ts(W2), b2, residual=x1, residual_norm=n1, row_stats=True, backend="triton")
    out = torch.nn.functional.layer_norm(x2.float(), (d,), g2.float(), be2.float(), eps)
    # the moments tile_linear returned give the same LayerNorm
    mean = s2.sum(1)[:, 0] / d
    var = s2.sum(1)[:, 1] / d - mean * mean
    out_s = (x2.float() - mean[:, None]) * torch.rsqrt(var + eps)[:, None] * g2.float() + be2.float()

    def chain(t, lin, ln):
        h1 = ln(lin(a.to(t), Wo.to(t), bo.to(t)) + h0.to(t), g1, be1)
        return ln(lin(torch.nn.functional.gelu(lin(h1, W1.to(t), b1.to(t))), W2.to(t), b2.to(t)) + h1, g2, be2)

    ln64 = lambda z, g, b: _ln64(z, g, b, eps)  # noqa: E731
    ref = chain(torch.float64, torch.nn.functional.linear, ln64)
    lnp = lambda z, g, b: torch.nn.functional.layer_norm(z.float(), (d,), g.float(), b.float(), eps).to(dtype)  # noqa
    peer = chain(dtype, torch.nn.functional.linear, lnp)
    assert_close(out.to(dtype), peer, ref, "deferred post-LN chain")
    assert_close(out_s.to(dtype), peer, ref, "deferred post-LN chain, returned moments")


def test_deferred_arguments_are_checked():
    dtype = DTYPES[0]
    W = _weight(64, 32, (32, 32), 1.0, dtype)
    w = TileSparseWeight.from_dense(W, (32, 32))
    x = torch.randn(8, 32, device=DEVICE, dtype=dtype)
    r = torch.randn(8, 64, device=DEVICE, dtype=dtype)
    g = torch.ones(64, device=DEVICE, dtype=dtype)
    st = _stats(x)
    with pytest.raises(EtformerError, match="go together"):
        tile_linear(x, w, x_norm=DeferredLN(st, 32, 1e-5), backend="triton")
    with pytest.raises(EtformerError, match="x_colsum"):
        tile_linear(x, w, x_norm=DeferredLN(st, 32, 1e-5), x_colsum=torch.zeros(63, device=DEVICE), backend="triton")
    with pytest.raises(EtformerError, match="x_norm.d"):
        tile_linear(x, w, x_norm=DeferredLN(st, 31, 1e-5), x_colsum=torch.zeros(64, device=DEVICE), backend="triton")
    with pytest.raises(EtformerError, match="stats"):
        tile_linear(x, w, x_norm=DeferredLN(st[:4], 32, 1e-5), x_colsum=torch.zeros(64, device=DEVICE),
                    backend="triton")
    with pytest.raises(EtformerError, match="fp32|float32"):
        tile_linear(x, w, x_norm=DeferredLN(st.to(dtype) if dtype != torch.float32 else st.double(), 32, 1e-5),
                    x_colsum=torch.zeros(64, device=DEVICE), backend="triton")
    with pytest.raises(EtformerError, match="without a residual"):
        tile_linear(x, w, residual_norm=DeferredLN(_stats(r), 64, 1e-5, g, g), backend="triton")
    with pytest.raises(EtformerError, match="weight and bias"):
        tile_linear(x, w, residual=r, residual_norm=DeferredLN(_stats(r), 64, 1e-5), backend="triton")
    with pytest.raises(EtformerError, match="eps"):
        tile_linear(x, w, residual=r, residual_norm=DeferredLN(_stats(r), 64, 0.0, g, g), backend="triton")
    with pytest.raises(EtformerError, match="split_k"):
        tile_linear(x, w, residual=r, row_stats=True, split_k=2, backend="triton")
    with pytest.raises(EtformerError, match="input features"):
        fold_layernorm(w, None, torch.ones(31, device=DEVICE, dtype=dtype), torch.ones(32, device=DEVICE, dtype=dtype))


def test_reference_path_matches_kernels():
    """The PyTorch path (what runs without a GPU) gives the same values and row moments as the kernel path."""
    dtype = DTYPES[0]
    W = _weight(96, 64, (32, 32), 0.6, dtype)
    w = TileSparseWeight.from_dense(W, (32, 32))
    x = _raw(20, 64, dtype)
    r = _raw(20, 96, dtype)
    g = (1 + 0.3 * torch.randn(96, device=DEVICE)).to(dtype)
    n = DeferredLN(_stats(r), 96, 1e-5, g, g * 0.1)
    y_k, s_k = tile_linear(x, w, residual=r, residual_norm=n, row_stats=True, backend="triton")
    y_r, s_r = tile_linear(x, w, residual=r, residual_norm=n, row_stats=True, backend="reference")
    assert s_r.shape == (20, 1, 2) and s_k.shape[1] == 3  # the reference sums whole rows, the kernel 32-column blocks
    torch.testing.assert_close(y_k.float(), y_r.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s_k.sum(1), s_r.sum(1), rtol=2e-3, atol=1e-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,act", [(1, 64, 96, "gelu"), (40, 80, 100, None), (70, 96, 128, "gelu")])
def test_folded_dense_weight(dtype, M, K, N, act):
    """The small-batch path's form: a dense weight read in place (DENSE_W), folded, with its bias (which the
    dense-weight kernel otherwise adds before the epilogue, where the fold's row scaling would scale it too)."""
    W = (torch.randn(N, K, device=DEVICE) / math.sqrt(K)).to(dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    g = (1 + 0.3 * torch.randn(K, device=DEVICE)).to(dtype)
    be = (0.2 * torch.randn(K, device=DEVICE)).to(dtype)
    x = _raw(M, K, dtype)
    eps = 1e-12
    f = fold_layernorm(W, b, g, be)
    assert isinstance(f.weight, torch.Tensor) and f.weight.shape == W.shape
    y = tile_linear(x, f.weight, f.bias, activation=act, x_norm=DeferredLN(_stats(x), K, eps), x_colsum=f.colsum,
                    backend="triton")
    act_fn = {None: lambda z: z, "gelu": torch.nn.functional.gelu}[act]
    ref = act_fn(_ln64(x, g, be, eps) @ W.double().t() + b.double())
    h = torch.nn.functional.layer_norm(x.float(), (K,), g.float(), be.float(), eps).to(dtype)
    assert_close(y, act_fn(torch.nn.functional.linear(h, W, b)), ref, "folded dense weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 33, 64])
@pytest.mark.parametrize("rows", [1, 2])
def test_small_path_deferred_chain(dtype, M, rows, monkeypatch):
    """A post-LN block as the small-batch path runs it with SMALL_DEFERRED_LN, on dense weights: h = a Wo^T + bo + x0
    (un-normalised, with its row moments), f = gelu(LN1(h) W1^T + b1) through the folded W1, then FFN-out's split-K
    partial sums into add_layernorm, which normalises the residual h itself: LN2(f W2^T + b2 + LN1(h)). Against
    the same math in fp64 and PyTorch's in the input dtype."""
    import importlib

    from etformer.kernels import add_layernorm
    from etformer.kernels.tile_linear import tile_linear_partials

    monkeypatch.setattr(importlib.import_module("etformer.kernels.layernorm"), "MULTI_ROW_LAUNCH",
                        ((1, rows, 4),) if rows > 1 else ())
    d, di, eps = 96, 192, 1e-12
    Wo, W1, W2 = ((torch.randn(n, k, device=DEVICE) / math.sqrt(k)).to(dtype) for n, k in ((d, d), (di, d), (d, di)))
    bo, b1, b2 = (torch.randn(n, device=DEVICE, dtype=dtype) * 0.1 for n in (d, di, d))
    g1, be1, g2, be2 = ((1 + 0.2 * torch.randn(d, device=DEVICE)).to(dtype) if i % 2 == 0 else
                        (0.1 * torch.randn(d, device=DEVICE)).to(dtype) for i in range(4))
    a = torch.randn(M, d, device=DEVICE, dtype=dtype)
    x0 = _raw(M, d, dtype)
    h, s = tile_linear(a, Wo, bo, residual=x0, row_stats=True, backend="triton")
    f1 = fold_layernorm(W1, b1, g1, be1)
    f = tile_linear(h, f1.weight, f1.bias, activation="gelu", x_norm=DeferredLN(s, d, eps), x_colsum=f1.colsum,
                    backend="triton")
    ws = tile_linear_partials(f, W2, split=3, backend="triton")
    out = add_layernorm(ws, h, g2, be2, eps, backend="triton", x_bias=b2, residual_ln=(g1, be1))
    assert out.dtype == dtype and out.shape == (M, d)

    def chain(t, ln):
        lin = torch.nn.functional.linear
        h1 = lin(a.to(t), Wo.to(t), bo.to(t)) + x0.to(t)
        n1 = ln(h1, g1, be1)
        return ln(lin(torch.nn.functional.gelu(lin(n1, W1.to(t), b1.to(t))), W2.to(t), b2.to(t)) + n1, g2, be2)

    ref = chain(torch.float64, lambda z, g, b: _ln64(z, g, b, eps))
    peer = chain(dtype, lambda z, g, b: torch.nn.functional.layer_norm(z.float(), (d,), g.float(), b.float(),
                                                                        eps).to(dtype))
    assert_close(out, peer, ref, "small-path deferred post-LN block")
    # the reference path of the same call agrees
    out_ref = add_layernorm(ws, h, g2, be2, eps, backend="reference", x_bias=b2, residual_ln=(g1, be1))
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2 if dtype != torch.float32 else 1e-4,
                               atol=2e-2 if dtype != torch.float32 else 1e-4)


def test_residual_ln_arguments_are_checked():
    from etformer.kernels import add_layernorm

    x = torch.randn(4, 8, device=DEVICE)
    g = torch.ones(8, device=DEVICE)
    with pytest.raises(EtformerError, match="residual_ln without a residual"):
        add_layernorm(x, None, g, g, residual_ln=(g, g))
    with pytest.raises(EtformerError, match="residual_ln must be"):
        add_layernorm(x, x, g, g, residual_ln=g)
    with pytest.raises(EtformerError, match="residual_ln bias has 7"):
        add_layernorm(x, x, g, g, residual_ln=(g, torch.ones(7, device=DEVICE)))
