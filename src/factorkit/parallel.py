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

A step that one process runs on its own (its share of the solves, its calibration batches) runs inside
``Team.together()``: when it raises in any process, every process learns it at the end of the step and
raises too (the failing process its own error, the others ``PeerFailed`` naming the process and its error,
or a ``FactorkitError`` when that error was the user's), instead of waiting in a broadcast the failed
process never reaches until the backend's timeout.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as tdist

from .errors import FactorkitError, PeerFailed

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
        with self.together():
            mine = {i: solve(p) for i, p in enumerate(problems) if owners[i] == self.rank}
        return [broadcast_tensors(mine.get(i), owners[i]) for i in range(len(problems))]

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run a step of this process's own; at its end every process learns whether any raised, and if one
        did, every process raises (see the module's docstring). Every process must enter it the same number
        of times, raising or not."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except Exception as error:
            self._agree(error)
            raise
        self._agree(None)

    def _agree(self, error: BaseException | None) -> None:
        """The lowest rank that failed (if any) sends its error's text to all; the others raise with it."""
        device = _wire_device()
        first = torch.tensor([self.rank if error is not None else self.world], dtype=torch.int64, device=device)
        tdist.all_reduce(first, tdist.ReduceOp.MIN)
        src = int(first)
        if src == self.world:
            return
        sent = None
        if self.rank == src:
            text = f"{type(error).__name__}: {error}" if not isinstance(error, FactorkitError) else str(error)
            sent = [torch.tensor([isinstance(error, FactorkitError)], dtype=torch.uint8),
                    torch.tensor(list(text.encode()), dtype=torch.uint8)]
        user, text = broadcast_tensors(sent, src)
        if error is not None:  # this process failed too: its own error is raised by the caller
            return
        message = bytes(text.tolist()).decode(errors="replace")
        if int(user[0]):
            raise FactorkitError(f"process {src} of {self.world}: {message}")
        raise PeerFailed(f"process {src} of {self.world} failed, so this one stops too: {message}")


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
