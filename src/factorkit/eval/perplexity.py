"""Perplexity over non-overlapping chunks.

Each chunk is scored on its own (no carried context), every token but the
first of a chunk is predicted, so ``tokens = chunks * (seq_len - 1)``. The
sum of the negative log-likelihoods is accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import NonFiniteLossError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token, nats
    tokens: int  # predicted tokens counted
    chunks: int
    seq_len: int
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, chunks: torch.Tensor, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of a causal LM on ``chunks`` (LongTensor, chunks x seq_len).

    Runs in the model's own dtype; logits are upcast to float32 for the loss.
    A NaN or infinite loss raises NonFiniteLossError rather than being skipped.
    """
    if chunks.ndim != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must have shape (n, seq_len >= 2), got {tuple(chunks.shape)}")
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, chunks.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
            batch = chunks[start : start + batch_size].to(param.device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            if not torch.isfinite(nll):
                raise NonFiniteLossError(
                    f"the loss on chunks {start}..{start + batch.shape[0] - 1} is {nll.item()}; the model produces "
                    "NaN or infinite logits, try --dtype float32 or a smaller compression ratio."
                )
            total += float(nll.double())
            count += targets.numel()
    finally:
        model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, chunks.shape[0], chunks.shape[1],
                            str(param.dtype).removeprefix("torch."))
