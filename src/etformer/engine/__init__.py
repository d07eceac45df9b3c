"""The engine: fused etformer operators composed into an encoder. The one place that composes kernels."""
from .convert import optimize
from .encoder import DENSE_CUTOFF, EncoderConfig, ETEncoder

__all__ = ["optimize", "DENSE_CUTOFF", "EncoderConfig", "ETEncoder"]
