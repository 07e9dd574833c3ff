"""One training loop for every method that trains (DSFormer's STF, the
fine-tuned baselines, and later SLTrain and WaRA).

AdamW on the parameters it is given, linear warm-up then cosine decay
(transformers' schedule), gradient accumulation, gradient clipping, and
checkpoints that resume exactly: batch i is a function of the seed and i
alone, and a checkpoint holds the parameters trained, the optimizer and
schedule state, the RNG state and the loss history, written atomically
as safetensors + JSON (nothing is unpickled). Anything else the run depends
on, such as DSFormer's starting point, must be rebuilt deterministically by
the caller; a fingerprint of the data, the settings, the starting values and
the caller's ``run`` description keeps a checkpoint from resuming another
run. A run stopped anywhere and resumed from its last checkpoint ends where
the uninterrupted run ends.

A sharded (FSDP2) run saves through ``torch.distributed.checkpoint`` (DCP)
instead: every process writes its own shards of the parameters and AdamW
state into one safetensors file of a ``train_state-<step>/`` folder (DCP's
Hugging Face storage writer: the shard offsets live in each file's JSON
header, so there is no pickled ``.metadata``), nothing is gathered, and DCP
reshards on load, so the state resumes on any number of processes, one
included. The single-file format stays readable by every run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint import load as dcp_load, save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..config import Config, non_negative, option, optional, positive, positive_int, whole
from ..errors import FactorkitError, NonFiniteLossError
from ..models.files import atomic_file
from ..models.partial import fingerprint

log = logging.getLogger("factorkit")
STATE = "train_state.json"  # written last: it names the tensors file (or DCP folder) of its step: a whole state
OLD_STATE = "train_state.pt"  # the pickled format of earlier versions: refused, never read
_STATE_KEYS = ("run", "step", "names", "shapes", "tensors", "optimizer", "schedule", "losses", "evals", "seconds",
               "tokens", "sharded")


@dataclass
class TrainConfig(Config):
    """One training run of the shared loop. Owners nest it (``DSFormerConfig.train``,
    ``PretrainConfig.train``, ``FinetuneConfig.train``) with their own defaults."""

    steps: int = option(200, "optimizer steps; each sees batch_size * grad_accum sequences", check=positive_int)
    lr: float = option(1e-4, "AdamW peak learning rate", check=positive)
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)", check=non_negative)
    warmup: int | None = option(10, "steps of linear warm-up before the cosine decay (none: 10% of the steps)",
                                check=optional(whole(0)))
    batch_size: int = option(4, "sequences per micro-batch", check=positive_int)
    grad_accum: int = option(1, "micro-batches per optimizer step", check=positive_int)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)", check=non_negative)
    distill: float = option(0.0, "weight of KL(teacher || student) on the logits at the temperature (times T^2), "
                                 "added to the task loss", check=non_negative)
    temperature: float = option(2.0, "distillation temperature", check=positive)
    checkpoint_dir: str | None = option(None, "save the training state here; a rerun with the same folder resumes",
                                        record=False)
    checkpoint_every: int = option(50, "steps between checkpoints", check=positive_int, record=False)
    seed: int = option(0, "batch order and anything random in the model (dropout)", check=whole(0))

    @property
    def sequences_per_step(self) -> int:
        """Rows one optimizer step takes: batch_size x grad_accum."""
        return self.batch_size * self.grad_accum


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
    start = (step * config.sequences_per_step + micro * config.batch_size)
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


def train_rows(data: Any, who: str) -> torch.Tensor | Batch:
    """What a training run takes rows from: token ids (N, T) as they are, or a list of labelled batches (dicts
    of equal-length model inputs with ``input_ids`` and ``labels``) merged into one dict of N rows each. ``who``
    names the caller in the errors."""
    if isinstance(data, torch.Tensor):
        return data
    if not all("labels" in b and "input_ids" in b for b in data):
        raise FactorkitError(f"{who}'s labelled batches need 'input_ids' and 'labels' in every batch.")
    try:
        return {k: torch.cat([torch.as_tensor(b[k]) for b in data]) for k in data[0]}
    except RuntimeError:
        raise FactorkitError(f"{who}'s labelled batches must have sequences of one length (pad them to one "
                             "length before passing them).") from None


def rows_of(data: torch.Tensor | Batch) -> int:
    return (data if isinstance(data, torch.Tensor) else next(iter(data.values()))).shape[0]


def take(data: torch.Tensor | Batch, rows: torch.Tensor) -> torch.Tensor | Batch:
    return data[rows] if isinstance(data, torch.Tensor) else {k: v[rows] for k, v in data.items()}


def to_device(batch: torch.Tensor | Batch, device) -> torch.Tensor | Batch:
    return batch.to(device) if isinstance(batch, torch.Tensor) else {k: v.to(device) for k, v in batch.items()}


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded DTensor: every process calls it)."""
    return p.full_tensor() if isinstance(p, DTensor) else p


