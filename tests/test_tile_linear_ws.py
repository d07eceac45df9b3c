"""The warp-specialised Hopper tile kernel (kernels/tile_linear_ws.py).

Gluon kernels have no interpreter, so on the CPU this checks the host side (what the kernel accepts, the block-row
table it reads) and tests/test_compile_sm90.py compiles it for sm_90 under both Tritons; on an sm_90 GPU the kernel's
output is checked against the fp32 reference in every launch form.
"""
import pytest
import torch

from etformer.errors import EtformerError
from etformer.kernels import tile_linear_ws as WS
from etformer.kernels.tile_linear import tile_linear_reference
from etformer.sparse import TileSparseWeight

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and WS.HAS_GLUON


def _weight(K, N, density, dtype, device, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N // 128, K // 64, generator=g) < density
    W = torch.randn(N, K, generator=g) / K ** 0.5
    W = W * keep.repeat_interleave(128, 0).repeat_interleave(64, 1)
    if empty_row:
        W[:128] = 0
    return W.to(device=device, dtype=dtype)


def test_block_row_table_is_heaviest_first_with_bounds():
    W = _weight(512, 768, 0.5, torch.float32, "cpu", seed=3)
    w = TileSparseWeight.from_dense(W, (128, 64))
    table = WS._block_rows(w).long()
    counts = table[:, 2] - table[:, 1]
    assert torch.equal(counts, w.tiles_per_row.long()[table[:, 0]])
    assert torch.all(counts[:-1] >= counts[1:])  # heaviest first
    assert sorted(table[:, 0].tolist()) == list(range(768 // 128))
    assert torch.equal(table[:, 1], w.row_ptr.long()[table[:, 0]])
    assert WS._block_rows(w) is WS._block_rows(w)  # cached


def test_shared_memory_of_a_launch():
    """shared_bytes matches what the compiler allocated on sm_90 (Triton 3.6): 196,872 bytes for two ping-pong
    consumers at 4 stages, 213,216 for the cooperative pair at 3 (scripts/compile_sm90.py), and counts the cooperative
    ring's second X block: 262,376 at 4 stages, which the H200 refused (232,448 a block)."""
    assert WS.shared_bytes((128, 4, 2, 1), False, (128, 64)) <= 196872
    assert WS.shared_bytes((128, 3, 2, 1), True, (128, 64)) <= 213216
    assert WS.shared_bytes((128, 4, 2, 1), True, (128, 64)) > 232448
    assert WS.shared_bytes((128, 4, 2, 1), True, (128, 64)) - WS.shared_bytes((128, 4, 2, 1), False, (128, 64)) \
        == 4 * 128 * 64 * 2


def test_refuses_what_it_cannot_run_with_a_reason():
    W = _weight(256, 256, 0.5, torch.float16, "cpu")
    w = TileSparseWeight.from_dense(W, (128, 64))
    x = torch.randn(4, 256, dtype=torch.float16)
    why = WS.tile_linear_ws_supported(x, w)
    assert why and ("sm_90" in why or "Gluon" in why)
    assert WS.tile_linear_ws_supported(x, W) == "the weight is not a TileSparseWeight"
    with pytest.raises(EtformerError):
        WS.tile_linear_ws(x, w)
    with pytest.raises(EtformerError, match="must be one of"):
        WS.tile_linear_ws(x.float(), w)
    with pytest.raises(EtformerError, match="cannot take columns"):  # the shape is checked before the machine
        WS.tile_linear_ws(x, w, out=torch.empty(4, 300, dtype=torch.float16), out_col=100)


@pytest.mark.skipif(not HOPPER, reason="the warp-specialised kernel runs on sm_90 GPUs")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [(128, 2, 1, 2), (128, 4, 2, 1), (64, 5, 2, 1)])
@pytest.mark.parametrize("M", [1, 77, 1000])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("coop", [False, True], ids=["", "coop"])
def test_matches_reference(dtype, config, M, density, coop):
    """coop: the consumers share each item of 2 x BLOCK_M rows (at 77 rows the second one's are all past the end)."""
    K, N = 768, 640
    W = _weight(K, N, density, dtype, "cuda", seed=M)
    if density == 0.0:
        W[128:256, :64] = 0.5  # one tile, so the weight keeps something
    w = TileSparseWeight.from_dense(W, (128, 64))
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) * 0.1
    r = torch.randn(M, N, device="cuda", dtype=dtype)
    if WS.shared_bytes(config, coop, (128, 64)) > WS._smem_limit(torch.cuda.current_device()):
        with pytest.raises(EtformerError, match="shared memory"):  # (128, 4, 2, 1) cooperative: 256 KB
            WS.tile_linear_ws(x, w, b, config=config, coop=coop)
        return
    for act, res in ((None, None), ("gelu", None), ("relu", r)):
        y = WS.tile_linear_ws(x, w, b, activation=act, residual=res, config=config, coop=coop)
        ref = tile_linear_reference(x.float(), W.float(), b.float(), act, None if res is None else res.float())
        err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-6))
        assert err < 1e-2, (act, res is not None, err)
    wide = torch.zeros(M, N + 128, device="cuda", dtype=dtype)
    WS.tile_linear_ws(x, w, b, out=wide, out_col=64, config=config, coop=coop)
    assert torch.all(wide[:, :64] == 0) and torch.all(wide[:, 64 + N:] == 0)
    ref = tile_linear_reference(x.float(), W.float(), b.float())
    assert float((wide[:, 64:64 + N].float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.skipif(not HOPPER, reason="the warp-specialised kernel runs on sm_90 GPUs")
def test_bad_launch_and_output_are_refused():
    W = _weight(256, 256, 0.5, torch.float16, "cuda")
    w = TileSparseWeight.from_dense(W, (128, 64))
    x = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(EtformerError, match="config"):
        WS.tile_linear_ws(x, w, config=(96, 2, 3, 1))
    with pytest.raises(EtformerError, match="cannot take columns"):
        WS.tile_linear_ws(x, w, out=torch.empty(8, 300, device="cuda", dtype=torch.float16), out_col=64)
    with pytest.raises(EtformerError, match="16-byte aligned"):
        WS.tile_linear_ws(x, w, out=torch.empty(8, 400, device="cuda", dtype=torch.float16), out_col=100)


@pytest.mark.skipif(not HOPPER, reason="the warp-specialised kernel runs on sm_90 GPUs")
def test_tile_linear_routes_to_it_from_ws_min_rows(monkeypatch):
    import importlib

    T = importlib.import_module("etformer.kernels.tile_linear")  # the module: the package's tile_linear is the function

    W = _weight(768, 640, 0.5, torch.float16, "cuda", seed=5)
    w = TileSparseWeight.from_dense(W, (128, 64))
    x = torch.randn(300, 768, device="cuda", dtype=torch.float16)
    b = torch.randn(640, device="cuda", dtype=torch.float16)
    monkeypatch.setattr(T, "WS_MIN_ROWS", None)
    grid = T.tile_linear(x, w, b, activation="gelu")
    monkeypatch.setattr(T, "WS_MIN_ROWS", 256)
    monkeypatch.setattr(T, "WS_WITH_ACTIVATION", True)
    monkeypatch.setattr(T, "WS_MIN_ITEMS", 0)
    monkeypatch.setattr(T, "WS_MAX_ROWS", None)
    routed = T.tile_linear(x, w, b, activation="gelu")
    assert torch.equal(routed, WS.tile_linear_ws(x, w, b, activation="gelu"))
    assert float((routed.float() - grid.float()).norm() / grid.float().norm()) < 1e-2
    monkeypatch.setattr(T, "WS_MIN_ROWS", 301)  # fewer rows than that: the grid kernel
    assert torch.equal(T.tile_linear(x, w, b, activation="gelu"), grid)
    monkeypatch.setattr(T, "WS_MIN_ROWS", 256)
    for setting, value, back in (("WS_WITH_ACTIVATION", False, True), ("WS_MAX_K", 512, None),
                                 ("WS_MIN_ITEMS", 16, 0), ("WS_MAX_ROWS", 299, None)):
        monkeypatch.setattr(T, setting, value)  # an activation, K = 768 > 512, 3 x 5 = 15 items, 300 > 299 rows
        assert torch.equal(T.tile_linear(x, w, b, activation="gelu"), grid), setting
        monkeypatch.setattr(T, setting, back)
    assert torch.equal(T.tile_linear(x, w, b, activation="gelu"), routed)

