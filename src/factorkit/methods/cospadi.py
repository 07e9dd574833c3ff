"""CoSpaDi: calibration-guided sparse dictionary compression (Shopkhoev et al., 2025).

Each Linear W (out x in) becomes W' = C @ A with a dense dictionary A of k
atoms (k x in) and codes C (out x k) with exactly s nonzeros per row: every
output neuron is a combination of its own s atoms, a union of subspaces
instead of low rank's single one.

Recipe, block by block on calibration data (block i+1 calibrated on the
outputs of the compressed block i):

1. G = X.T X of the layer's inputs; L with L L.T = G (Cholesky, diagonal
   shifted and logged if needed). Y = L.T W.T, so that ||Y - D C.T|| is the
   calibration output error ||X W.T - X W'.T||. ``whiten=False`` fits the
   weights themselves (plain dictionary learning, data-free).
2. Learn D (unit atoms) and s-sparse codes by alternating Batch-OMP and K-SVD
   (``solvers.dictionary``), dictionary initialised from random columns of Y.
3. A = (L^-T D).T, re-normalised; the layer becomes a DictionaryLinear.

Budget, for ratio CR and rho = k/s: k = floor((1-CR) in out / (in + out/rho)),
s = floor(k/rho) counting parameters (the paper's count), or with the support
mask bits included (``count="storage"``, at the model's dtype).

Global allocation (``allocation="global"``): one budget of stored bytes over
the model, each matrix's dictionary size (or keeping it dense) chosen by a
knapsack on predicted loss; see ``methods.auto``, which also mixes in low rank.

Shared dictionaries: ``group=g`` fits one dictionary per projection type
for g consecutive layers (their weights side by side, Grams averaged), with
per-layer codes; the budget then counts the dictionary once for the group.

Resume: with ``checkpoint_dir`` every finished group of blocks is kept on
disk (``models.partial``); a rerun with the same model, data and settings
restores those groups and solves only the rest, to the same result (with
global allocation, the allocation too: ``methods.auto.allocate_and_solve``).

Speed: OMP from scratch at every alternation (``refresh="every"``, the paper's
schedule) costs k s^2 / 2 per output neuron each time; the default
``refresh="doubling"`` re-codes at alternations 0, 1, 2, 4, 8, 16, 32 and the
last, with K-SVD sweeps (atoms and coefficients) at every alternation.
BENCHMARKS.md compares the two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import parallel
from ..calibration import LinearStats, calibrate_groupwise
from ..surgery import find_blocks, linear_weight, replace_module
from ..errors import FactorkitError
from ..factors import DictionaryLinear
from ..solvers.dictionary import (START_HELP, STARTS, dictionary_budget, refresh_schedule, solve_cost,
                                  sparse_dictionary)
from ..config import ConfigError, at_least, option, positive, positive_int, whole
from .auto import ESTIMATE_HELP, ESTIMATES, allocate_and_solve, finished_blocks
from .base import CompressionConfig, check_targets, log, register, warn_shift

COUNTS = ("params", "storage")


def _refresh(value) -> str | None:
    if isinstance(value, bool):
        return f"must be doubling, every or a positive whole number, got {value!r}."
    try:
        refresh_schedule(1, value)
    except (ValueError, TypeError):
        return f"must be doubling, every or a positive whole number, got {value!r}."
    return None


@dataclass
class CoSpaDiConfig(CompressionConfig):
    method = "cospadi"
    rho: float = option(2.0, "atoms per nonzero, k/s (2 in the paper)", check=at_least(1.0))
    iterations: int = option(60, "alternations T of sparse coding and K-SVD (60 in the paper)", check=positive_int)
    refresh: str | int = option("doubling", "when OMP re-codes: doubling (alternations 0, 1, 2, 4, ... and the "
                                            "last), every (the paper's), or every N-th", check=_refresh)
    power_iterations: int = option(2, "power iterations per atom in the K-SVD update", check=positive_int)
    start: str = option("svd", START_HELP, choices=STARTS)
    whiten: bool = option(True, "fit the calibration output error (whitened by the Cholesky factor of X^T X); "
                                "--no-whiten fits the weights themselves (plain dictionary learning, data-free)")
    group: int = option(1, "consecutive layers sharing one dictionary per projection type", check=positive_int)
    count: str = option("params", "what --ratio counts: params (numbers only, the paper's) or storage (numbers "
                                  "plus the support mask bits at the model's dtype)", choices=COUNTS)
    seed: int = option(0, "seed of the dictionary initialisation", check=whole(0))
    eps: float = option(1e-6, "relative diagonal shift used when X^T X is not positive definite", check=positive,
                        cli=False)
    sequential: bool = option(True, "calibrate each block on the compressed model's outputs", cli=False)
    checkpoint_dir: str | None = option(None, "keep every finished group of blocks (and a global allocation) here; "
                                              "a rerun of the same compression resumes from them", record=False)
    allocation: str = option("uniform", "uniform: every matrix loses --ratio; global: one budget of stored bytes, "
                                        "each matrix's dictionary size (or keeping it dense) chosen by predicted "
                                        "loss (needs a Fisher gradient pass)",
                             choices=("uniform", "global"))
    estimate: str = option("refined", f"global allocation: how each matrix's dictionary sizes are priced: "
                                         f"{ESTIMATE_HELP}", choices=ESTIMATES, when=("allocation", "global"))
    probe_iterations: int = option(2, "alternations of the probe fits that price the dictionary options",
                                   check=positive_int, when=("estimate", "probe"))

    def __post_init__(self) -> None:
        if isinstance(self.refresh, str) and self.refresh.isdigit():  # "4" from the command line
            self.refresh = int(self.refresh)
        super().__post_init__()

    def uses_data(self) -> bool:
        return self.whiten or self.allocation == "global"

    def check(self) -> None:
        if self.allocation == "global" and (self.group > 1 or not self.whiten):
            what = "--group" if self.group > 1 else "--no-whiten"
            raise ConfigError("allocation", f"global does not combine with {what} yet; drop one of the two.")


def _groups_without_data(model: nn.Module, size: int, on_group) -> None:
    list_name, blocks = find_blocks(model)
    for first in range(0, len(blocks), size):
        idx = list(range(first, min(first + size, len(blocks))))
        on_group(idx, [f"{list_name}.{i}" for i in idx], [blocks[i] for i in idx], [None] * len(idx))


def _averaged_gram(stats: list[LinearStats]) -> torch.Tensor:
    return sum(s.gram / max(s.tokens, 1) for s in stats) / len(stats)


def _compress_cospadi(model: nn.Module, config: CoSpaDiConfig, data: Any, progress: bool) -> dict:
    if config.allocation == "global":
        return allocate_and_solve(model, config, data, ("dictionary",), progress, config.iterations,
                                  config.refresh, config.power_iterations)
    names = check_targets(model, config)
    dtype = next(model.parameters()).dtype
    value_bits = torch.finfo(dtype).bits
    report: dict[str, dict] = {}
    finished = finished_blocks(model, config, data)
    restored = []
    team = parallel.current()

    def on_group(indices: list[int], block_names: list[str], group: list[nn.Module], stats: list) -> None:
        key = f"blocks-{indices[0]:04d}-{indices[-1]:04d}"
        if finished is not None:
            info = finished.restore(key, group, dtype)
            if info is not None:
                report.update({matrix: {**entry, "restored": True} for matrix, entry in info.items()})
                restored.append(key)
                return
        group_report = {}
        budgets = {}
        for name in names:  # every matrix's budget first: a ratio too high fails before any solve
            weights = [linear_weight(block.get_submodule(name)) for block in group]
            out_f, in_f = weights[0].shape
            if any(w.shape != (out_f, in_f) for w in weights):
                raise FactorkitError(f"{name} differs in shape across blocks {block_names[0]}..{block_names[-1]}; "
                                     "use group=1.")
            k, s = dictionary_budget(in_f, out_f, config.ratio, config.rho, layers=len(group), count=config.count,
                                     value_bits=value_bits)
            if s < 1:
                raise FactorkitError(f"ratio {config.ratio} leaves {name} ({out_f}x{in_f}) fewer than one nonzero "
                                     f"per output at rho {config.rho}; lower the ratio or rho.")
            budgets[name] = (k, s, solve_cost(in_f, out_f, k, s, layers=len(group)))

        def solve(name: str) -> list[torch.Tensor]:
            start = time.perf_counter()
            k, s, _ = budgets[name]
            weights = [linear_weight(block.get_submodule(name)).detach() for block in group]
            gram = _averaged_gram([st[name] for st in stats]) if config.whiten else None
            fits = sparse_dictionary(weights, k, s, gram=gram, eps=config.eps, iterations=config.iterations,
                                     refresh=config.refresh, power_iterations=config.power_iterations,
                                     seed=config.seed, start=config.start)
            seconds = time.perf_counter() - start
            return [t for fit in fits for t in (fit.atoms, fit.indices, fit.values, torch.tensor(
                [fit.shift, fit.omp_seconds, fit.ksvd_seconds, seconds, *fit.errors], dtype=torch.float64))]

        # under torchrun the processes divide the projections and share the solutions (parallel.Team)
        solved = team.solve(names, [budgets[name][2] for name in names], solve)
        for name, tensors in zip(names, solved):
            k, s, _ = budgets[name]
            linears = [block.get_submodule(name) for block in group]
            fits = [(atoms, indices, values, meta.tolist()) for atoms, indices, values, meta in
                    zip(tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4])]
            shift, _, _, seconds = fits[0][3][:4]
            if shift:
                warn_shift(f"{block_names[0]}.{name}", shift, _averaged_gram([st[name] for st in stats]))
            shared = None
            for block, block_name, linear, (atoms, indices, values, meta) in zip(group, block_names, linears, fits):
                bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
                module = DictionaryLinear.from_codes(atoms, indices, values, bias, dtype=dtype, shared_atoms=shared)
                shared = module.atoms
                replace_module(block, name, module)
                errors = meta[4:]
                group_report[f"{block_name}.{name}"] = {
                    "atoms": k, "sparsity": s, "group": block_names, "error": errors[-1], "errors": errors,
                    # a shared dictionary is one solve: each layer of the group carries its share, so sums add up
                    "omp_s": meta[1] / len(group), "ksvd_s": meta[2] / len(group), "seconds": seconds / len(group)}
        report.update(group_report)
        if finished is not None and team.rank == 0:  # one writer; the others hold the same blocks
            finished.store(key, group, group_report)

    desc = f"cospadi r={config.ratio}" + (f" group={config.group}" if config.group > 1 else "")
    if config.whiten:
        calibrate_groupwise(model, data, on_group, group_size=config.group, targets=config.targets,
                            stats=("gram",), sequential=config.sequential, batch_size=config.batch_size,
                            progress=progress, desc=desc)
    else:
        _groups_without_data(model, config.group, on_group)
    if restored:
        log.info("cospadi: %d group(s) of blocks restored from %s, the rest solved", len(restored),
                 config.checkpoint_dir)
    errors = [r["error"] for r in report.values()]
    log.info("cospadi: %d matrices, mean relative %s error %.4f", len(errors),
             "output" if config.whiten else "weight", sum(errors) / len(errors))
    return report


@register(CoSpaDiConfig, "sparse dictionary (K-SVD + Batch-OMP) on whitened weights, per layer or shared")
def compress_cospadi(model: nn.Module, config: CoSpaDiConfig, data: Any, progress: bool) -> dict:
    return _compress_cospadi(model, config, data, progress)
