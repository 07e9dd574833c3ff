"""Measuring models: perplexity, and the memory a piece of work needs."""

from .memory import optimizer_state_bytes, parameter_bytes, peak_memory, tensor_bytes
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "optimizer_state_bytes", "parameter_bytes", "peak_memory", "perplexity",
           "tensor_bytes"]
