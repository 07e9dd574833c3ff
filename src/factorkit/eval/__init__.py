"""Measuring models: perplexity, the memory a piece of work needs, the latency of a module."""

from .latency import best_time, time_kernels
from .memory import optimizer_state_bytes, parameter_bytes, peak_memory, tensor_bytes
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "best_time", "time_kernels", "optimizer_state_bytes", "parameter_bytes", "peak_memory", "perplexity",
           "tensor_bytes"]
