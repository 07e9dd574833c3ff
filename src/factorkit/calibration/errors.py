"""Per-matrix errors: how far an approximation W' of each weight W is from W
on the calibration inputs X the dense model gives that matrix,

    ||X (W - W')^T||_F / ||X W^T||_F = sqrt(tr(D G D^T) / tr(W G W^T)),  D = W - W',  G = X^T X.

The statistics are those of the dense model (one pass, every block fed the
dense outputs of the one before, nothing replaced), so the errors of several
methods compare matrix by matrix: where a perplexity gap comes from.
"""

from __future__ import annotations

import contextlib

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .engine import LinearStats, calibrate_blockwise
from ..surgery import linear_weight, target_linears

# W (float64, out x in) and the statistics of its inputs -> W' (out x in)
Approximation = Callable[[torch.Tensor, LinearStats], torch.Tensor]


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W - W')^T||_F / ||X W^T||_F from the Gram matrix ``gram`` = X^T X of the inputs, in float64."""
    W = weight.double()
    D = W - approx.double()
    return (float(((D @ gram) * D).sum()) / float(((W @ gram) * W).sum())) ** 0.5


class _Done(Exception):
    """Raised after the last block asked for: the blocks after it need no pass."""


def _visit_dense(model: nn.Module, data: Any, visit: Callable[[str, torch.Tensor, LinearStats], None], *,
                 blocks: Iterable[int] | None, targets: Iterable[str] | None, stats: Iterable[str], batch_size: int,
                 progress: bool, desc: str) -> None:
    """visit(full name, weight, input statistics) for each targeted Linear of ``blocks`` (None: all)."""
    wanted = None if blocks is None else set(blocks)
    kinds = ("gram", *(s for s in stats if s != "gram"))

    def on_block(index: int, block_name: str, block: nn.Module, block_stats: dict[str, LinearStats]) -> None:
        if wanted is None or index in wanted:
            for name, linear in target_linears(block, targets).items():
                visit(f"{block_name}.{name}", linear_weight(linear).detach(), block_stats[name])
        if wanted is not None and index >= max(wanted):
            raise _Done

    with contextlib.suppress(_Done):  # stopped after the last block asked for
        calibrate_blockwise(model, data, on_block, targets=targets, stats=kinds, sequential=False,
                            batch_size=batch_size, progress=progress, desc=desc)


def relative_output_errors(model: nn.Module, data: Any, approximations: Mapping[str, Approximation], *,
                           blocks: Iterable[int] | None = None, targets: Iterable[str] | None = None,
                           stats: Iterable[str] = ("gram",), batch_size: int = 4, progress: bool = True
                           ) -> dict[str, dict[str, float]]:
    """``errors[label][full matrix name]``: :func:`relative_output_error` of ``approximations[label](W, stats)``
    for every targeted Linear of the dense ``model`` (of ``blocks`` only, if given), calibrated on ``data``
    (token ids, or batches as for ``calibration.calibrate_blockwise``). ``stats`` names what else the
    approximations read (``"abs_mean"``); the Gram is always collected. The model is left unchanged."""
    errors: dict[str, dict[str, float]] = {label: {} for label in approximations}

    def visit(name: str, weight: torch.Tensor, linear_stats: LinearStats) -> None:
        W = weight.double()
        for label, approximate in approximations.items():
            errors[label][name] = relative_output_error(W, approximate(W, linear_stats), linear_stats.gram)

    _visit_dense(model, data, visit, blocks=blocks, targets=targets, stats=stats, batch_size=batch_size,
                 progress=progress, desc="per-matrix errors")
    return errors


def linear_inputs(model: nn.Module, data: Any, *, blocks: Iterable[int], targets: Iterable[str] | None = None,
                  stats: Iterable[str] = ("gram",), batch_size: int = 4, progress: bool = True
                  ) -> dict[str, tuple[torch.Tensor, LinearStats]]:
    """(weight, input statistics) of every targeted Linear of ``blocks`` of the dense ``model``, by full name:
    the problems a solver study measures against. Every requested Gram is held in memory, so ask for few
    blocks; the pass stops after the last of them."""
    found: dict[str, tuple[torch.Tensor, LinearStats]] = {}

    def visit(name: str, weight: torch.Tensor, linear_stats: LinearStats) -> None:
        found[name] = (weight.clone(), linear_stats)

    _visit_dense(model, data, visit, blocks=blocks, targets=targets, stats=stats, batch_size=batch_size,
                 progress=progress, desc="block statistics")
    return found


__all__ = ["Approximation", "linear_inputs", "relative_output_error", "relative_output_errors"]