def _run_digest(run: Mapping[str, Any] | None, config: TrainConfig, data: torch.Tensor | Batch,
                named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """What a checkpoint must have been trained from to be resumed: the caller's description, the settings
    (where and how often to save aside), the data and the starting values of the trained parameters
    (hashed one at a time, so a sharded model is never gathered whole)."""
    settings = config.to_dict()  # without checkpoint_dir and checkpoint_every: a resume may move or re-space them
    start = [(n, fingerprint(_full(p))) for n, p in named]
    return fingerprint(dict(run or {}), settings, data, start)


def _write_state(folder: Path, meta: dict, params: dict[str, torch.Tensor], optim: dict) -> None:
    """The tensors go to a file named by the step, then the JSON that names it replaces the last one:
    a crash between the two leaves the previous state whole. Optimizer state (keyed by index, or by
    parameter name when gathered from FSDP2) is flattened to ``optim.<key>.<field>``."""
    tensors = {f"param.{n}": t for n, t in params.items()}
    tensors["rng"] = torch.get_rng_state()
    for key, fields in optim["state"].items():
        tensors.update({f"optim.{key}.{f}": v for f, v in fields.items()})
    name = f"train_state-{meta['step']}.safetensors"
    with atomic_file(folder / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    # [key, fields] pairs keep integer keys integers through JSON
    optimizer = {"state": [[key, list(fields)] for key, fields in optim["state"].items()],
                 "param_groups": optim["param_groups"]}
    _write_meta(folder, {**meta, "tensors": name, "optimizer": optimizer})


def _write_meta(folder: Path, meta: dict) -> None:
    """The JSON that names the step's tensors replaces the last one; then the older tensors go."""
    with atomic_file(folder / STATE) as tmp:
        tmp.write_text(json.dumps(meta, default=float))
    for stale in folder.glob("train_state-*"):
        if stale.name != meta["tensors"] and stale.name != STATE:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, params: Sequence[tuple[str, torch.Tensor]]
               ) -> tuple[dict, list]:
    """This process's part of a training state as DCP saves and loads it: the trained parameters (their
    local shards when sharded), AdamW's moments and steps keyed by parameter name (torch creates them,
    zero, before a first step, so a fresh optimizer is a template to load into) and the RNG state;
    and the optimizer's param_groups (numbers and names: they go to the JSON)."""
    optim = get_optimizer_state_dict(model, optimizer)
    return {"param": dict(params), "optim": optim["state"], "rng": torch.get_rng_state()}, optim["param_groups"]


def _write_sharded_state(folder: Path, meta: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                         params: Sequence[tuple[str, torch.Tensor]], dist: Distributed) -> None:
    """Every process writes its shards to ``train_state-<step>/`` (DCP, safetensors); rank 0 then names
    the folder in the JSON. A folder left by an interrupted save of the same step is cleared first, so
    no shard of another world size is read with this one."""
    name = f"train_state-{meta['step']}"
    if dist.rank == 0:
        shutil.rmtree(folder / name, ignore_errors=True)
        (folder / name).mkdir(parents=True)
    torch.distributed.barrier()
    state, groups = _dcp_state(model, optimizer, params)
    dcp_save(state, storage_writer=HuggingFaceStorageWriter(str(folder / name), save_distributed=True))
    torch.distributed.barrier()  # every shard is on disk before the JSON names the folder
    if dist.rank == 0:
        _write_meta(folder, {**meta, "format": "dcp", "tensors": name, "optimizer": {"param_groups": groups}})


def _damaged(path: Path, err: Exception) -> FactorkitError:
    return FactorkitError(f"{path} is not a readable training state ({err}); delete the checkpoint folder "
                          f"{path.parent} or use a fresh one.")


def _read_meta(folder: Path, digest: str) -> dict:
    """The JSON of the last state in ``folder``, checked against this run."""
    path = folder / STATE
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in _STATE_KEYS if k not in meta]
        if missing:
            raise ValueError(f"no {missing[0]!r}")
    except (OSError, ValueError, TypeError) as err:  # TypeError: JSON that is not an object
        raise _damaged(path, err) from None
    if meta["run"] != digest:
        raise FactorkitError(f"{folder} holds the training state of another run (other data, settings or starting "
                             "weights); use a fresh checkpoint folder or delete it.")
    return meta


