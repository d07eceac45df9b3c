"""nn.TransformerEncoder through the engine: every layer configuration, dense and pruned, causal and padded."""
import itertools

import pytest
import torch
from torch import nn

from etformer import optimize
from etformer.bench.torch_encoders import prune_tiles, torch_encoder
from etformer.errors import EtformerError
from kernel_utils import needs_triton, DEVICE as KDEVICE


def _inputs(B, S, d, batch_first, pad=True):
    src = torch.randn(B, S, d)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    if pad and B > 1:
        kpm[1, S // 2:] = True
        kpm[-1, S - 3:] = True
    return (src if batch_first else src.transpose(0, 1)), kpm


def _check(enc, et, B, S, d, batch_first, causal=False, tol=1e-5):
    src, kpm = _inputs(B, S, d, batch_first, pad=not causal)
    mask = nn.Transformer.generate_square_subsequent_mask(S) if causal else None
    with torch.no_grad():
        ref = enc(src, mask=mask, src_key_padding_mask=None if causal else kpm, is_causal=causal)
    y = et(src, mask=mask, src_key_padding_mask=None if causal else kpm, is_causal=causal)
    keep = ~kpm if not causal else torch.ones(B, S, dtype=torch.bool)
    if not batch_first:
        ref, y = ref.transpose(0, 1), y.transpose(0, 1)
    err = float((y[keep] - ref[keep]).norm() / ref[keep].norm())
    assert err < tol, err
    assert torch.all(y[~keep] == 0)


CONFIGS = list(itertools.product(["relu", "gelu"], [False, True], [True, False], [False, True]))


@pytest.mark.parametrize("act,norm_first,batch_first,final_norm", CONFIGS)
@pytest.mark.parametrize("pruned", [False, True])
def test_every_configuration_matches_pytorch(act, norm_first, batch_first, final_norm, pruned):
    enc = torch_encoder(64, 2, 96, 2, act=act, norm_first=norm_first, batch_first=batch_first, final_norm=final_norm)
    if pruned:
        prune_tiles(enc, (16, 16), v_rows=norm_first)  # also exercises compact V + folded W_O
    et = optimize(enc, dtype="float32", device="cpu", tile=(16, 16), backend="reference")
    _check(enc, et, 3, 11, 64, batch_first)


@pytest.mark.parametrize("pruned", [False, True])
def test_seed_transformer_causal_head_dim_200(pruned):
    """E.T.'s Transformer: d=800, 4 heads of 200, FFN 200, causal; 800 is not divisible by the 128x64 tile."""
    enc = torch_encoder(800, 4, 200, 2)
    if pruned:
        prune_tiles(enc, (128, 64), 0.5)
    et = optimize(enc, dtype="float32", device="cpu", tile=(128, 64), backend="reference")
    _check(enc, et, 2, 13, 800, True, causal=True)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_through_the_kernels(causal):
    """Head dim 200 and a model dim the tile does not divide, on the Triton kernels (interpreter or GPU)."""
    enc = torch_encoder(200, 2, 64, 1, act="gelu", final_norm=True)  # head dim 100: padded to 128 inside
    prune_tiles(enc, (64, 64), 0.5)
    dev = "cuda" if KDEVICE == "cuda" else "cpu"
    et = optimize(enc, dtype="float32", device=dev, tile=(64, 64), backend="triton")
    src, kpm = _inputs(2, 9, 200, True, pad=not causal)
    mask = nn.Transformer.generate_square_subsequent_mask(9) if causal else None
    with torch.no_grad():
        ref = enc(src, mask=mask, src_key_padding_mask=None if causal else kpm, is_causal=causal)
    y = et(src.to(dev), mask=None if mask is None else mask.to(dev),
           src_key_padding_mask=None if causal else kpm.to(dev), is_causal=causal).cpu()
    keep = ~kpm if not causal else torch.ones(2, 9, dtype=torch.bool)
    assert float((y[keep] - ref[keep]).norm() / ref[keep].norm()) < (1e-5 if dev == "cpu" else 5e-3)


def test_bad_inputs():
    enc = torch_encoder(64, 2, 96, 1)
    et = optimize(enc, dtype="float32", device="cpu", tile=(16, 16), backend="reference")
    with pytest.raises(EtformerError, match="features"):
        et(torch.randn(2, 5, 32))
    with pytest.raises(EtformerError, match="NaN"):
        et(torch.full((2, 5, 64), float("nan")))
    with pytest.raises(EtformerError, match="only causal"):
        et(torch.randn(2, 5, 64), mask=torch.zeros(5, 5))
    with pytest.raises(EtformerError, match="all padding"):
        et(torch.randn(2, 5, 64), src_key_padding_mask=torch.tensor([[False] * 5, [True] * 5]))
    with pytest.raises(EtformerError, match="empty"):
        et(torch.randn(0, 5, 64))
    bad = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 2, 96, activation=torch.tanh, batch_first=True), 1,
                                enable_nested_tensor=False)
    with pytest.raises(EtformerError, match="activation"):
        optimize(bad, device="cpu")


