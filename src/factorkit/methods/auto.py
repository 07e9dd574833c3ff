"""auto: one byte budget over every targeted matrix, the factor type chosen per matrix.

1. Profile, on the dense model (one Fisher gradient pass, one calibration pass
   in which every block sees the original model's activations):
   - each matrix's Fisher deletion loss (``calibration.fisher``) puts the
     matrices on one scale: sensitivity = deletion / ||W L||^2, with L L^T = X^T X,
     the loss per unit of whitened squared output error (as the global ranks
     of ``methods.lowrank`` do; per unit of the pricing metric's energy, below);
   - low rank: the singular values of W L price every rank at once (SVD-LLM's
     whitened error at rank r is exactly the energy it drops);
   - dictionary (k atoms, s per row), ``estimate="eigenbasis"``: from the
     same SVD, the error of coding every row of W L with its s largest
     coefficients among the first k right singular vectors (an orthonormal
     dictionary, where the best s-sparse code is exactly that): one
     sparse-coding step of a dictionary fit, before K-SVD improves it.
     Seconds for a whole model, but it overstates the full solve's error most
     at small ratios, against low rank's exact price, so it leans to low rank.
     ``estimate="refined"`` (default) corrects it at the ratios PROBE_RATIOS
     by a short alternation from that start (least-squares atoms for the
     codes; codes re-supported on the largest least-squares coefficients,
     their values by projected gradient; ``refined_errors``), log-linearly in
     between; minutes for a whole model.
     ``estimate="probe"`` fits each option with
     CoSpaDi itself for ``probe_iterations`` alternations at a few ratios,
     interpolating between them: closer to the full solve, but hours on a
     CPU. ``benchmarks/bench_probe.py`` measures how each ranks the options
     against the full solve on one block.
   - ``price_metric="unit"`` (default): errors are priced in the metric of
     sum_t x_t x_t^T / ||x_t||^2, every calibration token once at unit length,
     rather than of X^T X, where the few tokens with massive activations (the
     first token's, in some layers 99.8% of X^T X) decide alone what an error
     costs: a low rank that keeps their direction looks free there while it
     wrecks the matrix for every other token (``benchmarks/bench_pricing.py``).
     Each singular direction of W L gets the weight of its squared error in
     that metric (``pricing_weights``): exact for low rank, the diagonal terms
     for sparse codes; the solves still minimise the X^T X error.
2. Each matrix's menu: keep it dense, a rank r (removing at most
   ``max_removal`` of its bytes, by default no more than the dictionaries
   can), or a dictionary (k, s);
   costs are the bytes each stores at the model's dtype (a dictionary's codes
   also store one support bit per output and atom), the predicted loss is
   sensitivity x squared error in the pricing metric. ``solvers.knapsack.choose`` picks one
   option per matrix within (1 - ratio) x the targeted matrices' dense bytes,
   never over, with a certificate of its distance to the optimum.
3. Solve, block by block on the compressed model's outputs: SVD-LLM's
   whitened truncation at the chosen rank, a CoSpaDi dictionary with
   ``iterations`` alternations, or nothing for a matrix kept dense.

With ``checkpoint_dir`` the allocation (after step 2) and every finished block
are kept on disk (``models.partial``); a rerun resumes from them.

``CoSpaDiConfig(allocation="global")`` is this with dictionaries only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import parallel
from ..calibration import LinearStats, calibrate_blockwise
from ..calibration.fisher import FisherStats, collect_fisher
from ..config import ConfigError, at_least, option, optional, positive, positive_int, whole
from ..errors import FactorkitError
from ..factors import DictionaryLinear, LowRankLinear
from ..models.partial import FinishedGroups, fingerprint
from ..solvers import whitened_svd
from ..solvers.dictionary import (START_HELP, STARTS, dictionary_budget, improve_code, solve_cost,
                                  sparse_dictionary)
from ..solvers.knapsack import Menu, choose
from ..solvers.whitening import cholesky_factor
from ..surgery import find_blocks, linear_weight, replace_module, target_linears
from .base import CompressionConfig, check_targets, log, register, warn_shift

TYPES = ("lowrank", "dictionary")
ESTIMATES = ("eigenbasis", "refined", "probe")
METRICS = ("unit", "gram")
METRIC_HELP = ("unit (every calibration token counts once: its input scaled to unit length; the default) or gram "
               "(X^T X, the metric the solves minimise, in which the few tokens with massive activations, such "
               "as the first, can outweigh all the others)")
ESTIMATE_HELP = ("eigenbasis (s largest coefficients in the first k whitened singular directions; seconds), refined "
                 "(that, corrected by a short alternation at a few ratios; minutes) or probe (short CoSpaDi fits; "
                 "hours on a CPU)")
PROBE_RATIOS = (0.1, 0.3, 0.5, 0.7)  # per-matrix ratios a dictionary is fitted at cheaply
DICTIONARY_RATIOS = tuple(round(0.1 + 0.05 * i, 2) for i in range(13))  # 0.1 .. 0.7: the menu's dictionaries


def _share(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0:
        return None
    return f"must lie in (0, 1], got {value!r}."


def _types(value: Any) -> str | None:
    if not value or any(t not in TYPES for t in value) or len(set(value)) != len(value):
        return f"must be one or more of {', '.join(TYPES)} (comma separated, each once), got {value!r}."
    return None


@dataclass
class AutoConfig(CompressionConfig):
    """Per matrix the allocation picks the factor type and its size; ``ratio`` counts stored bytes."""

    method = "auto"
    types: tuple[str, ...] = option(TYPES, "factor types a matrix may take besides staying dense: lowrank, "
                                           "dictionary", check=_types)
    rank_options: int = option(48, "ranks per matrix on the menu, evenly spaced up to the dense size",
                               check=whole(2))
    max_removal: float = option(max(DICTIONARY_RATIOS), "largest share of one matrix's stored bytes a low-rank "
                                "option may remove (1: every rank); by default as far as the dictionary options "
                                "go, since the loss model underprices the deepest truncations", check=_share)
    rho: float = option(2.0, "dictionary options: atoms per nonzero, k/s", check=at_least(1.0))
    estimate: str = option("refined", f"how dictionary options are priced: {ESTIMATE_HELP}",
                           choices=ESTIMATES)
    price_metric: str = option("unit", f"the input metric options are priced in: {METRIC_HELP}", choices=METRICS)
    probe_iterations: int = option(2, "alternations of the probe fits that price the dictionary options",
                                   check=positive_int, when=("estimate", "probe"))
    iterations: int = option(8, "alternations of each chosen dictionary's fit (CoSpaDi's T; 60 in its paper)",
                             check=positive_int)
    start: str = option("svd", START_HELP, choices=STARTS)
    fisher_samples: int | None = option(None, "calibration sequences used for the Fisher gradient pass "
                                              "(default: all)", check=optional(positive_int))
    seed: int = option(0, "seed of the dictionary initialisations", check=whole(0))
    eps: float = option(1e-6, "relative diagonal shift used when X^T X is not positive definite", check=positive,
                        cli=False)
    sequential: bool = option(True, "calibrate each block on the compressed model's outputs", cli=False)
    checkpoint_dir: str | None = option(None, "keep the allocation and every finished block here; a rerun of the "
                                              "same compression resumes from them", record=False)

    def __post_init__(self) -> None:
        if isinstance(self.types, str):
            self.types = tuple(t.strip() for t in self.types.split(",") if t.strip())
        super().__post_init__()

    def check(self) -> None:
        if self.ratio > max(PROBE_RATIOS) and "lowrank" not in self.types:
            raise ConfigError("ratio", f"above {max(PROBE_RATIOS)} leaves no dictionary on the menu small enough; "
                                       "lower the ratio or add lowrank to the types.")
        deepest = max([self.max_removal] * ("lowrank" in self.types)
                      + [max(PROBE_RATIOS)] * ("dictionary" in self.types))
        if self.ratio > deepest:
            raise ConfigError("ratio", f"above {deepest} is more than any option on the menu removes from a "
                                       "matrix; lower the ratio or raise --max-removal.")


@dataclass
class Option:
    """One way to store one matrix: kind ("dense", "lowrank", "dictionary"), size, bytes, predicted loss."""

    kind: str
    size: tuple[int, ...]  # () dense, (rank,), (atoms, sparsity)
    bytes: int
    loss: float


def _value_bytes(weight: torch.Tensor) -> int:
    return weight.element_size()


def lowrank_options(m: int, n: int, spectrum: torch.Tensor, sensitivity: float, count: int,
                    value_bytes: int, max_removal: float = 1.0) -> list[Option]:
    """Ranks evenly spaced up to the largest that stores less than the dense matrix, those that remove at most
    ``max_removal`` of its stored bytes; spectrum: squared whitened singular values, descending.

    The predicted loss (sensitivity x discarded energy) is a second-order estimate around the dense weight, and
    a knapsack picks exactly the options whose price is too low; the deepest truncations are where a wrong
    price costs most (on SmolLM2-135M a rank-9 layers.11.mlp.down_proj, 2% of its bytes, lost 51x more per
    unit of its price than the median option probed: ``benchmarks/bench_pricing.py``). The default cap of
    ``AutoConfig`` keeps low rank within the range the dictionary options cover."""
    top = (m * n - 1) // (m + n)  # r (m + n) < m n
    least = math.ceil((1.0 - max_removal) * m * n / (m + n) - 1e-9)  # r (m + n) >= (1 - max_removal) m n
    grid = {max(1, round(top * i / count)) for i in range(1, count + 1)}
    ranks = sorted(grid & set(range(max(1, least), top + 1)))
    tail = torch.flip(torch.cumsum(torch.flip(spectrum.double(), [0]), 0), [0])  # tail[r] = sum_{k>=r} s_k^2
    return [Option("lowrank", (r,), r * (m + n) * value_bytes,
                   sensitivity * (float(tail[r]) if r < tail.numel() else 0.0)) for r in ranks]


def eigenbasis_errors(coefficients: torch.Tensor, energy: float, sizes: list[tuple[int, int]],
                      weights: torch.Tensor | None = None) -> list[float]:
    """Relative error of coding each row of the whitened weight with its s largest coefficients among the
    first k right singular directions, for each (k, s); ``coefficients`` = U * S of its SVD (row j's
    coefficient on direction i is u_ji s_i). In an orthonormal dictionary that code is the best s-sparse
    one, so this is what a dictionary fit reaches after one sparse-coding step from the SVD's basis.

    ``weights`` (one per singular direction, ``pricing_weights``): the same code's error measured in another
    input metric, each dropped coefficient's energy weighted by its direction's (``energy`` is then ignored:
    the weighted total is the reference). Exact for low rank; for sparse codes it leaves out the cross terms
    between a row's dropped directions, which vanish where the two metrics agree."""
    c2 = coefficients.double().square()
    if weights is not None:
        weighted = c2 * weights.double()
        energy = float(weighted.sum())
    out = []
    for k, s in sizes:
        k = min(k, c2.shape[1])  # atoms beyond the dimension add nothing to an orthonormal basis
        if weights is None:
            kept = float(torch.topk(c2[:, :k], min(s, k), dim=1).values.sum())
        else:  # the code keeps the largest coefficients (what the solve sees); their weighted energy is kept
            kept = float(weighted[:, :k].gather(1, torch.topk(c2[:, :k], min(s, k), dim=1).indices).sum())
        out.append(math.sqrt(max(energy - kept, 0.0) / energy) if energy > 0 else 0.0)
    return out


