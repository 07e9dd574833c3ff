"""Memory probes: peak tensor memory of a piece of work, and the bytes a
model's parameters and optimizer state hold.

On CUDA the peak comes from the caching allocator's own statistics. On the
CPU there is no allocator statistic, so it comes from the PyTorch profiler's
memory timeline (every tensor allocation and free in order, the data behind
``torch.profiler``'s memory plots): the live bytes at the start (tensors that
already existed and were used) plus the largest running sum of allocations
minus frees. Both count tensor storage, not the interpreter or the libraries.
"""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Callable, Iterable

import torch
from torch import nn


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor storage on ``device`` while ``fn()`` runs, counting
    the tensors it uses that existed before it started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != device.type:
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors`` (shared ones counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: two moments per trainable number)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.ndim > 0)


def parameter_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    return tensor_bytes(p for p in model.parameters() if p.requires_grad or not trainable_only)


def resident_bytes() -> int | None:
    """The process's resident set size now (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_memory(collect: bool = True) -> None:
    """Hand freed heap pages back to the system (glibc), after collecting garbage unless ``collect`` is False
    (a full collection takes ~0.2 s in a process that has loaded transformers; trimming alone, milliseconds), so
    the resident size follows what is live."""
    if collect:
        gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): freed pages stay with the process, peaks read higher
        return
    libc.malloc_trim(0)
