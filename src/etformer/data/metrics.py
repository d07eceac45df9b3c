"""The official GLUE metrics: accuracy, F1, Matthews correlation, Pearson and Spearman."""
from __future__ import annotations

import numpy as np
from scipy import stats

from ..errors import EtformerError


def compute_metric(task: str, preds, labels) -> dict[str, float]:
    """All metrics GLUE reports for `task`, in percent. The task's primary metric is TaskSpec.metric."""
    from .glue import task_spec

    spec = task_spec(task)
    p = np.asarray(preds, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1 or p.size == 0:
        raise EtformerError(f"predictions {p.shape} and labels {y.shape} must be equal-length 1-D arrays")
    if not np.all(np.isfinite(p)):
        raise EtformerError("predictions contain NaN or inf")
    if spec.is_regression:
        return {"pearson": 100 * float(stats.pearsonr(p, y)[0]), "spearman": 100 * float(stats.spearmanr(p, y)[0])}
    acc = 100 * float(np.mean(p == y))
    if spec.name == "cola":
        return {"matthews": 100 * matthews(p, y), "accuracy": acc}
    if spec.name == "mrpc":
        return {"f1": 100 * f1(p, y), "accuracy": acc}
    return {"accuracy": acc}


def f1(p, y) -> float:
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y == 0)))
    fn = float(np.sum((p == 0) & (y == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(p, y) -> float:
    tp = float(np.sum((p == 1) & (y == 1)))
    tn = float(np.sum((p == 0) & (y == 0)))
    fp = float(np.sum((p == 1) & (y == 0)))
    fn = float(np.sum((p == 0) & (y == 1)))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den
