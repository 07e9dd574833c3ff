"""SLTrain: pretraining with sparse + low-rank weights (Han et al., NeurIPS 2024).

Every Linear inside the transformer blocks of a freshly initialised model is
replaced before training by one of three parameterizations, all trained from
scratch (embeddings, norms and the LM head stay full rank):

- "full": the dense nn.Linear itself (the baseline, untouched);
- "lowrank": W = U @ V, rank r (the low-rank baseline). U and V start as
  Kaiming-uniform matrices, so that U @ V has about the spread of a dense
  Linear's initial weight;
- "sltrain": W = (alpha / r) * B @ A + S with S on a fixed random support of
  density delta, drawn from a per-layer seed (SparseLowRankLinear). The
  paper's start: A Kaiming-uniform, B = 0, the values of S uniform in
  +-1/sqrt(in), so W = S at first.

Training itself is ``workflows.pretrain``; this file only decides what each
weight is.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..surgery import linear_weight, model_targets, replace_module
from ..errors import FactorkitError
from ..factors import LowRankLinear, SparseLowRankLinear

PARAMETERIZATIONS = ("full", "lowrank", "sltrain")


@dataclass
class SLTrainConfig:
    """param: "full", "lowrank" or "sltrain".
    rank: r of the low-rank part (None: a quarter of the smallest Linear
        dimension, the paper's 128 for hidden 512).
    density: delta, the fraction of entries of S that are free (default 0.03, the paper's).
    alpha: the low-rank part is scaled by alpha / r (sltrain only; the paper's 32).
    seed: the supports are drawn from (seed, layer name).
    targets: Linear names inside a block to reparameterize (None: all).
    """

    param: str = "sltrain"
    rank: int | None = None
    density: float = 0.03
    alpha: float = 32.0
    seed: int = 0
    targets: tuple[str, ...] | None = None

    def validate(self) -> None:
        if self.param not in PARAMETERIZATIONS:
            raise FactorkitError(f"unknown parameterization {self.param!r}; use one of {', '.join(PARAMETERIZATIONS)}.")
        if self.rank is not None and self.rank < 1:
            raise FactorkitError(f"rank must be at least 1, got {self.rank}.")
        if not 0.0 < self.density < 1.0:
            raise FactorkitError(f"density (--delta) must lie in (0, 1), got {self.density}; the paper uses 0.03.")
        if not self.alpha > 0:
            raise FactorkitError(f"alpha must be positive, got {self.alpha}.")


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends on the layer's name, not on the order of the walk."""
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def parameterize(model: nn.Module, config: SLTrainConfig) -> nn.Module:
    """Replace the targeted Linears of ``model`` in place; returns the model."""
    config.validate()
    targets = model_targets(model, config.targets)
    if not targets:
        raise FactorkitError("no Linear layer in the blocks matches the targets; check --targets.")
    if config.param == "full":
        return model
    smallest = min(min(linear_weight(m).shape) for m in targets.values())
    rank = config.rank or max(1, smallest // 4)
    if rank > smallest:
        raise FactorkitError(f"rank {rank} exceeds the smallest Linear dimension {smallest}; lower --rank.")
    for name, linear in targets.items():
        weight = linear_weight(linear)
        out_f, in_f = weight.shape
        has_bias = getattr(linear, "bias", None) is not None
        seed = layer_seed(config.seed, name)
        # drawn on the CPU from (seed, layer name) alone: the same start on every device and process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if config.param == "sltrain":
                new = SparseLowRankLinear(in_f, out_f, rank, config.density, seed, config.alpha, has_bias)
            else:
                new = LowRankLinear(in_f, out_f, rank, has_bias)
                with torch.no_grad():
                    for factor in (new.U, new.V):  # Kaiming uniform: entries in +-1/sqrt(fan in)
                        nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
                    if has_bias:
                        new.bias.zero_()
        replace_module(model, name, new.to(device=weight.device, dtype=weight.dtype))
    return model
