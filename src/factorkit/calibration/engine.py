"""The block-by-block calibration engine.

GPTQ-style: the model's embeddings run once to get the inputs of block 0;
then for each block i

1. the calibration batches go through block i with hooks on its Linear
   layers that accumulate statistics (Gram X^T X in float64, sum of |x|, and
   on request the Gram of the inputs scaled to unit length);
2. a callback compresses block i from those statistics;
3. the batches go through the *compressed* block i, and its outputs become
   the inputs of block i+1, so later blocks are calibrated on the
   activations they will really see.

Only one block's inputs are held in memory at a time. Under ``torchrun`` the
processes divide the batches: each runs its share through every block, and
each batch's statistics are shared and added in batch order in every process,
so every process holds the one-process statistics, bit for bit, with a share
of the forward passes and of the hidden states.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import parallel
from ..eval.memory import release_memory
from ..models import offload
from ..surgery import find_blocks, linear_weight, target_linears

STAT_KINDS = ("gram", "abs_mean")  # what calibrate_* collect unless told
KNOWN_STATS = STAT_KINDS + ("unit_gram",)


@dataclass
class LinearStats:
    """Statistics of the inputs x (rows) seen by one Linear layer."""

    in_features: int
    tokens: int = 0
    gram: torch.Tensor | None = None  # X^T X, float64, (in, in)
    abs_sum: torch.Tensor | None = None  # sum over tokens of |x|, float64, (in,)
    # sum over tokens of x x^T / ||x||^2 (tokens of norm 0 add nothing), float64, (in, in): every token counts
    # once, where in X^T X the few with massive activations (a first token, say) can outweigh all the others
    unit_gram: torch.Tensor | None = None

    def add(self, increment: "_Increment") -> None:
        self.tokens += increment.tokens
        for field in _SUMMED:
            value = getattr(increment, field)
            if value is not None:
                mine = getattr(self, field)
                setattr(self, field, value.clone() if mine is None else mine.add_(value))

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None or self.tokens == 0:
            raise ValueError("no |x| statistics were collected for this layer")
        return self.abs_sum / self.tokens


@dataclass
class _Increment:
    tokens: int
    gram: torch.Tensor | None
    abs_sum: torch.Tensor | None
    unit_gram: torch.Tensor | None = None


_SUMMED = ("gram", "abs_sum", "unit_gram")  # the tensors of an increment, in the order they are shared
_SUMMED_KIND = {"gram": "gram", "abs_sum": "abs_mean", "unit_gram": "unit_gram"}  # ... and the kind of each


def _increment(x: torch.Tensor, kinds: tuple[str, ...]) -> _Increment:
    rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    gram = rows.T @ rows if "gram" in kinds else None
    abs_sum = rows.abs().sum(0) if "abs_mean" in kinds else None
    unit_gram = None
    if "unit_gram" in kinds:
        norms = rows.square().sum(1, keepdim=True)
        unit = rows / norms.sqrt().clamp_min(torch.finfo(torch.float64).tiny)  # a zero row stays zero
        unit_gram = unit.T @ unit
    return _Increment(rows.shape[0], gram, abs_sum, unit_gram)


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks is needed."""


class _Recorder(nn.Module):
    """Stands in for a block during capture: records the block's arguments and
    passes the hidden states through unchanged, so one cheap forward of the
    model records every block's extra arguments (masks, rotary embeddings)."""

    def __init__(self, keep_hidden: bool, last: bool) -> None:
        super().__init__()
        self.keep_hidden, self.last = keep_hidden, last
        self.calls: list[tuple[torch.Tensor | None, tuple, dict]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        self.calls.append((hidden if self.keep_hidden else None, rest, kwargs))
        if self.last:
            raise _StopForward
        return hidden


def _batches(data: "torch.Tensor | Iterable[Mapping]", batch_size: int) -> list[dict]:
    """Model keyword arguments per batch: token ids split into batches, or the
    user's own batches (dicts of model inputs; labels are dropped)."""
    if isinstance(data, torch.Tensor):
        return [{"input_ids": data[i : i + batch_size]} for i in range(0, data.shape[0], batch_size)]
    return [{k: v for k, v in batch.items() if k != "labels"} for batch in data]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, data: torch.Tensor, batch_size: int = 4,
                         only: Sequence[int] | None = None):
    """Inputs of the first block and every block's extra arguments, per batch.

    Returns (block_list_name, blocks, hidden, extras) where hidden[b] is the
    input of block 0 for batch b and extras[i][b] = (args, kwargs) that block i
    receives besides its hidden states. ``only``: the indices of the batches
    to run (default: all), in the order given.
    """
    name, blocks = find_blocks(model)
    originals = list(blocks)
    recorders = [_Recorder(keep_hidden=(i == 0), last=(i == len(blocks) - 1)) for i in range(len(blocks))]
    device = next(model.parameters()).device
    try:
        for i, rec in enumerate(recorders):
            blocks[i] = rec
        batches = _batches(data, batch_size)
        for batch in batches if only is None else [batches[b] for b in only]:
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if isinstance(data, torch.Tensor):
                kwargs["use_cache"] = False
            with contextlib.suppress(_StopForward):
                model(**kwargs)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    hidden = [call[0] for call in recorders[0].calls]
    extras = [[(call[1], call[2]) for call in rec.calls] for rec in recorders]
    return name, blocks, hidden, extras


