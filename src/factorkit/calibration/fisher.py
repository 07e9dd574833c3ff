"""Empirical Fisher information of the targeted Linear weights.

FWSVD (Hsu et al., 2022) weighs a weight by I_ij = 1/N sum_samples (dL_s/dW_ij)^2,
the mean of the *per-sample* squared gradient, not the square of the mean
gradient. For a Linear with inputs x_t and output gradients g_t of one sample,
dL_s/dW = sum_t g_t x_t^T, so the per-sample gradients of a whole batch come
from one batched matmul of tensors autograd computes anyway. Hooks do that
during an ordinary backward pass: no weight receives a .grad, and only the
per-row and per-column sums of I are kept, so memory stays at the model, one
batch and its activations. Under ``torchrun`` the processes divide the
batches and exchange each batch's sums, added in batch order everywhere: the
result is the one-process result, bit for bit.

The loss is next-token cross-entropy when the data are token ids (a causal
LM), or the model's own loss on labelled batches (a classifier or any model
that returns ``.loss`` when given ``labels``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import parallel
from ..errors import FactorkitError
from ..surgery import linear_weight, model_targets


@dataclass
class FisherStats:
    """Fisher information of one weight W (out x in), reduced along each axis.

    rows[i] = sum_j I_ij (one weight per output channel), cols[j] = sum_i I_ij
    (one per input channel); deletion = sum_ij I_ij W_ij^2, the diagonal-Fisher
    estimate of the loss increase if W were set to zero (used to put different
    matrices' errors on one scale). All are means over samples.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    deletion: float
    samples: int

    @property
    def total(self) -> float:
        return float(self.rows.sum())


def _is_token_tensor(data: Any) -> bool:
    return isinstance(data, torch.Tensor) and data.dtype == torch.long and data.ndim == 2


def _loss_batches(data: Any, batch_size: int) -> list[tuple[dict, int]]:
    """(model kwargs with labels, number of samples) per batch."""
    if _is_token_tensor(data):
        return [({"input_ids": b, "labels": b}, b.shape[0]) for b in data.split(batch_size)]
    batches = list(data) if isinstance(data, Iterable) and not isinstance(data, torch.Tensor) else []
    if not batches or not all(isinstance(b, Mapping) and "labels" in b for b in batches):
        raise FactorkitError("Fisher information needs token ids (samples x seq_len) or labelled batches "
                             "(dicts with 'labels' and the model's inputs); got neither.")
    return [(dict(b), int(torch.as_tensor(b["labels"]).shape[0])) for b in batches]


class _Accumulator:
    """One Linear's sums, and the share of them from the batch being run (added to the sums in batch order, by
    this process or, under torchrun, by whichever process ran that batch)."""

    def __init__(self, module: nn.Module) -> None:
        # The module, not a copy of its weight: a squared copy of every targeted
        # weight would double the model's memory for the whole pass.
        self.module = module
        out_f, in_f = linear_weight(module).shape
        device = linear_weight(module).device
        self.rows = torch.zeros(out_f, dtype=torch.float64, device=device)
        self.cols = torch.zeros(in_f, dtype=torch.float64, device=device)
        self.deletion = 0.0
        self.batch = torch.zeros(out_f + in_f + 1, dtype=torch.float64, device=device)  # rows, cols, deletion

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        # One gradient per sample: (B, out, in) = g^T x summed over that sample's tokens.
        x = x.detach().reshape(x.shape[0], -1, x.shape[-1]).to(torch.float32)
        g = g.detach().reshape(g.shape[0], -1, g.shape[-1]).to(torch.float32)
        per_sample_sq = torch.bmm(g.transpose(1, 2), x).square_().sum(0)  # (out, in), summed over samples
        out_f = self.rows.shape[0]
        self.batch[:out_f] += per_sample_sq.sum(1, dtype=torch.float64)
        self.batch[out_f:-1] += per_sample_sq.sum(0, dtype=torch.float64)
        weight_sq = linear_weight(self.module).detach().to(torch.float32).square()
        self.batch[-1] += (per_sample_sq * weight_sq).sum(dtype=torch.float64)

    def take_batch(self) -> torch.Tensor:
        part, self.batch = self.batch, torch.zeros_like(self.batch)
        return part

    def add_batch(self, part: torch.Tensor) -> None:
        out_f = self.rows.shape[0]
        self.rows += part[:out_f]
        self.cols += part[out_f:-1]
        self.deletion += float(part[-1])


def _backward(model: nn.Module, kwargs: dict, device: torch.device, tokens: bool, n: int) -> None:
    """One batch's forward and backward pass (the hooks collect the gradients)."""
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.enable_grad():
        out = model(**kwargs, use_cache=False) if tokens else model(**kwargs)
        loss = out.loss
        if loss is None:
            raise FactorkitError(f"{type(model).__name__} returned no loss for the labelled batches; "
                                 "pass labels the model accepts.")
        if not torch.isfinite(loss):
            raise FactorkitError("the loss on the Fisher data is not finite; check the data and the model's dtype.")
        # The batch mean times n makes each sample's gradient that of its own mean loss.
        (loss * n).backward()


def collect_fisher(model: nn.Module, data: Any, *, targets: Iterable[str] | None = None, batch_size: int = 1,
                   progress: bool = True, desc: str = "Fisher information") -> dict[str, FisherStats]:
    """Per-sample empirical Fisher of every targeted Linear, keyed by full module name.

    ``data``: token ids (samples x seq_len; loss = next-token cross-entropy,
    one sample per sequence) or an iterable of labelled batches (dicts passed to
    the model, whose returned ``.loss`` must be the batch mean).
    ``batch_size``: token sequences per forward and backward pass. One (the
    default) holds the least: what backward keeps grows with the batch, logits
    over the vocabulary included, and on a CPU one is no slower.
    """
    linears = model_targets(model, targets)
    batches = _loss_batches(data, batch_size)
    acc = {name: _Accumulator(m) for name, m in linears.items()}
    device = next(model.parameters()).device

    def forward_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                x = inputs[0]
                output.register_hook(lambda g: acc[name].add(x, g))
        return hook

    def grad_source(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # Gradients must flow to the Linear outputs although no parameter needs one.
        return output.detach().requires_grad_(True)

    embeddings = model.get_input_embeddings()
    frozen = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    handles = [m.register_forward_hook(forward_hook(n)) for n, m in linears.items()]
    handles.append(embeddings.register_forward_hook(grad_source))
    samples = sum(n for _, n in batches)
    # Under torchrun the processes take turns through the batches, one each per round; every batch's sums are
    # then added in batch order in every process, so each holds what one process would compute.
    team = parallel.current()
    names = list(acc)
    sizes = [acc[name].batch.numel() for name in names]
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        rounds = range(0, len(batches), team.world)
        for first in tqdm(rounds, desc=desc, unit="batch" if team.world == 1 else "round", disable=not progress):
            mine = first + team.rank
            part = None
            with team.together():  # a non-finite loss or out of memory here stops every process
                if mine < len(batches):
                    kwargs, n = batches[mine]
                    _backward(model, kwargs, device, _is_token_tensor(data), n)
                    part = torch.cat([acc[name].take_batch() for name in names])
            for src in range(min(team.world, len(batches) - first)):
                shared = part if team.world == 1 else parallel.broadcast_tensors(
                    [part] if src == team.rank else None, src)[0].to(device)
                for name, piece in zip(names, torch.split(shared, sizes)):
                    acc[name].add_batch(piece)
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return {name: FisherStats((a.rows / samples).cpu(), (a.cols / samples).cpu(), a.deletion / samples, samples)
            for name, a in acc.items()}
