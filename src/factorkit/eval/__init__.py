"""Measuring models: perplexity, the zero-shot suite (lm-eval), the memory a piece of work needs, the latency
of a module."""

from .latency import best_time, time_kernels
from .memory import optimizer_state_bytes, parameter_bytes, peak_memory, tensor_bytes
from .perplexity import PerplexityResult, perplexity
from .harness import TASKS, TaskResult, ZeroShotResult, check_tasks, zero_shot

__all__ = ["PerplexityResult", "TASKS", "TaskResult", "ZeroShotResult", "best_time", "check_tasks", "time_kernels",
           "optimizer_state_bytes", "parameter_bytes", "peak_memory", "perplexity", "tensor_bytes", "zero_shot"]