def run_block(block: nn.Module, hidden: torch.Tensor, extra: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = extra
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


BlockCallback = Callable[[int, str, nn.Module, dict[str, LinearStats]], None]
GroupCallback = Callable[[list[int], list[str], list[nn.Module], list[dict[str, LinearStats]]], None]


def _collect_stats(block: nn.Module, hidden: list, extras: list, targets, kinds: tuple[str, ...],
                   keep_outputs: bool = True, team: parallel.Team = parallel.Team(), batches: int | None = None):
    """Run every batch through ``block`` with hooks on its targeted Linears.
    Returns (statistics by Linear name, the block's outputs per batch, or [] when not kept).

    Under torchrun (``team.world`` > 1) this process holds batches rank, rank + world, ... of ``batches`` in
    all: the processes run a round of ``world`` batches at a time and every batch's increments are shared
    and added in batch order in every process, so each holds the statistics of all the batches, the same,
    bit for bit, as one process running them all."""
    linears = target_linears(block, targets)
    names = list(linears)
    layer_stats = {n: LinearStats(linear_weight(m).shape[1]) for n, m in linears.items()}
    batches = len(hidden) if batches is None else batches
    # Linears fed the same tensor (q/k/v, gate/up) share one computation per batch.
    shared: dict[int, tuple[torch.Tensor, _Increment]] = {}
    recorded: dict[str, list[_Increment]] = {n: [] for n in names}  # this batch's increments, in call order

    def hook_for(layer_name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            hit = shared.get(id(x))
            if hit is None or hit[0] is not x:
                hit = (x, _increment(x, kinds))
                shared[id(x)] = hit
            recorded[layer_name].append(hit[1])
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
    outputs = []
    device = hidden[0].device if hidden else torch.device("cpu")
    try:
        for round_ in range(-(-batches // team.world)):
            shared.clear()
            for increments in recorded.values():
                increments.clear()
            with team.together():  # a failure here (out of memory, say) stops every process, not only this one
                if round_ < len(hidden):
                    out = run_block(block, hidden[round_], extras[round_])
                    if keep_outputs:
                        outputs.append(out)
            for src in range(min(team.world, batches - round_ * team.world)):
                increments = recorded if team.world == 1 else _share_increments(
                    recorded if src == team.rank else None, names, kinds, src, device)
                for name in names:
                    for increment in increments[name]:
                        layer_stats[name].add(increment)
    finally:
        for handle in handles:
            handle.remove()
        shared.clear()
    return layer_stats, outputs


def _share_increments(recorded: dict[str, list[_Increment]] | None, names: list[str], kinds: tuple[str, ...],
                      src: int, device: torch.device) -> dict[str, list[_Increment]]:
    """One batch's increments, from the process ``src`` that ran it (``recorded``, None elsewhere), in every
    process: a layout (per Linear, how many increments and which distinct one each is), the token counts,
    then each distinct increment's tensors once (q/k/v share theirs)."""
    if recorded is not None:
        distinct: dict[int, int] = {}  # id of an increment -> its position among the distinct ones
        order: list[_Increment] = []
        layout: list[int] = []
        for name in names:
            layout.append(len(recorded[name]))
            for increment in recorded[name]:
                if id(increment) not in distinct:
                    distinct[id(increment)] = len(order)
                    order.append(increment)
                layout.append(distinct[id(increment)])
        tensors = [torch.tensor(layout, dtype=torch.int64), torch.tensor([d.tokens for d in order])]
        tensors += [t for d in order for t in (getattr(d, f) for f in _SUMMED) if t is not None]
        parallel.broadcast_tensors(tensors, src)
        return recorded
    tensors = parallel.broadcast_tensors(None, src)
    layout, tokens = tensors[0].tolist(), tensors[1].tolist()
    fields = [f for f in _SUMMED if _SUMMED_KIND[f] in kinds]
    received = []
    for i, count in enumerate(tokens):
        parts = [t.to(device) for t in tensors[2 + len(fields) * i: 2 + len(fields) * (i + 1)]]
        values = dict.fromkeys(_SUMMED)
        values.update(zip(fields, parts))
        received.append(_Increment(count, **values))
    out, pos = {}, 0
    for name in names:
        count = layout[pos]
        out[name] = [received[j] for j in layout[pos + 1: pos + 1 + count]]
        pos += 1 + count
    return out


@torch.no_grad()
def calibrate_groupwise(
    model: nn.Module,
    data: torch.Tensor,
    on_group: GroupCallback,
    *,
    group_size: int = 1,
    targets: Iterable[str] | None = None,
    stats: Sequence[str] = STAT_KINDS,
    sequential: bool = True,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "calibrating",
) -> None:
    """Run ``on_group(indices, block_names, blocks, stats_per_block)`` for each
    run of ``group_size`` consecutive blocks (the last run may be shorter).

    Within a group, each block is calibrated on the outputs of the group's
    earlier blocks as they were before the callback; with ``sequential=True``
    the first block of the next group sees the outputs of the compressed
    group. ``data`` is as for :func:`calibrate_blockwise`.
    """
    kinds = tuple(stats)
    unknown = set(kinds) - set(KNOWN_STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {list(KNOWN_STATS)}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    was_training = model.training
    model.eval()
    offloaded = offload.store(model)  # blocks kept on disk: each read before its turn, written back after
    try:
        # under torchrun each process runs every world-th batch (parallel.Team) and the statistics are shared
        team = parallel.current()
        data = data if isinstance(data, torch.Tensor) else list(data)  # an iterator is read once
        batches = len(_batches(data, batch_size))
        mine = list(range(team.rank, batches, team.world))
        list_name, blocks, hidden, extras = capture_block_inputs(model, data, batch_size,
                                                                 None if team.world == 1 else mine)
        if offloaded is not None:
            offloaded.release_rest()  # the embeddings have done their part; saving reads them back
        bar = tqdm(total=len(blocks), desc=desc, unit="block", disable=not progress)
        for first in range(0, len(blocks), group_size):
            group = list(range(first, min(first + group_size, len(blocks))))
            h, group_stats = hidden, []
            for i in group:
                if offloaded is not None:
                    offloaded.materialize(i, blocks[i])
                # the last block's uncompressed outputs are only needed when nothing reruns it
                keep = i != group[-1] or not sequential
                layer_stats, h = _collect_stats(blocks[i], h, extras[i], targets, kinds, keep, team, batches)
                group_stats.append(layer_stats)
            on_group(group, [f"{list_name}.{i}" for i in group], [blocks[i] for i in group], group_stats)
            if sequential:
                h = hidden
                for i in group:
                    h = [run_block(blocks[i], x, extras[i][b]) for b, x in enumerate(h)]
            if offloaded is not None:
                for i in group:
                    offloaded.release(i, blocks[i])
            hidden = h
            # glibc keeps the freed heap of a group's statistics, solves and (offloaded) released weights; left
            # there, the offloaded process grew by about one compressed block per block
            release_memory(collect=False)
            bar.update(len(group))
        bar.close()
    finally:
        model.train(was_training)


@torch.no_grad()
def calibrate_blockwise(
    model: nn.Module,
    data: torch.Tensor,
    on_block: BlockCallback,
    *,
    targets: Iterable[str] | None = None,
    stats: Sequence[str] = STAT_KINDS,
    sequential: bool = True,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "calibrating",
) -> None:
    """Run ``on_block(index, block_name, block, stats_by_linear_name)`` for each block.

    ``data`` is a LongTensor of token ids (samples x seq_len), or a list of
    batches (dicts of model inputs, e.g. a classifier's tokenized examples). With
    ``sequential=False`` block i+1 sees the outputs of the *original* block i
    (the statistics of the uncompressed model, as in one-shot profiling).
    """
    def on_group(indices, names, group_blocks, group_stats):
        on_block(indices[0], names[0], group_blocks[0], group_stats[0])

    calibrate_groupwise(model, data, on_group, group_size=1, targets=targets, stats=stats, sequential=sequential,
                        batch_size=batch_size, progress=progress, desc=desc)
