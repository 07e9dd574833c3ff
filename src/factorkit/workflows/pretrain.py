"""Pretraining a small LLaMA from scratch, with full-rank, low-rank or SLTrain
weights, on one process or many (``torchrun``).

    pretrain(PretrainConfig(model="llama-20m", param="sltrain", steps=300))

The recipe: training and held-out text (``data.train_heldout_text``), a
tokenizer (by default a BPE trained on the training text), rows of
``seq_len`` tokens, a seeded LLaMA from the family in ``models.llama`` with
its block Linears reparameterized (``training.sltrain``), then the shared loop
(``training.loop``: AdamW, warm-up + cosine, clipping, resumable
checkpoints) with a held-out evaluation every ``eval_every`` steps.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) every process builds the
same model from the same seed, joins a process group (NCCL on GPUs, gloo on
CPUs) and trains its share of each global batch inside PyTorch's
DistributedDataParallel; the loss curve is that of one process with the
same global batch. ``parallel="fsdp"`` shards the model instead with FSDP2
(``torch.distributed.fsdp.fully_shard``, every decoder layer and then the
root): each process holds 1/N of the parameters, gradients and AdamW state,
for models whose training state outgrows one device; the loss curve is the
same. Multi-node runs are torchrun's business, nothing here.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn

from ..data import pretrain_rows, train_heldout_text
from ..errors import FactorkitError
from ..eval import optimizer_state_bytes, parameter_bytes, peak_memory, perplexity
from ..training.sltrain import SLTrainConfig, parameterize
from ..models.llama import build_llama, llama_config
from ..models.tokenizer import load_tokenizer
from ..training.loop import Distributed, TrainConfig, model_loss, train

log = logging.getLogger("factorkit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class PretrainConfig:
    """model: a name in models.llama.PRETRAIN_CONFIGS or a LlamaConfig JSON file.
    param / rank / density / alpha: the parameterization (training.sltrain).
    text: training text (shakespeare: the calibration plays, the others held out).
    tokenizer: bpe-N trained on the training text, or a model's tokenizer (smollm2-135m).
    batch_size: sequences per micro-batch, all processes together; grad_accum
        micro-batches per optimizer step.
    dtype: float32, or bfloat16 for the weights, gradients and optimizer state.
    eval_every / eval_rows: held-out perplexity on the first eval_rows held-out rows.
    """

    model: str = "llama-20m"
    param: str = "sltrain"
    rank: int | None = None
    density: float = 0.03
    alpha: float = 32.0
    text: str = "shakespeare"
    tokenizer: str = "bpe-4096"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 300
    lr: float = 3e-3
    warmup: int | None = None  # None: 10% of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    eval_every: int = 100
    eval_rows: int = 64
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda
    targets: tuple[str, ...] | None = None
    parallel: str = "ddp"  # under torchrun: ddp (replicated) or fsdp (FSDP2, sharded)

    def validate(self) -> None:
        self.parameterization().validate()
        if self.dtype not in DTYPES:
            raise FactorkitError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise FactorkitError(f"device must be auto, cpu or cuda, got {self.device!r}.")
        if self.parallel not in ("ddp", "fsdp"):
            raise FactorkitError(f"parallel must be ddp or fsdp, got {self.parallel!r}.")
        for name in ("seq_len", "eval_every", "eval_rows"):
            if getattr(self, name) < 1:
                raise FactorkitError(f"{name} must be at least 1, got {getattr(self, name)}.")

    def parameterization(self) -> SLTrainConfig:
        return SLTrainConfig(self.param, self.rank, self.density, self.alpha, self.seed, self.targets)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, warmup=self.warmup,
                           batch_size=self.batch_size, grad_accum=self.grad_accum, max_grad_norm=self.max_grad_norm,
                           checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every,
                           seed=self.seed)


@dataclass
class PretrainResult:
    model: nn.Module  # the trained model (unwrapped); on every process
    tokenizer: object
    losses: list[float]  # training loss of every optimizer step
    evals: list[dict]  # {"step", "loss", "perplexity"} on the held-out rows
    seconds: float  # wall time of the training steps run in this call
    tokens: int  # training tokens seen in this call
    params: dict = field(default_factory=dict)  # total / trainable / in the blocks, bytes of weights and AdamW state
    seconds_before: float = 0.0  # wall time and tokens of the steps before a resume (from the checkpoint)
    tokens_before: int = 0

    def summary(self) -> dict:
        """The whole run, resumed or not: seconds and tokens count the steps before a resume too."""
        return {"losses": self.losses, "evals": self.evals, "seconds": self.seconds_before + self.seconds,
                "tokens": self.tokens_before + self.tokens, **self.params}


def distributed_from_env(device: torch.device) -> Distributed:
    """This process's rank and the world size that torchrun set (1 process without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(tdist.get_rank(), tdist.get_world_size())


