"""torch.nn.TransformerEncoder -> the etformer engine.

Takes every configuration of nn.TransformerEncoderLayer: post-LN or pre-LN (norm_first), ReLU or GELU, batch_first
true or false, with or without the encoder's final norm, and the packed in_proj_weight (Q, K and V in one matrix).
Inputs are what the PyTorch module takes: src (B, S, d) or (S, B, d), src_key_padding_mask (True = padding) and
is_causal / a causal mask. Padding is removed once at entry and restored (as zeros) at exit.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EtformerError
from ..models import matrices
from ..pruning.plan import DEFAULT_TILE
from .convert import _dtype, build_layer
from .encoder import GRAPH_MAX_TOKENS, EncoderConfig, ETEncoder, choose_graph_key, replay_graph


def torch_encoder_linears(enc: nn.TransformerEncoder) -> dict:
    """(layer index, kind) -> (weight view, bias view) of each matrix (the mapping lives in etformer.models)."""
    return {(m.layer, m.kind): (m.weight(), m.bias_view()) for m in matrices(enc).values()}


def _activation(layer) -> str:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU) or getattr(layer, "activation_relu_or_gelu", 0) == 1:
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none") or getattr(layer, "activation_relu_or_gelu", 0) == 2:
        return "gelu"
    raise EtformerError(f"activation {act!r} is not supported by the engine (relu, exact gelu)")


class ETTorchEncoder(nn.Module):
    """Drop-in for a converted nn.TransformerEncoder: forward(src, mask=None, src_key_padding_mask=None, is_causal=None)."""

    def __init__(self, core: ETEncoder, batch_first: bool):
        super().__init__()
        self.core, self.batch_first = core, batch_first
        self._graphs: OrderedDict = OrderedDict()

    @torch.no_grad()
    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        core = self.core
        if not isinstance(src, torch.Tensor) or src.dim() != 3:
            raise EtformerError("src must be a 3-D tensor")
        if src.device != core.device:
            raise EtformerError(f"src is on {src.device}, the encoder on {core.device}; move the inputs")
        if not src.is_floating_point():
            raise EtformerError(f"src must be a floating-point tensor, got {src.dtype}")
        x = src if self.batch_first else src.transpose(0, 1)  # (B, S, d)
        B, S, d = x.shape
        if B == 0 or S == 0:
            raise EtformerError(f"empty batch: src has shape {tuple(src.shape)}")
        if d != core.cfg.hidden:
            raise EtformerError(f"src has {d} features, the encoder expects {core.cfg.hidden}")
        if core.check_finite and not bool(torch.isfinite(x).all()):
            raise EtformerError("src holds NaN or inf")
        causal = bool(is_causal)
        if mask is not None and not causal:  # is_causal=True is PyTorch's promise that mask is causal: not re-checked
            if mask.shape != (S, S):
                raise EtformerError(f"mask must be ({S}, {S}), got {tuple(mask.shape)}")
            causal_ref = torch.triu(torch.ones(S, S, dtype=torch.bool, device=mask.device), 1)
            blocked = mask if mask.dtype == torch.bool else torch.isinf(mask) & (mask < 0)
            if not torch.equal(blocked, causal_ref):
                raise EtformerError("only causal attention masks are supported; use src_key_padding_mask for padding")
            causal = True
        keep = None
        if src_key_padding_mask is not None:
            if src_key_padding_mask.shape != (B, S):
                raise EtformerError(f"src_key_padding_mask must be ({B}, {S}), got {tuple(src_key_padding_mask.shape)}")
            keep = ~src_key_padding_mask.bool() if src_key_padding_mask.dtype == torch.bool else src_key_padding_mask == 0
        T, max_len = core._lengths(keep, B, S)
        if T == B * S:
            keep = None
        if core.use_graphs and B * S <= GRAPH_MAX_TOKENS:
            out = self._graphed(x, keep, T, max_len, causal)
        else:
            out = self._run(x, keep, T, max_len, causal)
        out = out.to(src.dtype)
        return out if self.batch_first else out.transpose(0, 1)

    def _run(self, x, keep, T, max_len, causal):
        core = self.core
        B, S, d = x.shape
        flat, _, cu = core._indices(keep, B, S, T)
        packed = x.reshape(B * S, d)
        packed = (packed if flat is None else packed[core._gather_index(flat, B, S)]).to(core.dtype).contiguous()
        y = core._stack(packed, cu, max_len, causal=causal)
        return core._pad(y, flat, B, S)

    def _graphed(self, x, keep, T, max_len, causal):
        key = choose_graph_key(self._graphs, x.shape[0], x.shape[1], T, max_len, (x.shape[2], x.dtype, causal),
                               padded=keep is not None)
        T, max_len = key[2], key[3]
        return replay_graph(self._graphs, key, (x, keep),
                            lambda xx, kk: self._run(xx, kk, T, max_len, causal)).clone()


def optimize_torch_encoder(enc: nn.TransformerEncoder, *, dtype="auto", device=None, tile=DEFAULT_TILE,
                           kernel: str | None = None, backend: str = "auto", pruned_v: bool = True) -> ETTorchEncoder:
    if not isinstance(enc, nn.TransformerEncoder) or len(enc.layers) == 0:
        raise EtformerError("expected an nn.TransformerEncoder with at least one layer")
    dev = torch.device(device) if device is not None else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dt = _dtype(dtype, dev)
    first = enc.layers[0]
    d, H = first.self_attn.embed_dim, first.self_attn.num_heads
    acts = {_activation(l) for l in enc.layers}
    firsts = {bool(l.norm_first) for l in enc.layers}
    bfs = {bool(l.self_attn.batch_first) for l in enc.layers}
    if len(acts) > 1 or len(firsts) > 1 or len(bfs) > 1:
        raise EtformerError("all layers must share activation, norm_first and batch_first")
    eps = first.norm1.eps
    cfg = EncoderConfig(hidden=d, heads=H, layers=len(enc.layers), intermediate=first.linear1.out_features,
                        max_positions=1 << 30, eps=eps, activation=acts.pop(), token_types=False,
                        norm_first=firsts.pop())
    lin = torch_encoder_linears(enc)
    layers = []
    for i, layer in enumerate(enc.layers):
        w = {k: lin[(i, k)][0] for k in ("q", "k", "v", "o", "ffn_in", "ffn_out")}
        b = {k: lin[(i, k)][1] for k in ("q", "k", "v", "o", "ffn_in", "ffn_out")}
        layers.append(build_layer(w, b, (layer.norm1.weight, layer.norm1.bias), (layer.norm2.weight, layer.norm2.bias),
                                  H, tile, dt, dev, kernel, pruned_v))
    final = None
    if enc.norm is not None:
        final = (enc.norm.weight.detach().to(dev, dt), enc.norm.bias.detach().to(dev, dt))
        if enc.norm.eps != eps:
            raise EtformerError("the final norm's eps must equal the layers'")
    core = ETEncoder(cfg, {}, layers, dt, dev, final_norm=final)
    core.backend = backend
    return ETTorchEncoder(core, batch_first=bfs.pop())