@pytest.mark.parametrize("method", ["rgl", "admm", "gmp", "oneshot"])
def test_prune_module_on_torch_encoder(method):
    """The recipe on nn.TransformerEncoder (packed in_proj): exact tile pattern on Q, K, V slices, then the engine."""
    import copy

    from etformer.models import matrices
    from etformer.pruning import PruningPlan, prune_module
    from etformer.pruning.patterns import group_norms

    enc = torch_encoder(64, 2, 128, 2, act="gelu", norm_first=True, final_norm=True)
    teacher = copy.deepcopy(enc)
    plan = PruningPlan.attention_aware(0.5, (16, 16))
    g = torch.Generator().manual_seed(0)

    def loss_fn(model):  # self-distillation on random sequences
        x = torch.randn(4, 10, 64, generator=g)
        with torch.no_grad():
            t = teacher(x)
        return (model(x) - t).pow(2).mean()

    masks = prune_module(enc, plan, loss_fn, steps=3, method=method, lr=1e-3)
    assert len(masks) == 12
    for name, m in matrices(enc).items():
        w = m.weight().detach()
        pat = plan.pattern(m.kind)
        assert (group_norms(w, pat) == 0).float().mean().item() == pytest.approx(0.5), name
    et = optimize(enc, plan, dtype="float32", device="cpu", backend="reference")
    assert et.core.layers[0].v_width == 16  # V pruned by rows: compact V (D=32 -> 16 of each head's columns)
    _check(enc, et, 3, 11, 64, True)


@pytest.mark.parametrize("norm_first", [False, True])
def test_sdpa_layer_stack_peer_matches_torch(norm_first):
    """The bench's hand-written SDPA peer computes what nn.TransformerEncoder computes (so its timings compare)."""
    from etformer.bench.peers import TorchLayerStack

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 96, dropout=0.0, batch_first=True, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        ref = enc(x, mask=nn.Transformer.generate_square_subsequent_mask(9), is_causal=True)
    y = TorchLayerStack(enc, causal=True)(x)
    assert float((y - ref).norm() / ref.norm()) < 1e-5


@needs_triton
@pytest.mark.parametrize("act,norm_first,batch_first,final_norm", CONFIGS)
@pytest.mark.parametrize("pruned", [False, True])
def test_every_configuration_through_the_kernels(act, norm_first, batch_first, final_norm, pruned):
    """Each configuration on the Triton kernels. On a GPU in fp16 the engine's error against the fp32 module must be
    at most twice PyTorch's own fp16 run's; in the interpreter (CPU, fp32) it must match to 1e-4."""
    enc = torch_encoder(64, 2, 96, 2, act=act, norm_first=norm_first, batch_first=batch_first,
                        final_norm=final_norm, seed=1)
    if pruned:
        prune_tiles(enc, (16, 16), v_rows=norm_first)
    gpu = KDEVICE == "cuda"
    dev, dt = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    et = optimize(enc, dtype=dt, device=dev, tile=(16, 16), backend="triton")
    src, kpm = _inputs(3, 11, 64, batch_first)
    with torch.no_grad():
        ref = enc(src, src_key_padding_mask=kpm)
        y = et(src.to(dev, dt), src_key_padding_mask=kpm.to(dev)).float().cpu()
        peer = None
        if gpu:
            import copy

            e16 = copy.deepcopy(enc).to("cuda", torch.float16)
            peer = e16(src.to("cuda", torch.float16), src_key_padding_mask=kpm.to("cuda")).float().cpu()
    if not batch_first:
        ref, y = ref.transpose(0, 1), y.transpose(0, 1)
        peer = peer.transpose(0, 1) if peer is not None else None
    keep = ~kpm
    err = float((y[keep] - ref[keep]).norm() / ref[keep].norm())
    if gpu:
        err_peer = float((peer[keep] - ref[keep]).norm() / ref[keep].norm())
        assert err <= 2 * err_peer + 1e-4, (err, err_peer)
    else:
        assert err < 1e-4, err
    assert torch.all(y[~keep] == 0)