def leave_distributed(failed: bool = False) -> None:
    """End this process's part in a torchrun job. After a clean run every process
    waits for the others first, so none tears down gloo's connections while a peer
    still sends (which can abort the process at exit); after a failure it leaves
    at once, since the peers may never reach the barrier."""
    if not tdist.is_initialized():
        return
    if not failed:
        tdist.barrier()
    tdist.destroy_process_group()


def _device(name: str) -> torch.device:
    """cuda:LOCAL_RANK for "cuda" (and for "auto" when there is a GPU), else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FactorkitError("device cuda was asked for but PyTorch sees no GPU; use --device cpu or auto.")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise FactorkitError(f"process {local} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                             "visible); start at most that many processes per node, or use --device cpu.")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def build_model(config: PretrainConfig, vocab_size: int) -> nn.Module:
    """The seeded model with its block Linears reparameterized: a function of the config alone."""
    model = build_llama(llama_config(config.model, vocab_size, config.seq_len), config.seed)
    parameterize(model, config.parameterization())
    return model.to(DTYPES[config.dtype])


def count_parameters(model: nn.Module) -> dict:
    from ..surgery import find_blocks

    _, blocks = find_blocks(model)
    return {"params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params_blocks": sum(p.numel() for p in blocks.parameters()),
            "weight_bytes": parameter_bytes(model)}


def step_memory(model: nn.Module, rows: torch.Tensor, config: PretrainConfig, dist: Distributed = Distributed()
                ) -> dict:
    """Peak tensor memory of one training step (forward, backward, AdamW update)
    on a copy of ``model`` whose optimizer state already exists, and the bytes
    of that state: what a long run holds at its peak."""
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batch = rows[: config.batch_size // dist.world].to(params[0].device)  # one process's micro-batch

    def step() -> None:
        model_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the AdamW moments
    peak = peak_memory(step, params[0].device)
    return {"optimizer_state_bytes": optimizer_state_bytes(optimizer), "peak_step_bytes": peak}


def pretrain(config: PretrainConfig, progress: bool = True, stop_after: int | None = None,
             measure_memory: bool = False) -> PretrainResult:
    """Run (or resume, from ``config.checkpoint_dir``) one pretraining run."""
    config.validate()
    device = _device(config.device)
    dist = distributed_from_env(device)
    train_text, heldout_text = train_heldout_text(config.text, config.seed)
    if dist.rank == 0:  # rank 0 trains and caches the tokenizer; the others then read it
        tokenizer = load_tokenizer(config.tokenizer, train_text)
    if dist.world > 1:
        tdist.barrier()
    if dist.rank != 0:
        tokenizer = load_tokenizer(config.tokenizer, train_text)
    rows, heldout = pretrain_rows(tokenizer, train_text, heldout_text, config.seq_len)
    heldout = heldout[: config.eval_rows]
    if rows.shape[0] < config.batch_size:
        raise FactorkitError(f"the training text has {rows.shape[0]} sequences of {config.seq_len} tokens, fewer "
                             f"than one batch of {config.batch_size}; give more text or a smaller --batch-size.")
    model = build_model(config, len(tokenizer)).to(device)
    params = dict(count_parameters(model))
    if measure_memory:
        params.update(step_memory(model, rows, config, dist))
    wrapped = model
    sharded = dist.world > 1 and config.parallel == "fsdp"
    if sharded:
        shard(model, device, dist)
    elif dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # (sharding replaces them)

    def evaluate(done: int, loss: float) -> dict | None:
        if not math.isfinite(loss):
            raise FactorkitError(f"the training loss became {loss} at step {done}; lower --lr or use --dtype float32.")
        if done % config.eval_every and done != config.steps:
            return None
        result = perplexity(model, heldout, batch_size=8, progress=False)
        if sharded:  # FSDP2 keeps the root's parameters gathered after a forward with no backward
            model.reshard()
        return {"loss": result.nll, "perplexity": result.perplexity}

    trained = train(wrapped, rows, named, config.train_config(), model_loss, progress=progress,
                    stop_after=stop_after, desc=f"pretrain {config.param}", on_step=evaluate, dist=dist)
    if sharded:  # hand back a whole, plain model on every process, as DDP does
        model = unshard(model, build_model(config, len(tokenizer)).to(device))
    return PretrainResult(model, tokenizer, trained.losses, trained.evals, trained.seconds, trained.tokens, params,
                          trained.seconds_before, trained.tokens_before)


def shard(model: nn.Module, device: torch.device, dist: Distributed) -> None:
    """FSDP2 in place: every decoder layer is a unit of its own (gathered just for its forward and backward),
    the root holds the embeddings, final norm and head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unshard(model: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` (the same architecture, unsharded) with the full parameters of the sharded ``model``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    plain.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    return plain


__all__ = ["PretrainConfig", "PretrainResult", "build_model", "count_parameters", "distributed_from_env",
           "pretrain", "shard", "step_memory", "unshard"]
