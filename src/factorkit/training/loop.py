"""One training loop for every method that trains (DSFormer's STF, the
fine-tuned baselines, and later SLTrain and WaRA).

AdamW on the parameters it is given, linear warm-up then cosine decay
(transformers' schedule), gradient accumulation, gradient clipping, and
checkpoints that resume exactly: batch i is a function of the seed and i
alone, and a checkpoint holds the parameters trained, the optimizer and
schedule state, the RNG state and the loss history, written atomically
(anything else the run depends on, such as DSFormer's starting point, must
be rebuilt deterministically by the caller). A run
stopped anywhere and resumed from its last checkpoint ends where the
uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..errors import FactorkitError

log = logging.getLogger("factorkit")
CHECKPOINT = "train_state.pt"


@dataclass
class TrainConfig:
    """steps: optimizer steps; each sees batch_size * grad_accum sequences.
    lr, weight_decay, warmup (steps of linear warm-up; None: 10% of the steps),
    max_grad_norm (0: no clipping).
    distill: weight of the distillation term, KL(teacher || student) on the
        logits at ``temperature`` (times temperature^2), added to the task loss.
    checkpoint_dir / checkpoint_every: where and how often to save the state
        that resumes the run (None: no checkpoints).
    seed: batch order and anything random in the model (dropout).
    """

    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int | None = 10
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    distill: float = 0.0
    temperature: float = 2.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be at least 0, got {self.warmup}")
        if self.distill < 0 or self.temperature <= 0:
            raise ValueError("distill must be >= 0 and temperature > 0")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step
    seconds: float = 0.0  # wall time of the steps run in this call
    resumed_from: int = 0  # the step a checkpoint resumed from (0: a fresh start)
    evals: list[dict] = field(default_factory=list)  # what on_step returned, with the step
    seconds_before: float = 0.0  # wall time of the steps before a resume (from the checkpoint)
    tokens_before: int = 0  # training tokens of the steps before a resume
    tokens: int = 0  # input tokens seen in this call, all processes together


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run: every optimizer step's
    micro-batch rows are dealt out, rows[rank::world], so the global batch
    (and with it the loss curve) is that of one process."""

    rank: int = 0
    world: int = 1


def batch_rows(step: int, micro: int, config: TrainConfig, n_rows: int) -> torch.Tensor:
    """Row indices of micro-batch ``micro`` of step ``step``: epochs of a seeded
    permutation, so the order depends on nothing but the seed."""
    per_step = config.batch_size * config.grad_accum
    start = (step * per_step + micro * config.batch_size)
    rows = []
    for pos in range(start, start + config.batch_size):
        epoch, i = divmod(pos, n_rows)
        rows.append(int(_epoch_order(config.seed, epoch, n_rows)[i]))
    return torch.tensor(rows)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_rows: int) -> torch.Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


Batch = dict[str, torch.Tensor]


def as_batch(rows: torch.Tensor | Batch) -> Batch:
    """Model inputs with labels: token ids become a causal LM batch (labels = inputs)."""
    return {"input_ids": rows, "labels": rows} if isinstance(rows, torch.Tensor) else rows


def model_loss(model: nn.Module, batch: torch.Tensor | Batch, teacher: nn.Module | None = None,
               distill: float = 0.0, temperature: float = 2.0) -> torch.Tensor:
    """The model's own loss on ``batch`` (next-token cross-entropy for token ids,
    the task head's loss for labelled inputs), plus ``distill`` * T^2 *
    KL(teacher || student) on the logits at temperature T, averaged over the
    positions that have logits (tokens for an LM, samples for a classifier)."""
    batch = as_batch(batch)
    out = model(**batch)
    loss = out.loss
    if teacher is not None and distill > 0:
        with torch.no_grad():
            target = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits = out.logits.flatten(0, -2)
        kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(target.flatten(0, -2) / temperature, -1),
                      log_target=True, reduction="batchmean")
        loss = loss + distill * temperature**2 * kl
    return loss


def rows_of(data: torch.Tensor | Batch) -> int:
    return (data if isinstance(data, torch.Tensor) else next(iter(data.values()))).shape[0]


def take(data: torch.Tensor | Batch, rows: torch.Tensor) -> torch.Tensor | Batch:
    return data[rows] if isinstance(data, torch.Tensor) else {k: v[rows] for k, v in data.items()}


def to_device(batch: torch.Tensor | Batch, device) -> torch.Tensor | Batch:
    return batch.to(device) if isinstance(batch, torch.Tensor) else {k: v.to(device) for k, v in batch.items()}


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _input_tokens(batch: torch.Tensor | Batch) -> int:
    return (batch if isinstance(batch, torch.Tensor) else batch.get("input_ids", next(iter(batch.values())))).numel()


