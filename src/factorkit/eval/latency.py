"""Latency of a module: the best wall time over repeated calls, and one row
comparing a factor module's kernels against nn.Linear and LowRankLinear."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
from torch import nn


def best_time(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    """Best wall time of ``fn(x)`` over ``repeats`` calls after 3 warm-ups (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn(x)
            sync()
            best = min(best, time.perf_counter() - t)
    return best


def time_kernels(dense: nn.Module, lowrank: nn.Module, module: nn.Module, kernels: Iterable[str], x: torch.Tensor,
                 prefix: str = "") -> dict[str, float]:
    """One latency row: ``dense`` (nn.Linear), ``lowrank`` (LowRankLinear), and ``module`` with each of
    its ``kernels`` forced and then on "auto" (keys ``prefix + kernel``); more repeats for one token."""
    repeats = 200 if x.shape[-2] == 1 else 30
    row = {"dense": best_time(dense, x, repeats), "lowrank": best_time(lowrank, x, repeats)}
    for kernel in list(kernels) + ["auto"]:
        module.kernel = kernel
        row[prefix + kernel] = best_time(module, x, repeats)
    return row
