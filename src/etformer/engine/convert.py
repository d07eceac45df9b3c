"""Hugging Face BERT-family encoder -> ETEncoder. The one place that knows both a model's modules and the engine."""
from __future__ import annotations

import os

import torch

from ..errors import EtformerError
from ..models import base_model, family_of
from ..pruning.plan import DEFAULT_TILE, PruningPlan
from ..kernels.pruned_v_attention import CompactV
from .encoder import EncoderConfig, ETEncoder, Layer, Linear

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EtformerError(f"dtype must be auto, float32, float16 or bfloat16, not {dtype!r}")
    return DTYPES[dtype]


def build_layer(w: dict, b: dict, ln1, ln2, heads: int, tile, dt, dev, kernel=None, pruned_v=True) -> Layer:
    """One engine layer from the six matrices (kind -> [out, in]) and biases (None allowed) of an encoder layer."""
    w = {k: v.detach().double().cpu() for k, v in w.items()}
    b = {k: (v.detach().double().cpu() if v is not None else torch.zeros(w[k].shape[0], dtype=torch.float64))
         for k, v in b.items()}
    head_dim = w["q"].shape[0] // heads
    v_width = head_dim
    w_o, b_o, w_v, b_v = w["o"], b["o"], w["v"], b["v"]
    if pruned_v:
        cv, wc, bc = CompactV.from_weight(w_v, b_v, heads)
        if cv.width < head_dim:  # fewer columns: compact V, O folded (exact; fewer FLOPs everywhere)
            w_o, b_o = cv.fold_into_output(w_o, b_o)
            w_v, b_v, v_width = wc, bc, cv.width
    g = lambda t: t.detach().to(dev, dt).contiguous()  # noqa: E731
    mk = lambda W, B: Linear(W.to(dt), B.to(dt), tile, force=kernel).to(dev, dt)  # noqa: E731
    return Layer(qkv=mk(torch.cat([w["q"], w["k"], w_v]), torch.cat([b["q"], b["k"], b_v])), o=mk(w_o, b_o),
                 ffn_in=mk(w["ffn_in"], b["ffn_in"]), ffn_out=mk(w["ffn_out"], b["ffn_out"]),
                 ln1=(g(ln1[0]), g(ln1[1])), ln2=(g(ln2[0]), g(ln2[1])), v_width=v_width)


def optimize(model, plan=None, *, dtype="auto", device=None, tile=None, pruned_v: bool = True,
             kernel: str | None = None, backend: str = "auto") -> ETEncoder:
    """Build an ETEncoder from a live HF model (BertModel, RobertaModel, DistilBertModel or a task model around
    one) or from a checkpoint folder (etformer's or any HF one).

    plan: a PruningPlan or an etformer.json dict; read from the folder when a path is given. It fixes the tile
    shape; a dense model uses DEFAULT_TILE. kernel: None (choose per matrix by density), "tile" or "dense".
    pruned_v: where whole rows of W_V are zero, produce V compactly (kept columns only), run attention on them and
    feed the result to the O projection with W_O gathered and the pruned columns' constants folded into its bias
    (exact; against full-width V on the H200, two runs: 1.00-1.03x at V rows 50%, 1.03-1.24x at 75%;
    benchmarks/results/h200/reorder/).
    """
    if isinstance(model, torch.nn.TransformerEncoder):
        from .torch_encoder import optimize_torch_encoder

        if plan is not None and tile is None:
            tile = (plan.tile if isinstance(plan, PruningPlan) else PruningPlan.from_json(plan.get("plan", plan)).tile)
        return optimize_torch_encoder(model, dtype=dtype, device=device, tile=tile or DEFAULT_TILE, kernel=kernel,
                                      backend=backend, pruned_v=pruned_v)
    if isinstance(model, (str, os.PathLike)):
        from ..checkpoint import read_meta, verify_plan
        from ..models import load_model

        meta = read_meta(str(model)) if os.path.isdir(model) else None
        model, _ = load_model(str(model))
        if meta is not None:
            plan = verify_plan(model, meta)
    if isinstance(plan, dict):
        plan = PruningPlan.from_json(plan["plan"] if "plan" in plan else plan)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise EtformerError("optimize() takes a Hugging Face model or a checkpoint folder")
    fam = family_of(model.config)
    body = base_model(model)
    c = model.config
    dev = torch.device(device) if device is not None else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dt = _dtype(dtype, dev)
    tile = tuple(tile) if tile is not None else (plan.tile if plan is not None else DEFAULT_TILE)
    is_distil = c.model_type == "distilbert"
    hidden = c.dim if is_distil else c.hidden_size
    heads = c.n_heads if is_distil else c.num_attention_heads
    inter = c.hidden_dim if is_distil else c.intermediate_size
    n_layers = c.n_layers if is_distil else c.num_hidden_layers
    act = (c.activation if is_distil else c.hidden_act)
    if act not in ("gelu", "relu"):
        raise EtformerError(f"activation {act!r} is not supported by the engine (gelu, relu)")
    offset = (c.pad_token_id + 1) if c.model_type in ("roberta", "xlm-roberta", "camembert") else 0
    cfg = EncoderConfig(hidden=hidden, heads=heads, layers=n_layers, intermediate=inter,
                        max_positions=c.max_position_embeddings - offset, eps=getattr(c, "layer_norm_eps", 1e-12),
                        activation=act, position_offset=offset, token_types=fam.token_types)
    emb = body.embeddings
    g = lambda t: t.detach().to(dev, dt).contiguous()  # noqa: E731
    embeddings = {"word": g(emb.word_embeddings.weight), "pos": g(emb.position_embeddings.weight),
                  "ln_w": g(emb.LayerNorm.weight), "ln_b": g(emb.LayerNorm.bias)}
    if fam.token_types:
        embeddings["type"] = g(emb.token_type_embeddings.weight)
    if is_distil:
        cfg.eps = 1e-12
    layers = []
    for layer in body.get_submodule(fam.layers):
        m = {k: layer.get_submodule(n) for k, n in fam.names.items()}
        w = {k: m[k].weight.detach() for k in m}
        b = {k: m[k].bias.detach() if m[k].bias is not None else None for k in m}
        ln1, ln2 = layer.get_submodule(fam.ln_attn), layer.get_submodule(fam.ln_out)
        layers.append(build_layer(w, b, (ln1.weight, ln1.bias), (ln2.weight, ln2.bias), heads, tile, dt, dev,
                                  kernel, pruned_v))
    enc = ETEncoder(cfg, embeddings, layers, dt, dev)
    enc.backend = backend
    return enc
