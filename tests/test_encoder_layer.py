"""The persistent one-launch encoder layer against the composition of the operators' references."""
import math

import pytest
import torch

from etformer.errors import EtformerError
from etformer.kernels.encoder_layer import encoder_layer, encoder_layer_reference
from kernel_utils import DEVICE, DTYPES, assert_close, needs_triton

pytestmark = needs_triton


def _layer(lens, H, D, HID, I, dtype, DV=None, ghosts=0, seed=0):
    """Packed inputs (with `ghosts` rows past the last sequence) and random weights of one post-LN layer."""
    g = torch.Generator().manual_seed(seed)
    DV = DV or D

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    T = sum(lens) + ghosts
    x = r(T, HID)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    w = (r(2 * H * D + H * DV, HID, scale=1 / math.sqrt(HID)), r(2 * H * D + H * DV, scale=0.1),
         r(HID, H * DV, scale=1 / math.sqrt(H * DV)), r(HID, scale=0.1), (1 + r(HID, scale=0.1), r(HID, scale=0.1)),
         r(I, HID, scale=1 / math.sqrt(HID)), r(I, scale=0.1), r(HID, I, scale=1 / math.sqrt(I)), r(HID, scale=0.1),
         (1 + r(HID, scale=0.1), r(HID, scale=0.1)))
    return x, cu, w


def _f64(w):
    return tuple(tuple(t.double() for t in a) if isinstance(a, tuple) else a.double() for a in w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,H,D,HID,I,DV,ghosts,act", [
    ([1], 2, 32, 64, 128, None, 0, "gelu"),            # one token
    ([17, 5], 2, 32, 64, 200, None, 0, "gelu"),        # FFN width not a multiple of the blocks
    ([70, 3], 1, 64, 96, 128, 16, 5, "relu"),          # compact V (DV < D), hidden 96, ghost rows
    ([19, 1, 40], 1, 128, 128, 256, None, 0, "gelu"),  # head dim 128, a sequence of one
])
def test_encoder_layer(dtype, lens, H, D, HID, I, DV, ghosts, act):
    x, cu, w = _layer(lens, H, D, HID, I, dtype, DV, ghosts)
    y = encoder_layer(x, cu, max(lens), H, D, *w, v_head_dim=DV, activation=act, backend="triton")
    assert y.shape == x.shape and y.dtype == dtype
    n = sum(lens)  # ghost rows are undefined by contract
    peer = encoder_layer_reference(x, cu, H, D, *w, v_head_dim=DV, activation=act)
    ref = encoder_layer_reference(x.double(), cu, H, D, *_f64(w), v_head_dim=DV, activation=act)
    assert_close(y[:n], peer[:n], ref[:n], f"encoder layer lens={lens} D={D} DV={DV}")


def test_encoder_layer_bad_inputs():
    x, cu, w = _layer([5], 2, 32, 64, 128, torch.float32)
    with pytest.raises(EtformerError, match="w_o must have shape"):
        encoder_layer(x, cu, 5, 2, 32, w[0], w[1], w[2][:, :32], *w[3:], backend="triton")
    with pytest.raises(EtformerError, match="w_1 is torch.float16"):
        encoder_layer(x, cu, 5, 2, 32, *w[:5], w[5].half(), *w[6:], backend="triton")
    with pytest.raises(EtformerError, match="activation"):
        encoder_layer(x, cu, 5, 2, 32, *w, activation=None, backend="triton")
    with pytest.raises(EtformerError, match="at most"):
        encoder_layer(x.new_zeros(2000, 64), cu, 5, 2, 32, *w, backend="triton")
    with pytest.raises(EtformerError, match="int32"):
        encoder_layer(x, cu, 5, 2, 32, *w, counter=torch.zeros(1, device=DEVICE), backend="triton")
    if DEVICE == "cpu":
        with pytest.raises(EtformerError, match="programs=1"):
            encoder_layer(x, cu, 5, 2, 32, *w, programs=4, backend="triton")
        with pytest.raises(EtformerError, match="_timings needs"):
            encoder_layer(x, cu, 5, 2, 32, *w, backend="triton", _timings=torch.zeros(8, dtype=torch.int64))


@pytest.mark.skipif(DEVICE != "cuda", reason="grids of many resident programs and CUDA graphs need a GPU")
def test_encoder_layer_grid_sizes_and_graph_replays():
    """Every work item is computed the same way whichever program takes it, so any grid gives the same bits; a
    captured chain of layers (one zeroed counter a layer, made inside the graph) replays to the same bits."""
    dtype = torch.float16
    x, cu, w = _layer([128], 12, 64, 768, 3072, dtype)
    full = encoder_layer(x, cu, 128, 12, 64, *w)
    for p in (1, 7, 64):
        assert torch.equal(encoder_layer(x, cu, 128, 12, 64, *w, programs=p), full), p
    xs, cu2, w2 = _layer([100, 28, 77], 12, 64, 768, 3072, dtype, seed=1)

    def chain():
        c = torch.zeros(3, dtype=torch.int32, device="cuda")
        h = xs
        for i in range(3):
            h = encoder_layer(h, cu2, 100, 12, 64, *w2, counter=c[i:i + 1])
        return h

    eager = chain()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.skipif(DEVICE != "cuda", reason="the phase timer is the GPU's %globaltimer")
def test_encoder_layer_barriers_order_the_phases():
    """Every program stamps the time at the end of each phase, before it arrives at the barrier: no program may end
    phase k+1 before every program has ended phase k (what the grid barrier guarantees)."""
    x, cu, w = _layer([100, 28], 12, 64, 768, 3072, torch.float16)
    P = torch.cuda.get_device_properties(0).multi_processor_count
    t = torch.zeros(P * 8, dtype=torch.int64, device="cuda")
    y = encoder_layer(x, cu, 100, 12, 64, *w, _timings=t)
    assert torch.equal(y, encoder_layer(x, cu, 100, 12, 64, *w))  # the timer changes nothing
    t = t.view(P, 8)[:, :7].cpu()
    assert torch.all(t > 0)
    for k in range(1, 6):
        assert int(t[:, k + 1].min()) >= int(t[:, k].max()), k