def _read_state(folder: Path, meta: dict, named: Sequence[tuple[str, torch.Tensor]]) -> dict:
    """The tensors of a single-file state."""
    path = folder / Path(str(meta["tensors"])).name
    try:
        saved = load_file(str(path))
        params = {n: saved[f"param.{n}"] for n, _ in named}
        wrong = [n for n, p in named if params[n].shape != p.shape]
        if wrong:
            raise ValueError(f"{wrong[0]} has shape {tuple(params[wrong[0]].shape)}")
        optim = {"state": {key: {f: saved[f"optim.{key}.{f}"] for f in fields}
                           for key, fields in meta["optimizer"]["state"]},
                 "param_groups": meta["optimizer"]["param_groups"]}
        if saved["rng"].dtype != torch.uint8:
            raise ValueError("the RNG state is not bytes")
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as err:
        raise _damaged(path, err) from None
    return {"params": params, "optimizer": optim, "rng": saved["rng"]}


def _read_sharded_state(folder: Path, meta: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                        params: Sequence[tuple[str, torch.Tensor]]) -> None:
    """A DCP state loaded in place into the parameters and optimizer of this run, whatever the number of
    processes that saved it and that load it (DCP reads the overlap of each saved shard with each local one)."""
    path = folder / Path(str(meta["tensors"])).name
    try:
        if not path.is_dir():
            raise FileNotFoundError(f"no folder {path.name}")
        state, _ = _dcp_state(model, optimizer, params)
        with warnings.catch_warnings():  # one process reading a sharded state is what is meant: no warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(state, storage_reader=HuggingFaceStorageReader(str(path)))
        set_optimizer_state_dict(model, optimizer, {"state": state["optim"],
                                                    "param_groups": meta["optimizer"]["param_groups"]})
        if state["rng"].dtype != torch.uint8:
            raise ValueError("the RNG state is not bytes")
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, SafetensorError, CheckpointException) as err:
        raise _damaged(path, err) from None
    torch.set_rng_state(state["rng"])


