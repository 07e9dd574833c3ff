"""Measuring models: perplexity, and the memory a piece of work needs."""

from .errors import linear_inputs, relative_output_error, relative_output_errors
from .memory import optimizer_state_bytes, parameter_bytes, peak_memory, tensor_bytes
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "optimizer_state_bytes", "parameter_bytes", "peak_memory", "perplexity",
           "tensor_bytes"]
