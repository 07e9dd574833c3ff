"""Low-rank baselines: plain SVD, ASVD and SVD-LLM.

All three replace a Linear of shape (m, n) by a LowRankLinear of rank
r = floor((1 - ratio) * m * n / (m + n)); they differ only in the input-side
scaling applied before truncation:

- svd:    none. Minimises ||W - W'||_F; needs no data.
- asvd:   diag(mean|x|^alpha) (Yuan et al., 2023). Channels with large
          activations are kept more accurately.
- svdllm: the Cholesky factor of X^T X (Wang et al., 2024). Minimises the
          calibration output error ||X W^T - X W'^T||_F exactly.

ASVD and SVD-LLM run through the block-by-block engine, so block i+1 is
calibrated on the outputs of the already compressed block i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..calibration import LinearStats, calibrate_blockwise, find_blocks, linear_weight, target_linears
from ..calibration.blocks import replace_module
from ..errors import FactorkitError
from ..factors import LowRankLinear
from ..solvers import LowRankFactors, rank_for_ratio, scaled_svd, truncated_svd, whitened_svd
from .base import CompressionConfig, log, register


@dataclass
class SVDConfig(CompressionConfig):
    method = "svd"
    needs_data = False


@dataclass
class ASVDConfig(CompressionConfig):
    """alpha: exponent of the activation scale mean|x|^alpha (0.5 in the ASVD paper)."""

    method = "asvd"
    alpha: float = 0.5
    sequential: bool = True


@dataclass
class SVDLLMConfig(CompressionConfig):
    """eps: relative diagonal shift used when X^T X is not positive definite."""

    method = "svdllm"
    eps: float = 1e-6
    sequential: bool = True


Solve = Callable[[torch.Tensor, "LinearStats | None", int], LowRankFactors]


def _replace_linears(block: nn.Module, block_name: str, config: CompressionConfig,
                     stats: dict[str, LinearStats] | None, solve: Solve) -> None:
    linears = target_linears(block, config.targets)
    for name, linear in linears.items():
        weight = linear_weight(linear).detach()
        out_f, in_f = weight.shape
        rank = rank_for_ratio(out_f, in_f, config.ratio)
        if rank < 1:
            raise FactorkitError(
                f"ratio {config.ratio} leaves rank 0 for {block_name}.{name} ({out_f}x{in_f}); use a smaller ratio."
            )
        factors = solve(weight, stats[name] if stats is not None else None, rank)
        if factors.shift:
            log.warning("%s.%s: X^T X was not positive definite; shifted its diagonal by %.3g",
                        block_name, name, factors.shift)
        bias = linear.bias.detach() if linear.bias is not None else None
        replace_module(block, name, LowRankLinear.from_factors(factors.U, factors.V, bias, dtype=weight.dtype))


def _check_targets(model: nn.Module, config: CompressionConfig) -> None:
    _, blocks = find_blocks(model)
    if not target_linears(blocks[0], config.targets):
        available = ", ".join(target_linears(blocks[0])) or "none"
        raise FactorkitError(
            f"no Linear layer in the blocks matches targets {list(config.targets or [])}; "
            f"the first block has: {available}."
        )


def _compress_with(model, config, data, progress, solve: Solve, stats: tuple[str, ...], sequential: bool = True):
    _check_targets(model, config)
    if not stats:
        list_name, blocks = find_blocks(model)
        for i, block in enumerate(blocks):
            _replace_linears(block, f"{list_name}.{i}", config, None, solve)
        return

    def on_block(index: int, block_name: str, block: nn.Module, block_stats: dict[str, LinearStats]) -> None:
        _replace_linears(block, block_name, config, block_stats, solve)

    calibrate_blockwise(model, data, on_block, targets=config.targets, stats=stats, sequential=sequential,
                        batch_size=config.batch_size, progress=progress, desc=f"{config.method} r={config.ratio}")


@register(SVDConfig, "truncated SVD of each weight (data-free baseline)")
def compress_svd(model: nn.Module, config: SVDConfig, data: torch.Tensor | None, progress: bool) -> None:
    _compress_with(model, config, data, progress, lambda w, s, r: truncated_svd(w, r), stats=())


@register(ASVDConfig, "activation-aware SVD: input channels scaled by mean|x|^alpha")
def compress_asvd(model: nn.Module, config: ASVDConfig, data: torch.Tensor, progress: bool) -> None:
    solve = lambda w, s, r: scaled_svd(w, s.abs_mean.pow(config.alpha), r)  # noqa: E731
    _compress_with(model, config, data, progress, solve, stats=("abs_mean",), sequential=config.sequential)


@register(SVDLLMConfig, "truncation-aware whitening with the Cholesky factor of X^T X")
def compress_svdllm(model: nn.Module, config: SVDLLMConfig, data: torch.Tensor, progress: bool) -> None:
    solve = lambda w, s, r: whitened_svd(w, s.gram, r, config.eps)  # noqa: E731
    _compress_with(model, config, data, progress, solve, stats=("gram",), sequential=config.sequential)