def _load_gathered(model: nn.Module, optimizer: torch.optim.Optimizer, params: Sequence[tuple[str, torch.Tensor]],
                   sharded: bool, meta: dict, state: dict) -> None:
    """A single-file state into this run, sharded or not."""
    if sharded:  # names are the model's own: the sharded parameters load through torch's state-dict API
        set_model_state_dict(model, state["params"], options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            for n, p in params:
                p.copy_(state["params"][n])
    optim = state["optimizer"]
    if sharded and not meta["sharded"]:  # keyed by index, as one process saves it: the same order names them
        name_of = {id(p): n for n, p in params}
        order = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
        optim = {"state": {order[int(k)]: v for k, v in optim["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optim["param_groups"]]}
    if sharded or meta["sharded"]:  # a gathered optimizer state, keyed by parameter name
        set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim)
    torch.set_rng_state(state["rng"])


MAX_LOGITS = 2**27  # logits one backward pass holds at most when training on token ids: 512 MiB at float32


def rows_per_piece(model: nn.Module, data: torch.Tensor | Batch, max_logits: int | None) -> int | None:
    """How many rows of token ids one forward/backward pass takes so that its logits (rows x length x
    vocabulary) stay within ``max_logits``; None: the whole micro-batch (labelled batches, whose losses
    average over a varying number of tokens, and models without ``config.vocab_size``). The loss and its
    intermediates hold several copies of the logits: a distillation step of Gemma-3-270M (262k vocabulary) at
    4 x 512 tokens peaked at 19 GiB in one pass and 7 GiB in four (benchmarks/bench_heal_memory.py)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if max_logits is None or not isinstance(data, torch.Tensor) or not isinstance(vocab, int) or data.dim() != 2:
        return None
    return max(1, max_logits // (int(data.shape[1]) * vocab))


def split_rows(batch: torch.Tensor | Batch, rows: int | None) -> list[torch.Tensor | Batch]:
    """Token ids ``batch`` in consecutive pieces of at most ``rows`` rows; anything else (None) whole."""
    if rows is None or rows_of(batch) <= rows:
        return [batch]
    return list(batch.split(rows))


def _input_tokens(batch: torch.Tensor | Batch) -> int:
    return (batch if isinstance(batch, torch.Tensor) else batch.get("input_ids", next(iter(batch.values())))).numel()


def train(model: nn.Module, data: torch.Tensor | Batch, params: Sequence[tuple[str, nn.Parameter]],
          config: TrainConfig, loss_fn: Callable[[nn.Module, torch.Tensor | Batch], torch.Tensor] = model_loss,
          progress: bool = True, stop_after: int | None = None, desc: str = "train",
          on_step: Callable[[int, float], dict | None] | None = None,
          dist: Distributed = Distributed(), run: Mapping[str, Any] | None = None,
          nonfinite_hint: str = "lower the learning rate or train in float32",
          max_logits: int | None = MAX_LOGITS) -> TrainResult:
    """Train ``params`` (named, so a checkpoint can be matched to them) of
    ``model`` on the rows of ``data`` (token ids (N, T), or a dict of tensors
    with N rows each, such as input_ids and labels) with ``loss_fn(model, batch)``.

    Everything else in the model is frozen for the run. ``stop_after`` ends
    the call after that many steps in total (as an interruption would), for
    resuming later from the checkpoint. ``on_step(done, loss)`` runs after
    every optimizer step; a dict it returns (an evaluation) is kept, with the
    step, in ``result.evals`` and in the checkpoint.

    ``run``: a JSON-able description (tensors allowed) of what else the run
    depends on (the method's settings, the frozen weights); with the settings,
    the data and the starting values of ``params`` it must match the
    checkpoint's for a resume, otherwise the checkpoint is refused. A NaN or
    infinite loss or gradient norm stops the run (NonFiniteLossError, ending
    in ``nonfinite_hint``) before that step is taken or saved.

    Data parallel: ``model`` is the DistributedDataParallel wrapper, ``params``
    the wrapped module's parameters, ``dist`` this process's rank. Each
    process runs its share of every micro-batch, the wrapper averages the
    gradients, the logged loss is the mean over processes, and only rank 0
    writes checkpoints. Sharded (FSDP2, ``torch.distributed.fsdp.fully_shard``):
    ``model`` is the sharded model itself and ``params`` its DTensor
    parameters; every process writes its shards of the parameters and
    optimizer state through DCP (nothing is gathered) and DCP reshards them on
    load, so the state resumes on any number of processes. The starting values are
    fingerprinted whole there too (gathered one parameter at a time), so a
    sharded run and a single-process run of the same settings share checkpoints.

    Memory: on token ids each micro-batch runs in pieces whose logits stay within ``max_logits``
    (:func:`rows_per_piece`; None: in one pass), each piece's loss weighted by its share of the rows, so the
    gradient is the micro-batch's (``loss_fn`` must average over rows of equal length, as ``model_loss``
    does) and the peak memory of a large vocabulary a fraction of it. The settings, and with them the
    checkpoints, do not change.
    """
    config.validate()
    if config.batch_size % dist.world:
        raise FactorkitError(f"the batch of {config.batch_size} sequences does not split over {dist.world} "
                             "processes; make --batch-size a multiple of the number of processes.")
    folder = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise FactorkitError(f"the checkpoint folder {folder} is a file; choose a folder path.")
    if folder is not None and (folder / OLD_STATE).exists():
        raise FactorkitError(f"{folder} holds a training state in the old pickled format ({OLD_STATE}), which "
                             "factorkit does not read; delete it or use a fresh checkpoint folder.")
    names = [n for n, _ in params]
    tensors = [p for _, p in params]
    sharded = any(isinstance(p, DTensor) for p in tensors)
    digest = _run_digest(run, config, data, params) if folder is not None else None  # before any step
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
    if folder is not None and (folder / STATE).exists():
        meta = _read_meta(folder, digest)
        if meta.get("format") == "dcp":
            _read_sharded_state(folder, meta, model, optimizer, params)
        else:
            _load_gathered(model, optimizer, params, sharded, meta, _read_state(folder, meta, params))
        schedule.load_state_dict(meta["schedule"])
        start = result.resumed_from = meta["step"]
        result.losses, result.evals = list(meta["losses"]), list(meta["evals"])
        result.seconds_before, result.tokens_before = meta["seconds"], meta["tokens"]
        log.info("%s: resumed from step %d of %d", desc, start, config.steps)
    else:
        torch.manual_seed(config.seed)

    def checkpoint(step: int) -> None:
        meta = {"run": digest, "step": step, "names": names, "shapes": [list(p.shape) for p in tensors],
                "sharded": sharded, "schedule": schedule.state_dict(), "losses": result.losses,
                "evals": result.evals, "seconds": result.seconds_before + time.perf_counter() - t0,
                "tokens": result.tokens_before + result.tokens}
        if sharded:  # every process writes its own shards
            _write_sharded_state(folder, meta, model, optimizer, params, dist)
        else:
            _write_state(folder, meta, {n: p.detach().cpu() for n, p in params}, optimizer.state_dict())

    def stop_if_nonfinite(what: str, value: float, at: int) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the training {what} became {value} at step {at}; "
                                     f"{nonfinite_hint.rstrip('.')}.")

    piece_rows = rows_per_piece(getattr(model, "module", model), data, max_logits)
    was_training = model.training
    model.train()
    device = tensors[0].device
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    t0 = time.perf_counter()
    bar = tqdm(range(start, end), desc=desc, disable=not progress or dist.rank != 0, unit="step", initial=start,
               total=config.steps)
    try:
        for step in bar:
            done = step + 1
            total = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(config.grad_accum):
                rows = batch_rows(step, micro, config, rows_of(data))[dist.rank::dist.world]
                batch = to_device(take(data, rows), device)
                result.tokens += _input_tokens(batch) * dist.world
                pieces = split_rows(batch, piece_rows)
                for j, piece in enumerate(pieces):
                    # gradients are averaged across processes on the last piece of the last micro-batch only
                    last = micro == config.grad_accum - 1 and j == len(pieces) - 1
                    if sharded:
                        model.set_requires_gradient_sync(last)
                    sync = contextlib.nullcontext() if last or dist.world == 1 or sharded else model.no_sync()
                    with sync:
                        share = rows_of(piece) / rows_of(batch)
                        loss = loss_fn(model, piece) * (share / config.grad_accum)
                        loss.backward()
                    total += loss.detach()
            if dist.world > 1:
                torch.distributed.all_reduce(total)
                total /= dist.world
            total = float(total)
            # the same value on every process (reduced), so all of them stop together
            stop_if_nonfinite("loss", total, done)
            # max_norm inf scales by exactly 1: the norm is checked even without clipping
            norm = torch.nn.utils.clip_grad_norm_(tensors, config.max_grad_norm or math.inf)
            stop_if_nonfinite("gradient norm", float(_full(norm)), done)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(total)
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{result.tokens / (time.perf_counter() - t0):.0f}")
            if on_step is not None:
                record = on_step(done, total)
                if record:
                    result.evals.append({"step": done, **record})
            due = done % config.checkpoint_every == 0 or done == end
            if folder is not None and due and (dist.rank == 0 or sharded):
                checkpoint(done)
    finally:
        bar.close()
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    result.seconds = time.perf_counter() - t0
    return result
