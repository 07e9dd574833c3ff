"""Low-rank methods: plain SVD, ASVD, SVD-LLM and FWSVD, with uniform or global ranks.

All replace a Linear W (m x n) by a LowRankLinear U (m x r) V (r x n); they
differ in the weighting applied before truncation:

- svd:    none. Minimises ||W - W'||_F; needs no data.
- asvd:   input channels scaled by mean|x|^alpha (Yuan et al., 2023).
- svdllm: the Cholesky factor of X^T X (Wang et al., 2024). Minimises the
          calibration output error ||X W^T - X W'^T||_F exactly.
- fwsvd:  per-row Fisher information (Hsu et al., 2022), on the input or the
          output axis of W; optionally combined with SVD-LLM's whitening
          (Fisher on the output side, Cholesky of X^T X on the input side).

Ranks: ``allocation="uniform"`` gives every matrix r = floor((1-ratio) m n / (m+n)).
``allocation="global"`` spends the same total budget where it matters: a
profile pass over the dense model computes each matrix's weighted spectrum
with the method's own weighting, turns it into a predicted loss increase per
dropped singular value (calibrated by the matrix's Fisher information), and
the greedy allocator in ``solvers.allocation`` picks the ranks. Data-aware
methods then run block by block, block i+1 calibrated on the outputs of the
already compressed block i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import LinearStats, calibrate_blockwise
from ..surgery import find_blocks, linear_weight, model_targets, replace_module, target_linears
from ..calibration.fisher import FisherStats, collect_fisher
from ..errors import FactorkitError
from ..factors import LowRankLinear
from ..solvers import LowRankFactors, rank_for_ratio, truncated_svd, weighted_svd, whitened_svd
from ..solvers.allocation import AllocationItem, allocate
from ..config import ConfigError, non_negative, option, optional, positive, positive_int
from .base import CompressionConfig, check_targets, log, register, warn_shift

ALLOCATIONS = ("uniform", "global")


@dataclass
class LowRankConfig(CompressionConfig):
    """Settings shared by the low-rank methods.

    ranks: explicit rank per full module name (e.g. from RankProfile.ranks);
        overrides ``allocation``. fisher: precomputed Fisher statistics
        (``collect_fisher``), reused instead of a new gradient pass, e.g. when
        compressing at several ratios. Neither is recorded nor on the CLI.
    """

    allocation: str = option("uniform", "uniform: every matrix loses --ratio; global: one budget, each matrix's size "
                                        "chosen by predicted loss (needs a Fisher gradient pass)", choices=ALLOCATIONS)
    min_rank: int = option(32, "global allocation: smallest rank of any matrix (never more than the uniform rank)",
                           check=positive_int, when=("allocation", "global"))
    fisher_samples: int | None = option(None, "calibration sequences used for the Fisher gradient pass "
                                              "(default: all)", check=optional(positive_int),
                                        when=("allocation", "global"))
    ranks: dict[str, int] | None = option(None, cli=False, record=False)
    fisher: dict[str, FisherStats] | None = option(None, cli=False, record=False)

    def needs_fisher(self) -> bool:
        """Whether compression uses Fisher information (FWSVD always, others for global ranks)."""
        return self.allocation == "global" and self.ranks is None

    def uses_data(self) -> bool:
        return self.needs_data or (self.needs_fisher() and self.fisher is None)


@dataclass
class SVDConfig(LowRankConfig):
    method = "svd"
    needs_data = False


@dataclass
class ASVDConfig(LowRankConfig):
    method = "asvd"
    alpha: float = option(0.5, "exponent of the activation scale mean|x|^alpha (0.5 in the ASVD paper)",
                          check=non_negative)
    sequential: bool = option(True, "calibrate each block on the compressed model's outputs", cli=False)


@dataclass
class SVDLLMConfig(LowRankConfig):
    method = "svdllm"
    eps: float = option(1e-6, "relative diagonal shift used when X^T X is not positive definite", check=positive,
                        cli=False)
    sequential: bool = option(True, "calibrate each block on the compressed model's outputs", cli=False)


@dataclass
class FWSVDConfig(LowRankConfig):
    """Fisher-weighted SVD. The paper writes a layer as y = xW with W (in x
    out) and sums each row of that W: that is fisher_axis="in" here."""

    method = "fwsvd"
    fisher_samples: int | None = option(None, "calibration sequences used for the Fisher gradient pass "
                                              "(default: all)", check=optional(positive_int))
    fisher_axis: str | None = option(None, "weigh input columns (in, the paper's choice) or output rows (out) by "
                                           "their Fisher information (default: in, or out with --whiten)",
                                     choices=("in", "out"))
    whiten: bool = option(False, "also whiten the inputs with the Cholesky factor of X^T X (the objective is then "
                                 "the Fisher-weighted calibration output error; Fisher sits on the output side)")
    eps: float = option(1e-6, "relative diagonal shift used when X^T X is not positive definite", check=positive,
                        cli=False)
    sequential: bool = option(True, "calibrate each block on the compressed model's outputs", cli=False)

    @property
    def axis(self) -> str:
        """The Fisher axis in use: fisher_axis, or its default (out with whiten, else in)."""
        return self.fisher_axis or ("out" if self.whiten else "in")

    def check(self) -> None:
        if self.whiten and self.axis != "out":
            raise ConfigError("fisher_axis", "must be out when whiten is on, since the input side is whitened; "
                                             "set it to out or leave it unset.")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "fisher_axis": self.axis}  # the axis used, for the record

    def needs_fisher(self) -> bool:
        return True

    def uses_data(self) -> bool:
        return self.whiten or self.fisher is None


# A solver gets the weight, the engine's statistics of its inputs (or None),
# its Fisher statistics (or None) and the rank.
Solve = Callable[[torch.Tensor, "LinearStats | None", "FisherStats | None", int], LowRankFactors]


@dataclass
class _Recipe:
    solve: Solve
    stats: tuple[str, ...] = ()  # what the calibration engine must collect
    sequential: bool = True


def _recipe(config: LowRankConfig) -> _Recipe:
    if isinstance(config, SVDConfig):
        return _Recipe(lambda w, s, f, r: truncated_svd(w, r))
    if isinstance(config, ASVDConfig):
        return _Recipe(lambda w, s, f, r: weighted_svd(w, r, column_scale=s.abs_mean.pow(config.alpha)),
                       ("abs_mean",), config.sequential)
    if isinstance(config, SVDLLMConfig):
        return _Recipe(lambda w, s, f, r: whitened_svd(w, s.gram, r, config.eps), ("gram",), config.sequential)
    if isinstance(config, FWSVDConfig):
        if config.whiten:
            return _Recipe(lambda w, s, f, r: whitened_svd(w, s.gram, r, config.eps, row_scale=f.rows.sqrt()),
                           ("gram",), config.sequential)
        if config.axis == "out":
            return _Recipe(lambda w, s, f, r: weighted_svd(w, r, row_scale=f.rows.sqrt()))
        return _Recipe(lambda w, s, f, r: weighted_svd(w, r, column_scale=f.cols.sqrt()))
    raise FactorkitError(f"{type(config).__name__} is not a low-rank method config.")


def keeps_dense(m: int, n: int, rank: int) -> bool:
    """A rank whose factors would store at least as much as the dense matrix
    means: keep the matrix dense (exact, and no larger)."""
    return rank * (m + n) >= m * n


def _allocation_item(m: int, n: int, gains: torch.Tensor, min_rank: int) -> AllocationItem:
    """Units 1 .. d-1 are ranks, unit d = ceil(mn/(m+n)) is the dense matrix,
    which costs what is left up to m*n and removes all remaining error."""
    dense = -(-m * n // (m + n))
    costs = torch.full((dense,), m + n, dtype=torch.long)
    costs[-1] = m * n - (dense - 1) * (m + n)
    unit_gains = gains[:dense].to(torch.float64).clone()
    unit_gains[-1] = gains[dense - 1:].sum()
    return AllocationItem(costs, unit_gains, min(min_rank, dense))


@dataclass
class RankProfile:
    """What global allocation knows about each targeted matrix of one model.

    gains[name][k] is the predicted loss increase of dropping singular value k
    (0-based) of the method's weighted matrix: sensitivity * s_k^2, where the
    sensitivity maps the method's error scale to the loss with the Fisher
    information (the diagonal-Fisher loss of deleting W, divided by the
    weighted matrix's total energy sum_k s_k^2). Independent of the ratio, so
    one profile serves every ratio.
    """

    method: str
    shapes: dict[str, tuple[int, int]]
    gains: dict[str, torch.Tensor]

    @property
    def dense_params(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    def uniform_ranks(self, ratio: float) -> dict[str, int]:
        return {name: rank_for_ratio(m, n, ratio) for name, (m, n) in self.shapes.items()}

    def ranks(self, ratio: float, min_rank: int = 32) -> dict[str, int]:
        """Ranks removing at least ``ratio`` of the targeted parameters with the least predicted loss."""
        names = list(self.shapes)
        budget = math.floor((1.0 - ratio) * self.dense_params)
        # The floor never exceeds the uniform rank, so any ratio uniform allows is allowed.
        items = [_allocation_item(*self.shapes[name], self.gains[name],
                                  min(min_rank, max(1, rank_for_ratio(*self.shapes[name], ratio))))
                 for name in names]
        try:
            units = allocate(items, budget)
        except ValueError as exc:
            raise FactorkitError(f"ratio {ratio} is too high for min_rank {min_rank} ({exc}); "
                                 "lower the ratio or min_rank.") from None
        return dict(zip(names, units))

    def predicted_loss(self, ranks: dict[str, int]) -> float:
        """Predicted loss increase (sum of the dropped gains) of a rank choice."""
        return float(sum(self.gains[name][r:].sum() for name, r in ranks.items()
                         if not keeps_dense(*self.shapes[name], r)))

    def params(self, ranks: dict[str, int]) -> int:
        """Numbers stored by the targeted matrices under a rank choice."""
        return sum(m * n if keeps_dense(m, n, ranks[name]) else ranks[name] * (m + n)
                   for name, (m, n) in self.shapes.items())


def _fisher_data(config: LowRankConfig, data: Any) -> Any:
    limit = config.fisher_samples
    if limit is None:
        return data
    return data[:limit] if isinstance(data, torch.Tensor) else list(data)[:limit]


def _for_each_block(model, config: LowRankConfig, data, recipe: _Recipe, progress: bool, desc: str,
                    visit: Callable[[str, nn.Module, str, "LinearStats | None"], None], sequential: bool) -> None:
    """visit(block_name, block, linear_name, stats) for every targeted Linear, block by block."""
    if not recipe.stats:
        list_name, blocks = find_blocks(model)
        for i, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not progress)):
            for name in list(target_linears(block, config.targets)):
                visit(f"{list_name}.{i}", block, name, None)
        return

    def on_block(index: int, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        for name in list(target_linears(block, config.targets)):
            visit(block_name, block, name, stats[name])

    calibrate_blockwise(model, data, on_block, targets=config.targets, stats=recipe.stats, sequential=sequential,
                        batch_size=config.batch_size, progress=progress, desc=desc)


def fisher_information(model: nn.Module, config: LowRankConfig, data: Any, progress: bool = True):
    """The Fisher statistics a low-rank config would compute (reusable through ``config.fisher``)."""
    return collect_fisher(model, _fisher_data(config, data), targets=config.targets, progress=progress)


def rank_profile(model: nn.Module, config: LowRankConfig, data: Any, progress: bool = True) -> RankProfile:
    """Profile the dense model for global allocation under ``config``'s method (any ratio)."""
    config.validate()
    check_targets(model, config)
    recipe = _recipe(config)
    fisher = config.fisher if config.fisher is not None else fisher_information(model, config, data, progress)
    shapes, gains = {}, {}

    def visit(block_name: str, block: nn.Module, name: str, stats: LinearStats | None) -> None:
        full = f"{block_name}.{name}"
        if full not in fisher:
            raise FactorkitError(f"the Fisher statistics have no entry for {full}; compute them with the same targets.")
        weight = linear_weight(block.get_submodule(name)).detach()
        spectrum = recipe.solve(weight, stats, fisher[full], 1).singular_values.square()
        energy = float(spectrum.sum())
        sensitivity = fisher[full].deletion / energy if energy > 0 else 0.0
        shapes[full] = tuple(weight.shape)
        gains[full] = (spectrum * sensitivity).float()

    _for_each_block(model, config, data, recipe, progress, f"profile {config.method}", visit, sequential=False)
    return RankProfile(config.method, shapes, gains)


def _compress_lowrank(model: nn.Module, config: LowRankConfig, data: Any, progress: bool) -> dict:
    check_targets(model, config)
    recipe = _recipe(config)
    fisher = config.fisher
    if config.needs_fisher() and fisher is None:
        fisher = fisher_information(model, config, data, progress)
    ranks = config.ranks
    fit: dict[str, Any] = {"ranks": {}}
    if ranks is None and config.allocation == "global":
        profile = rank_profile(model, replace(config, fisher=fisher), data, progress)
        ranks = profile.ranks(config.ratio, config.min_rank)
        fit["predicted_loss"] = profile.predicted_loss(ranks)
        fit["predicted_loss_uniform"] = profile.predicted_loss(profile.uniform_ranks(config.ratio))
        log.info("global allocation for %s at ratio %.2f: predicted loss increase %.4g (uniform: %.4g)",
                 config.method, config.ratio, fit["predicted_loss"], fit["predicted_loss_uniform"])
    if ranks is not None:
        missing = sorted(set(model_targets(model, config.targets)) - set(ranks))
        if missing:
            raise FactorkitError(f"ranks has no entry for {missing[0]} ({len(missing)} targeted matrices missing); "
                                 "give a rank for every targeted Linear.")

    def visit(block_name: str, block: nn.Module, name: str, stats: LinearStats | None) -> None:
        full = f"{block_name}.{name}"
        linear = block.get_submodule(name)
        weight = linear_weight(linear).detach()
        out_f, in_f = weight.shape
        rank = ranks[full] if ranks is not None else rank_for_ratio(out_f, in_f, config.ratio)
        if rank < 1:
            fix = "use a smaller ratio" if ranks is None else "give a positive rank"
            raise FactorkitError(f"rank {rank} for {full} ({out_f}x{in_f}) is below 1; {fix}.")
        fit["ranks"][full] = rank
        if keeps_dense(out_f, in_f, rank):
            return
        factors = recipe.solve(weight, stats, fisher[full] if fisher is not None else None, rank)
        if factors.shift:
            warn_shift(full, factors.shift, stats.gram)
        bias = linear.bias.detach() if linear.bias is not None else None
        replace_module(block, name, LowRankLinear.from_factors(factors.U, factors.V, bias, dtype=weight.dtype))

    _for_each_block(model, config, data, recipe, progress, f"{config.method} r={config.ratio}", visit,
                    sequential=recipe.sequential)
    return fit


@register(SVDConfig, "truncated SVD of each weight (data-free baseline)")
def compress_svd(model: nn.Module, config: SVDConfig, data: Any, progress: bool) -> dict:
    return _compress_lowrank(model, config, data, progress)


@register(ASVDConfig, "activation-aware SVD: input channels scaled by mean|x|^alpha")
def compress_asvd(model: nn.Module, config: ASVDConfig, data: Any, progress: bool) -> dict:
    return _compress_lowrank(model, config, data, progress)


@register(SVDLLMConfig, "truncation-aware whitening with the Cholesky factor of X^T X")
def compress_svdllm(model: nn.Module, config: SVDLLMConfig, data: Any, progress: bool) -> dict:
    return _compress_lowrank(model, config, data, progress)


@register(FWSVDConfig, "Fisher-weighted SVD (optionally with whitening of the inputs)")
def compress_fwsvd(model: nn.Module, config: FWSVDConfig, data: Any, progress: bool) -> dict:
    return _compress_lowrank(model, config, data, progress)