def pricing_weights(factor: torch.Tensor, unit_gram: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """Per right singular direction v_i of W L (rows of ``vh``; L = ``factor``, L L^T = X^T X), the weight
    v_i^T L^-1 U L^-T v_i of its squared error in the metric of U = ``unit_gram``: the error of dropping
    sum_i c_i v_i^T L^-1 from W, measured as tr(E U E^T), is sum_i c_i^2 weight_i when only diagonal terms
    count (exactly so for a truncated SVD, whose dropped directions have orthogonal coefficient columns)."""
    inner = torch.linalg.solve_triangular(factor, unit_gram.to(factor.dtype), upper=False)  # L^-1 U
    metric = torch.linalg.solve_triangular(factor, inner.T.contiguous(), upper=False)  # L^-1 U L^-T
    return ((vh.to(factor.dtype) @ metric) * vh.to(factor.dtype)).sum(1).clamp_min(0.0)


def refined_errors(whitened: torch.Tensor, u: torch.Tensor, sv: torch.Tensor, vh: torch.Tensor,
                   sizes: list[tuple[int, int]], rounds: int = 2, steps: int = 5) -> list[float]:
    """Relative errors of (k, s) dictionaries for the rows of ``whitened`` (its SVD: u, sv, vh), each the
    best that ``solvers.dictionary.improve_code`` finds from the eigenbasis code (``eigenbasis_errors``).
    Every error is that of a factorization with k atoms and s nonzeros per row, so it bounds from above what
    a fit of that size can reach, and is never above the eigenbasis estimate."""
    energy = float(whitened.double().square().sum())
    if energy == 0.0:
        return [0.0 for _ in sizes]
    out = []
    for k, s in sizes:
        k = min(k, sv.numel())  # atoms beyond the dimension add nothing to the basis the start is coded in
        codes = u[:, :k].double() * sv[:k].double()
        codes = torch.zeros_like(codes).scatter_(1, codes.abs().topk(min(s, k), dim=1).indices, 1.0) * codes
        best = improve_code(whitened, codes, vh[:k], s, rounds, steps)[0]
        out.append(math.sqrt(max(best, 0.0) / energy))
    return out


def _log_interpolate(points: dict[float, float], q: float) -> float:
    """Log-linear interpolation of positive values at sorted keys; constant beyond the ends."""
    qs = sorted(points)
    if q <= qs[0]:
        return points[qs[0]]
    if q >= qs[-1]:
        return points[qs[-1]]
    hi = next(i for i, p in enumerate(qs) if p >= q)
    a, b = qs[hi - 1], qs[hi]
    t = (q - a) / (b - a)
    return math.exp((1 - t) * math.log(points[a]) + t * math.log(points[b]))


def dictionary_options(weight: torch.Tensor, gram: torch.Tensor, sensitivity: float, energy: float,
                       config: Any, coefficients: torch.Tensor,
                       svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                       weights: torch.Tensor | None = None) -> list[Option]:
    """Dictionaries at DICTIONARY_RATIOS, priced by the eigenbasis estimate; with ``config.estimate ==
    "refined"`` that estimate scaled by what ``refined_errors`` finds at PROBE_RATIOS (``svd``: the
    whitened weight, u, sv, vh), log-linearly in between; with ``"probe"`` by fits of
    ``config.probe_iterations`` alternations at PROBE_RATIOS (log-linear in between, nothing outside).
    With ``weights`` (``pricing_weights``) each error is carried into that metric by the eigenbasis
    estimate's ratio of its error there to its error in the Gram's, and ``sensitivity`` is per unit of
    that metric's energy."""
    m, n = weight.shape
    bits = 8 * _value_bytes(weight)
    sizes = {q: dictionary_budget(n, m, q, config.rho, count="storage", value_bits=bits) for q in DICTIONARY_RATIOS}
    sizes = {q: (k, s) for q, (k, s) in sizes.items() if k >= 1 and s >= 1}
    eigen = dict(zip(sizes, eigenbasis_errors(coefficients, energy, list(sizes.values()))))
    into = {q: 1.0 for q in sizes}  # per size: its error in the pricing metric / in the Gram's
    if weights is not None:
        there = eigenbasis_errors(coefficients, energy, list(sizes.values()), weights)
        into = {q: t / eigen[q] if eigen[q] > 0 else 1.0 for q, t in zip(sizes, there)}
        energy = float((coefficients.double().square().sum(0) * weights.double()).sum())

    def priced(q: float, error: float) -> Option:
        k, s = sizes[q]
        error *= into[q]
        return Option("dictionary", (k, s), dictionary_bytes(m, n, k, s, bits // 8),
                      sensitivity * error * error * energy)

    # configs without the option (DSFormer's global allocation) are priced by what their SVD start does
    estimate = getattr(config, "estimate", "eigenbasis")
    if estimate in ("eigenbasis", "refined"):
        errors = dict(eigen)
        if estimate == "refined" and svd is not None:
            at = [q for q in PROBE_RATIOS if q in sizes]
            found = refined_errors(*svd, [sizes[q] for q in at])
            # the correction (refined / eigenbasis, at most 1) where both are positive
            scale = {q: f / eigen[q] for q, f in zip(at, found) if eigen[q] > 0 and f > 0}
            if scale:
                errors = {q: e * _log_interpolate(scale, q) for q, e in errors.items()}
        return [priced(q, e) for q, e in errors.items()]
    probed: dict[float, float] = {}
    for q in PROBE_RATIOS:
        if q in sizes:
            fit = sparse_dictionary([weight], *sizes[q], gram=gram, eps=config.eps,
                                    iterations=config.probe_iterations, refresh="every", seed=config.seed,
                                    start=config.start)[0]
            probed[q] = max(fit.errors[-1], 1e-12)
    qs = sorted(probed)
    return [priced(q, _log_interpolate(probed, q)) for q in sizes if qs and qs[0] <= q <= qs[-1]]


def dictionary_bytes(m: int, n: int, k: int, s: int, value_bytes: int) -> int:
    """What a DictionaryLinear (out m, in n, k atoms, s per row) stores: atoms and code values at the
    model's dtype, and its support mask, ceil(k / 8) bytes per output row."""
    return (k * n + m * s) * value_bytes + m * -(-k // 8)


def _fisher(model: nn.Module, config: Any, data: Any, progress: bool) -> dict[str, FisherStats]:
    limit = getattr(config, "fisher_samples", None)
    if limit is not None:
        data = data[:limit] if isinstance(data, torch.Tensor) else list(data)[:limit]
    return collect_fisher(model, data, targets=config.targets, progress=progress)


_KINDS = ("dense", "lowrank", "dictionary")


def _menu_tensor(menu: list[Option]) -> torch.Tensor:
    """A menu as rows (kind, size..., bytes, loss) of float64, which holds every integer here exactly."""
    return torch.tensor([[_KINDS.index(o.kind), *(list(o.size) + [0, 0])[:2], o.bytes, o.loss] for o in menu],
                        dtype=torch.float64)


def _menu_options(table: torch.Tensor) -> list[Option]:
    out = []
    for kind, a, b, size, loss in table.tolist():
        kind = _KINDS[int(kind)]
        dims = {"dense": (), "lowrank": (int(a),), "dictionary": (int(a), int(b))}[kind]
        out.append(Option(kind, dims, int(size), loss))
    return out


def profile_menus(model: nn.Module, config: Any, data: Any, types: tuple[str, ...], progress: bool = True,
                  fisher: dict[str, FisherStats] | None = None) -> dict[str, list[Option]]:
    """Every targeted matrix's menu (dense first), measured on the dense model."""
    fisher = fisher if fisher is not None else _fisher(model, config, data, progress)
    menus: dict[str, list[Option]] = {}
    # configs without the option (CoSpaDi's and DSFormer's global allocations) price in the Gram's metric
    unit = getattr(config, "price_metric", "gram") == "unit"
    team = parallel.current()

    def menu_of(block: nn.Module, full: str, name: str, stats: LinearStats) -> list[Option]:
        weight = linear_weight(block.get_submodule(name)).detach()
        m, n = weight.shape
        chol = cholesky_factor(stats.gram, getattr(config, "eps", 1e-6))
        whitened = weight.double() @ chol.factor
        u, sv, vh = torch.linalg.svd(whitened, full_matrices=False)
        spectrum = sv.square()
        energy = float(spectrum.sum())
        # in the unit metric each direction's squared error weighs as the calibration tokens see it, one each
        weights = pricing_weights(chol.factor, stats.unit_gram, vh) if unit else None
        priced = spectrum if weights is None else spectrum * weights
        sensitivity = fisher[full].deletion / float(priced.sum()) if float(priced.sum()) > 0 else 0.0
        menu = [Option("dense", (), m * n * _value_bytes(weight), 0.0)]
        if "lowrank" in types:
            menu += lowrank_options(m, n, priced, sensitivity, getattr(config, "rank_options", 48),
                                    _value_bytes(weight), getattr(config, "max_removal", 1.0))
        if "dictionary" in types:
            menu += dictionary_options(weight, stats.gram, sensitivity, energy, config, u * sv,
                                       (whitened, u, sv, vh), weights)
        return menu

    def on_block(index: int, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        names = list(target_linears(block, config.targets))

        def solve(name: str) -> list[torch.Tensor]:
            return [_menu_tensor(menu_of(block, f"{block_name}.{name}", name, stats[name]))]

        # under torchrun the processes divide the block's SVDs and share the menus (parallel.Team)
        costs = [_svd_cost(linear_weight(block.get_submodule(name)).shape) for name in names]
        for name, (table,) in zip(names, team.solve(names, costs, solve)):
            menus[f"{block_name}.{name}"] = _menu_options(table)

    kinds = ("gram", "unit_gram") if unit else ("gram",)
    calibrate_blockwise(model, data, on_block, targets=config.targets, stats=kinds, sequential=False,
                        batch_size=config.batch_size, progress=progress, desc=f"profile {config.method}")
    return menus


def allocate(model: nn.Module, config: Any, data: Any, types: tuple[str, ...], progress: bool,
             fisher_data: Any = None) -> tuple[dict[str, Option], dict]:
    """Profile the dense model and choose, within (1 - ratio) of the targeted matrices' stored bytes, one
    option per matrix. ``fisher_data``: what the Fisher gradient pass runs on when not ``data`` (labelled
    batches of a model with a task head, whose calibration ``data`` are their token ids). Returns (the chosen
    option by matrix name, the allocation's report: types, budget, bytes, predicted loss, optimality gap,
    seconds of the Fisher pass, the profile and the knapsack)."""
    check_targets(model, config)
    if data is None:
        raise FactorkitError(f"{config.method} with one budget over the model needs calibration tokens; pass "
                             "data=calibration_tokens(...).")
    times = {}
    t = time.perf_counter()
    fisher = _fisher(model, config, data if fisher_data is None else fisher_data, progress)
    times["fisher_s"] = time.perf_counter() - t
    t = time.perf_counter()
    menus = profile_menus(model, config, data, types, progress, fisher)
    times["profile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    names = list(menus)
    dense_bytes = sum(menus[n][0].bytes for n in names)
    budget = math.floor((1.0 - config.ratio) * dense_bytes)
    try:
        picked = choose([Menu([o.bytes for o in menus[n]], [o.loss for o in menus[n]]) for n in names], budget)
    except ValueError:
        raise FactorkitError(f"ratio {config.ratio} is more than the smallest options of every matrix remove; "
                             "lower the ratio or allow more factor types.") from None
    times["knapsack_s"] = time.perf_counter() - t
    chosen = {n: menus[n][o] for n, o in zip(names, picked.picks)}
    by_type: dict[str, dict] = {}
    for option_ in chosen.values():
        entry = by_type.setdefault(option_.kind, {"matrices": 0, "bytes": 0})
        entry["matrices"] += 1
        entry["bytes"] += option_.bytes
    log.info("%s at ratio %.2f: %s; predicted loss %.4g (at most %.3g above the optimum); profiled in %.0f s",
             config.method, config.ratio, ", ".join(f"{v['matrices']} {k}" for k, v in by_type.items()),
             picked.loss, picked.gap, times["fisher_s"] + times["profile_s"])
    report = {"choice": {n: {"type": o.kind, "size": list(o.size), "bytes": o.bytes,
                             "dense_bytes": menus[n][0].bytes, "predicted_loss": o.loss} for n, o in chosen.items()},
              "types": by_type, "budget_bytes": budget, "dense_bytes": dense_bytes, "bytes": picked.cost,
              "predicted_loss": picked.loss, "optimality_gap": picked.gap, **times}
    return chosen, report


def _svd_cost(shape: torch.Size) -> float:
    """Roughly the multiply-adds of one SVD of an (out x in) matrix."""
    m, n = shape
    return float(m * n * min(m, n))


def _solve_cost(option_: Option, shape: torch.Size) -> float:
    """Roughly what a chosen option's solve costs: a dictionary fit, or one SVD for a rank."""
    if option_.kind == "dictionary":
        return solve_cost(shape[1], shape[0], *option_.size)
    return _svd_cost(shape)


ALLOCATION = "allocation"  # the key of the allocation in a checkpoint folder (models.partial.FinishedGroups)


def finished_blocks(model: nn.Module, config: Any, data: Any) -> FinishedGroups | None:
    """The checkpoint folder of ``config.checkpoint_dir`` for this model, data and settings, or None (CoSpaDi's
    uniform run keeps its finished groups in the same kind of folder)."""
    if not getattr(config, "checkpoint_dir", None):
        return None
    weights = [linear_weight(linear) for block in find_blocks(model)[1]
               for linear in target_linears(block, config.targets).values()]
    return FinishedGroups(config.checkpoint_dir, {
        "method": config.method, "config": config.to_dict(), "dtype": str(next(model.parameters()).dtype),
        "weights": fingerprint(weights), "data": fingerprint(data)})


def _restored_allocation(report: dict) -> dict[str, Option]:
    return {n: Option(c["type"], tuple(c["size"]), c["bytes"], c["predicted_loss"])
            for n, c in report["choice"].items()}


def allocate_and_solve(model: nn.Module, config: Any, data: Any, types: tuple[str, ...], progress: bool,
                       iterations: int, refresh: str | int = "doubling", power_iterations: int = 2) -> dict:
    """Profile, choose within the byte budget, then factorize each matrix as chosen. Returns the fit report.

    With ``config.checkpoint_dir`` the allocation and every finished block are kept there; a rerun of the
    same compression (model, data, settings) takes them back instead of profiling and solving again, and
    ends with the same weights (later blocks see the restored blocks' bit-identical outputs)."""
    team = parallel.current()
    finished = finished_blocks(model, config, data)
    report = finished.restore_info(ALLOCATION) if finished is not None else None
    if report is not None:
        chosen = _restored_allocation(report)
        report["allocation_restored"] = True
        log.info("%s: the allocation restored from %s", config.method, config.checkpoint_dir)
    else:
        chosen, report = allocate(model, config, data, types, progress)
        if finished is not None and team.rank == 0:  # one writer; the others hold the same allocation
            finished.store_info(ALLOCATION, report)
    t = time.perf_counter()
    restored = []

    def on_block(index: int, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        key = f"blocks-{index:04d}-{index:04d}"
        if finished is not None and finished.restore(key, [block], next(block.parameters()).dtype) is not None:
            restored.append(key)
            return
        names = [name for name in target_linears(block, config.targets)
                 if chosen[f"{block_name}.{name}"].kind != "dense"]

        def solve(name: str) -> list[torch.Tensor]:
            option_ = chosen[f"{block_name}.{name}"]
            weight = linear_weight(block.get_submodule(name)).detach()
            gram = stats[name].gram
            if option_.kind == "lowrank":
                factors = whitened_svd(weight, gram, option_.size[0], config.eps)
                return [factors.U, factors.V, torch.tensor([factors.shift], dtype=torch.float64)]
            fit = sparse_dictionary([weight], *option_.size, gram=gram, eps=config.eps, iterations=iterations,
                                    refresh=refresh, power_iterations=power_iterations, seed=config.seed,
                                    start=config.start)[0]
            return [fit.atoms, fit.indices, fit.values, torch.tensor([fit.shift], dtype=torch.float64)]

        # under torchrun the processes divide the block's matrices and share the solutions (parallel.Team),
        # each problem priced as its solve costs: OMP and K-SVD for a dictionary, one SVD for a rank
        solved = team.solve(names, [_solve_cost(chosen[f"{block_name}.{name}"],
                                                linear_weight(block.get_submodule(name)).shape) for name in names],
                            solve)
        for name, tensors in zip(names, solved):
            full = f"{block_name}.{name}"
            linear = block.get_submodule(name)
            weight = linear_weight(linear)
            bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
            if chosen[full].kind == "lowrank":
                module = LowRankLinear.from_factors(tensors[0], tensors[1], bias, dtype=weight.dtype)
            else:
                module = DictionaryLinear.from_codes(*tensors[:3], bias, dtype=weight.dtype)
            shift = float(tensors[-1])
            if shift:
                warn_shift(full, shift, stats[name].gram)
            replace_module(block, name, module)
        if finished is not None and team.rank == 0:
            finished.store(key, [block], {})

    calibrate_blockwise(model, data, on_block, targets=config.targets, stats=("gram",), sequential=config.sequential,
                        batch_size=config.batch_size, progress=progress, desc=f"{config.method} r={config.ratio}")
    if restored:
        log.info("%s: %d block(s) restored from %s, the rest solved", config.method, len(restored),
                 config.checkpoint_dir)
    return {**report, "solve_s": time.perf_counter() - t, "restored_blocks": len(restored)}


@register(AutoConfig, "one byte budget: per matrix dense, low rank or a sparse dictionary, by a knapsack")
def compress_auto(model: nn.Module, config: AutoConfig, data: Any, progress: bool) -> dict:
    return allocate_and_solve(model, config, data, config.types, progress, config.iterations)
