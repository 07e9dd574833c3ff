"""Perplexity over non-overlapping chunks.

Each chunk is scored on its own (no carried context), every token but the
first of a chunk is predicted, so ``tokens = chunks * (seq_len - 1)``. The
sum of the negative log-likelihoods is accumulated in float64. A mean loss
too large for exp (past ~709 nats) gives an infinite perplexity, not an error.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import FactorkitError, NonFiniteLossError

_MAX_LOG = math.log(sys.float_info.max)  # exp of anything larger overflows a float


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


def check_token_ids(model: nn.Module, ids: torch.Tensor, fix: str = "tokenize with the model's own tokenizer") -> None:
    """Refuse token ids the model has no embedding for (an index error deep in the model otherwise,
    or on a GPU an assertion that takes the process down). A model that states no vocabulary
    (no ``config.vocab_size``, no input embeddings) is not checked. ``fix`` ends the sentence."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None and hasattr(model, "get_input_embeddings"):
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if vocab is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if high >= vocab or low < 0:
        raise FactorkitError(f"token id {high if high >= vocab else low} is outside the model's vocabulary of "
                             f"{vocab}; {fix}.")


@torch.no_grad()
def perplexity(model: nn.Module, chunks: torch.Tensor, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity",
               nonfinite_hint: str = "try --dtype float32 or a smaller compression ratio") -> PerplexityResult:
    """Perplexity of a causal LM on ``chunks`` (LongTensor, chunks x seq_len).

    Runs in the model's own dtype; logits are upcast to float32 for the loss.
    A NaN or infinite loss raises NonFiniteLossError (ending in the caller's
    ``nonfinite_hint``) rather than being skipped.
    """
    if (not isinstance(chunks, torch.Tensor) or chunks.ndim != 2 or chunks.shape[1] < 2
            or chunks.dtype not in (torch.long, torch.int32)):
        shown = (f"{chunks.dtype} of shape {tuple(chunks.shape)}" if isinstance(chunks, torch.Tensor)
                 else type(chunks).__name__)
        raise FactorkitError(f"chunks must be token ids, a LongTensor of shape (n, seq_len >= 2), got {shown}.")
    check_token_ids(model, chunks)
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
                    f"NaN or infinite logits, {nonfinite_hint.rstrip('.')}."
                )
            total += float(nll.double())
            count += targets.numel()
    finally:
        model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean) if mean < _MAX_LOG else math.inf, mean, count, chunks.shape[0],
                            chunks.shape[1], str(param.dtype).removeprefix("torch."))
