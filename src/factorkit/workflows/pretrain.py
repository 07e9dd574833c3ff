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
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn

from ..data import pretrain_rows, train_heldout_text
from ..errors import FactorkitError
from .. import parallel
from ..eval import optimizer_state_bytes, parameter_bytes, peak_memory, perplexity
from ..config import Config, nested, open_unit, option, optional, positive, positive_int, whole
from ..training.sltrain import PARAMETERIZATIONS, SLTrainConfig, parameterize
from ..models.checkpoint import parse_dtype
from ..models.llama import PRETRAIN_CONFIGS, build_llama, llama_config
from ..models.tokenizer import load_tokenizer
from ..training.loop import Distributed, TrainConfig, model_loss, train

log = logging.getLogger("factorkit")


@dataclass
class PretrainConfig(Config):
    """One pretraining run: the model shape, its parameterization
    (``training.sltrain``), the text and tokenizer, and the training loop
    (``train``: its seed also draws the model's initial weights and supports)."""

    model: str = option("llama-20m", f"model shape: {', '.join(PRETRAIN_CONFIGS)} or a LlamaConfig JSON file",
                        flag="config")
    param: str = option("sltrain", "parameterization of the block Linears", choices=PARAMETERIZATIONS)
    rank: int | None = option(None, "rank of the low-rank part (default: a quarter of the hidden size)",
                              check=optional(positive_int))
    density: float = option(0.03, "sltrain: density delta of the sparse part (the paper's 0.03)", check=open_unit,
                            flag="delta", when=("param", "sltrain"))
    alpha: float = option(32.0, "sltrain: the low-rank part is scaled by alpha/rank (the paper's 32)",
                          check=positive, when=("param", "sltrain"))
    text: str = option("shakespeare", "training text: shakespeare (calibration plays; the others held out), "
                                      "general (its calib split; eval held out), wikitext2, c4 or a text file "
                                      "(its last 10% held out)")
    tokenizer: str = option("bpe-4096", "bpe-N (trained on the training text) or a model's tokenizer, e.g. "
                                        "smollm2-135m")
    seq_len: int = option(256, "tokens per sequence", check=whole(2))
    dtype: str = option("float32", "dtype of weights, gradients and optimizer state", choices=("float32", "bfloat16"))
    eval_every: int = option(100, "held-out evaluation every N steps", check=positive_int)
    eval_rows: int = option(64, "held-out sequences evaluated", check=positive_int)
    device: str = option("auto", "where to train: auto (a GPU when there is one; one per process under torchrun), "
                                 "cpu, cuda", choices=("auto", "cpu", "cuda"))
    targets: tuple[str, ...] | None = option(None, "Linear names inside a block to reparameterize (None: all)",
                                             cli=False)
    parallel: str = option("ddp", "under torchrun: ddp replicates the model on every process, fsdp shards "
                                  "parameters, gradients and optimizer state over them (FSDP2)",
                           choices=("ddp", "fsdp"))
    train: TrainConfig = nested(TrainConfig, "the training loop (batch_size: sequences per micro-batch, all "
                                             "processes together)", hide=("distill", "temperature"),
                                steps=300, lr=3e-3, warmup=None, batch_size=16, checkpoint_every=100)

    def parameterization(self) -> SLTrainConfig:
        return SLTrainConfig(self.param, self.rank, self.density, self.alpha, self.train.seed, self.targets)


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


leave_distributed = parallel.leave


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
    model = build_llama(llama_config(config.model, vocab_size, config.seq_len), config.train.seed)
    parameterize(model, config.parameterization())
    return model.to(parse_dtype(config.dtype))


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
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
    batch = rows[: config.train.batch_size // dist.world].to(params[0].device)  # one process's micro-batch

    def step() -> None:
        model_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the AdamW moments
    peak = peak_memory(step, params[0].device)
    return {"optimizer_state_bytes": optimizer_state_bytes(optimizer), "peak_step_bytes": peak}


def pretrain(config: PretrainConfig, progress: bool = True, stop_after: int | None = None,
             measure_memory: bool = False) -> PretrainResult:
    """Run (or resume, from ``config.train.checkpoint_dir``) one pretraining run."""
    device = _device(config.device)
    dist = distributed_from_env(device)
    train_text, heldout_text = train_heldout_text(config.text, config.train.seed)
    if dist.rank == 0:  # rank 0 trains and caches the tokenizer; the others then read it
        tokenizer = load_tokenizer(config.tokenizer, train_text)
    if dist.world > 1:
        tdist.barrier()
    if dist.rank != 0:
        tokenizer = load_tokenizer(config.tokenizer, train_text)
    rows, heldout = pretrain_rows(tokenizer, train_text, heldout_text, config.seq_len)
    heldout = heldout[: config.eval_rows]
    if rows.shape[0] < config.train.batch_size:
        raise FactorkitError(f"the training text has {rows.shape[0]} sequences of {config.seq_len} tokens, fewer "
                             f"than one batch of {config.train.batch_size}; give more text or a smaller --batch-size.")
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
        if done % config.eval_every and done != config.train.steps:
            return None
        result = perplexity(model, heldout, batch_size=8, progress=False,
                            nonfinite_hint="lower --lr or use --dtype float32")
        if sharded:  # FSDP2 keeps the root's parameters gathered after a forward with no backward
            model.reshard()
        return {"loss": result.nll, "perplexity": result.perplexity}

    # where and how a run is spread is no part of what it computes: a state resumes on any number of processes
    what = {k: v for k, v in config.to_dict().items() if k not in ("device", "parallel")}
    trained = train(wrapped, rows, named, config.train, model_loss, progress=progress,
                    stop_after=stop_after, desc=f"pretrain {config.param}", on_step=evaluate, dist=dist,
                    run={"pretrain": what}, nonfinite_hint="lower --lr or use --dtype float32")
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