def train(model: nn.Module, data: torch.Tensor | Batch, params: Sequence[tuple[str, nn.Parameter]],
          config: TrainConfig, loss_fn: Callable[[nn.Module, torch.Tensor | Batch], torch.Tensor] = model_loss,
          progress: bool = True, stop_after: int | None = None, desc: str = "train",
          on_step: Callable[[int, float], dict | None] | None = None,
          dist: Distributed = Distributed()) -> TrainResult:
    """Train ``params`` (named, so a checkpoint can be matched to them) of
    ``model`` on the rows of ``data`` (token ids (N, T), or a dict of tensors
    with N rows each, such as input_ids and labels) with ``loss_fn(model, batch)``.

    Everything else in the model is frozen for the run. ``stop_after`` ends
    the call after that many steps in total (as an interruption would), for
    resuming later from the checkpoint. ``on_step(done, loss)`` runs after
    every optimizer step; a dict it returns (an evaluation) is kept, with the
    step, in ``result.evals`` and in the checkpoint.

    Data parallel: ``model`` is the DistributedDataParallel wrapper, ``params``
    the wrapped module's parameters, ``dist`` this process's rank. Each
    process runs its share of every micro-batch, the wrapper averages the
    gradients, the logged loss is the mean over processes, and only rank 0
    writes checkpoints. Sharded (FSDP2, ``torch.distributed.fsdp.fully_shard``):
    ``model`` is the sharded model itself and ``params`` its DTensor
    parameters; a checkpoint gathers the full parameters and optimizer state
    (every process takes part, rank 0 writes), so it resumes on any number of
    processes, and loading shards it again.
    """
    config.validate()
    if config.batch_size % dist.world:
        raise FactorkitError(f"the batch of {config.batch_size} sequences does not split over {dist.world} "
                             "processes; make --batch-size a multiple of the number of processes.")
    names = [n for n, _ in params]
    tensors = [p for _, p in params]
    sharded = any(isinstance(p, DTensor) for p in tensors)
    frozen = [p for p in model.parameters() if p.requires_grad and not any(p is t for t in tensors)]
    for p in frozen:
        p.requires_grad_(False)
    for p in tensors:
        p.requires_grad_(True)
    decay = [p for p in tensors if p.ndim >= 2]
    no_decay = [p for p in tensors if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    warmup = max(1, config.steps // 10) if config.warmup is None else min(config.warmup, config.steps)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
    result = TrainResult()
    start = 0
    ckpt = Path(config.checkpoint_dir) / CHECKPOINT if config.checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["names"] != names or [tuple(t.shape) for t in state["params"]] != [tuple(p.shape) for p in tensors]:
            raise FactorkitError(f"the checkpoint in {config.checkpoint_dir} is of another run (other parameters "
                                 "or shapes); use a fresh checkpoint folder or delete it.")
        if sharded:  # names are the model's own: the sharded parameters load through torch's state-dict API
            set_model_state_dict(model, dict(zip(names, state["params"])),
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            with torch.no_grad():
                for p, saved in zip(tensors, state["params"]):
                    p.copy_(saved)
        if sharded or state.get("sharded"):  # a gathered optimizer state, keyed by parameter name
            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        start = result.resumed_from = state["step"]
        result.losses = list(state["losses"])
        result.evals = list(state.get("evals", []))
        result.seconds_before, result.tokens_before = state.get("seconds", 0.0), state.get("tokens", 0)
        log.info("%s: resumed from step %d of %d", desc, start, config.steps)
    elif ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
    else:
        torch.manual_seed(config.seed)

    def checkpoint(step: int) -> None:
        if sharded:  # collectives: every process gathers, rank 0 writes
            saved = [p.full_tensor().detach().cpu() for p in tensors]
            optim = get_optimizer_state_dict(model, optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            saved, optim = [p.detach().cpu() for p in tensors], optimizer.state_dict()
        if dist.rank == 0:
            _save(ckpt, {"step": step, "names": names, "params": saved, "optimizer": optim, "sharded": sharded,
                         "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "losses": result.losses,
                         "evals": result.evals, "seconds": result.seconds_before + time.perf_counter() - t0,
                         "tokens": result.tokens_before + result.tokens})

    was_training = model.training
    model.train()
    device = tensors[0].device
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    t0 = time.perf_counter()
    bar = tqdm(range(start, end), desc=desc, disable=not progress or dist.rank != 0, unit="step", initial=start,
               total=config.steps)
    try:
        for step in bar:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(config.grad_accum):
                rows = batch_rows(step, micro, config, rows_of(data))[dist.rank::dist.world]
                batch = to_device(take(data, rows), device)
                result.tokens += _input_tokens(batch) * dist.world
                # gradients are averaged across processes on the last micro-batch only
                last = micro == config.grad_accum - 1
                if sharded:
                    model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if last or dist.world == 1 or sharded else model.no_sync()
                with sync:
                    loss = loss_fn(model, batch) / config.grad_accum
                    loss.backward()
                total += loss.detach()
            if dist.world > 1:
                torch.distributed.all_reduce(total)
                total /= dist.world
            total = float(total)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(tensors, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(total)
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{result.tokens / (time.perf_counter() - t0):.0f}")
            done = step + 1
            if on_step is not None:
                record = on_step(done, total)
                if record:
                    result.evals.append({"step": done, **record})
            due = done % config.checkpoint_every == 0 or done == end
            if ckpt is not None and due and (dist.rank == 0 or sharded):
                checkpoint(done)
    finally:
        bar.close()
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    result.seconds = time.perf_counter() - t0
    return result
