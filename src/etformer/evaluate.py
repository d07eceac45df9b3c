"""Scoring an encoder on a GLUE task with the task's official metric.

A model with a sequence-classification head is scored through its head. A bare encoder (such as all-MiniLM-L6-v2)
is scored as its users use it: STS-B by the cosine similarity of mean-pooled sentence embeddings, and the
classification tasks by a linear probe (logistic regression on frozen mean-pooled features, fitted on the train
split) — the encoder's weights are never trained by the probe.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .data import compute_metric, load_split, task_spec
from .errors import EtformerError
from .models import apply_head, base_model, has_task_head

Encoder = Callable[[dict], torch.Tensor]  # batch of input_ids/attention_mask/token_type_ids -> (B, S, H)
PROBE_TRAIN_LIMIT = 4000


def hf_encoder(model: torch.nn.Module) -> Encoder:
    body = base_model(model)

    def encode(batch: dict) -> torch.Tensor:
        return body(**batch).last_hidden_state

    return encode


def batches(tok, texts: Sequence[tuple[str, ...]], batch_size: int, max_len: int, device):
    """Tokenized batches in the given order; each batch padded to its own longest sequence."""
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        cols = list(zip(*chunk))
        enc = tok(*cols, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        yield {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(encode: Encoder, tok, sentences: Sequence[str], batch_size=64, max_len=128, device="cpu") -> torch.Tensor:
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # length-sorted: little padding
    out = [None] * len(sentences)
    for bi, batch in enumerate(batches(tok, [(sentences[i],) for i in order], batch_size, max_len, device)):
        e = mean_pool(encode(batch).float(), batch["attention_mask"]).cpu()
        for j, row in enumerate(e):
            out[order[bi * batch_size + j]] = row
    return torch.stack(out)


@torch.no_grad()
def predict_with_head(model, encode: Encoder, tok, examples, batch_size=64, max_len=128, device="cpu") -> np.ndarray:
    preds = []
    for batch in batches(tok, [e.texts for e in examples], batch_size, max_len, device):
        logits = apply_head(model, encode(batch)).float()
        preds.append(logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1))
    return torch.cat(preds).cpu().numpy()


def _pair_features(encode, tok, examples, **kw) -> torch.Tensor:
    spec_pair = len(examples[0].texts) == 2
    if not spec_pair:
        return embed(encode, tok, [e.texts[0] for e in examples], **kw)
    u = embed(encode, tok, [e.texts[0] for e in examples], **kw)
    v = embed(encode, tok, [e.texts[1] for e in examples], **kw)
    return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression, fitted to convergence with L-BFGS on standardized features."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], n_classes, dtype=torch.float64)
    x, y = x.detach().double(), y.detach()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def evaluate(model, tok, task: str, *, encode: Encoder | None = None, glue_dir=None, device="cpu", batch_size=64,
             max_len=128, limit=None, return_preds=False) -> dict:
    """Score `model` (or `encode`, an encoder standing in for it) on the task's dev split.

    Returns {"task", "metric", "value", "metrics", "n", "method"} (and "preds" with return_preds).
    """
    spec = task_spec(task)
    encode = encode or hf_encoder(model)
    dev = load_split(spec.name, "dev", glue_dir, limit=limit)
    labels = np.array([e.label for e in dev], dtype=np.float64)
    kw = dict(batch_size=batch_size, max_len=max_len, device=device)
    if has_task_head(model):
        preds = predict_with_head(model, encode, tok, dev, **kw)
        method = "task head"
    elif spec.is_regression:
        if not spec.is_pair:
            raise EtformerError(f"{spec.name} is a single-sentence regression task; a bare encoder cannot score it")
        u = embed(encode, tok, [e.texts[0] for e in dev], **kw)
        v = embed(encode, tok, [e.texts[1] for e in dev], **kw)
        preds = torch.nn.functional.cosine_similarity(u, v).numpy()
        method = "cosine similarity of mean-pooled embeddings"
    else:
        try:
            train = load_split(spec.name, "train", glue_dir)
        except EtformerError as e:
            raise EtformerError(f"scoring a bare encoder on {spec.name} needs a train split for its linear probe: {e}") from None
        rng = np.random.default_rng(0)
        if len(train) > PROBE_TRAIN_LIMIT:
            train = [train[i] for i in sorted(rng.choice(len(train), PROBE_TRAIN_LIMIT, replace=False))]
        xt = _pair_features(encode, tok, train, **kw)
        xd = _pair_features(encode, tok, dev, **kw)
        mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
        probe = fit_probe((xt - mu) / sd, torch.tensor([e.label for e in train]), len(spec.labels))
        with torch.no_grad():
            preds = probe(((xd - mu) / sd).double()).argmax(-1).numpy()
        method = f"linear probe on mean-pooled embeddings ({len(train)} train examples)"
    metrics = compute_metric(spec.name, preds, labels)
    out = {"task": spec.name, "metric": spec.metric, "value": metrics[spec.metric], "metrics": metrics,
           "n": len(dev), "method": method}
    if return_preds:
        out["preds"] = preds
    return out
