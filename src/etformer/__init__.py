"""etformer: tensor-tile pruning and fused Triton kernels for fast BERT-family encoders (E.T., SC'21, and beyond)."""
__version__ = "0.1.0"

from .errors import EtformerError


def optimize(model, plan=None, **kw):
    """Turn a Hugging Face BERT-family encoder (live model or checkpoint folder) into an ETEncoder."""
    from .engine import optimize as _optimize

    return _optimize(model, plan, **kw)


__all__ = ["EtformerError", "optimize", "__version__"]
