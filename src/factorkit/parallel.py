"""Independent solves shared among the processes of a torchrun job.

Under ``torchrun`` (WORLD_SIZE > 1) every process runs the same compression: it loads the model, calibrates
on the same batches and holds the same statistics. Where a block's matrices are independent problems (one
dictionary per projection), the processes divide them, each solves its share, and every solution is then
broadcast from the process that solved it, so every process continues with the same compressed block and the
result is bit-identical to one process: each problem is seeded by its own settings, never by a rank.

The problems are assigned by their estimated cost, largest first, each to the least-loaded process (ties to
the lowest rank), the same assignment in every process. The tensors travel through ``torch.distributed``
broadcasts (gloo on CPUs, NCCL when the process has a GPU): a header of shapes and dtypes, then the tensors;
nothing is pickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


@dataclass(frozen=True)
class Team:
    """This process's rank among ``world`` processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that solves each problem: largest cost first, to the least-loaded rank."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = rank
            load[rank] += costs[i]
        return owner

    def solve(self, problems: Sequence[T], costs: Sequence[float],
              solve: Callable[[T], list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """``solve(problem)`` for every problem, in this process or another, each result in every process:
        this process's share first, then every result broadcast from its owner, in order."""
        if self.world == 1:
            return [solve(p) for p in problems]
        owners = self.owners(costs)
        mine = {i: solve(p) for i, p in enumerate(problems) if owners[i] == self.rank}
        return [broadcast_tensors(mine.get(i), owners[i]) for i in range(len(problems))]


def current() -> Team:
    """The team of this process: under torchrun, joins the process group (once) and returns its rank and
    size; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Team()
    if not tdist.is_initialized():
        gpu = torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", "0")) < torch.cuda.device_count()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if gpu else "gloo")
    return Team(tdist.get_rank(), tdist.get_world_size())


def _wire_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_tensors(tensors: list[torch.Tensor] | None, src: int) -> list[torch.Tensor]:
    """``tensors`` of process ``src`` in every process (the others pass None): their count, dtypes and
    shapes first as an int64 header, then each tensor; returned on the device the sender's were on (the
    CPU for receivers)."""
    device = _wire_device()
    header = None
    if tdist.get_rank() == src:
        header = [len(tensors)]
        for t in tensors:
            header += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    size = torch.tensor([len(header) if header else 0], dtype=torch.int64, device=device)
    tdist.broadcast(size, src)
    head = (torch.tensor(header, dtype=torch.int64, device=device) if header
            else torch.empty(int(size), dtype=torch.int64, device=device))
    tdist.broadcast(head, src)
    spec, pos, out = head.tolist(), 1, []
    for i in range(spec[0]):
        dtype, ndim = _DTYPES[spec[pos]], spec[pos + 1]
        shape = spec[pos + 2: pos + 2 + ndim]
        pos += 2 + ndim
        wire = (tensors[i].detach().contiguous().to(device) if tensors is not None
                else torch.empty(shape, dtype=dtype, device=device))
        tdist.broadcast(wire, src)
        out.append(tensors[i] if tensors is not None else wire.cpu())
    return out


def leave(failed: bool = False) -> None:
    """End this process's part in a torchrun job. After a clean run every process waits for the others first,
    so none tears down gloo's connections while a peer still sends (which can abort the process at exit);
    after a failure it leaves at once, since the peers may never reach the barrier."""
    if not tdist.is_initialized():
        return
    if not failed:
        tdist.barrier()
    tdist.destroy_process_group()
