"""DSFormer: dense x semi-structured sparse factors trained with the
Straight-Through Factorizer (Chand, Prabhu & Kumar, 2023).

Each targeted Linear W (out x in) becomes C @ B: a small dense basis B
(k x in per block of rows) and coefficients C (out x k) of which each row keeps
s entries (the s largest magnitudes, or n of every m along k, e.g. 2:4 for GPU
semi-structured kernels). See ``solvers.sparsity`` for the layout.

Recipe:

1. Start every factorization from ``init``: "svd" (data-aware: SVD-LLM's
   whitened SVD split evenly into C and B, C cut to its magnitude pattern,
   then alternating least squares on the whitened error; calibrated block by
   block), "cospadi" (the CoSpaDi dictionary and codes, cut to the pattern for
   n:m), or "random".
2. Train all factorizations jointly on the task loss, next-token
   cross-entropy on the calibration text, or for a model with a task head
   given labelled batches its own loss (plus, with ``distill`` > 0, KL to
   the dense model's logits): AdamW, warm-up and cosine decay, gradient
   accumulation, resumable checkpoints (``training.loop``). With ``stf`` the
   forward pass masks C to its current magnitude pattern and the backward
   pass is straight-through, so the support moves while training; with
   ``stf=False`` (the ablation) the support from step 1 is frozen and only B
   and the surviving coefficients train.
3. Freeze the masks and export each layer to the compact DictionaryLinear
   (basis, values, support bits), the form that is saved and served.

Budget: k and s per matrix from ``dense_sparse_budget`` so that the basis, the
nonzeros and, with count="storage", the support bits meet the ratio.

Global allocation (``allocation="global"``, top-k pattern, one block): one
budget of stored bytes over every targeted matrix, as ``methods.auto`` spends
it on dictionaries: each matrix's (k, s) options are priced by the eigenbasis
estimate times its Fisher sensitivity: the whitened error of keeping each
row's s largest coefficients on the first k whitened singular directions,
what the "svd" start does (it ranks U S^1/2 rather than U S, then refits by
alternating least squares, which only lowers the error); a knapsack picks
one size per matrix (or keeps it dense), then the starts are built at those
sizes and trained together as above.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calibration import calibrate_blockwise
from ..surgery import find_blocks, linear_weight, replace_module
from ..errors import FactorkitError
from ..factors import DenseSparseLinear, factor_modules, factor_parameters
from ..solvers.dictionary import sparse_dictionary
from ..solvers.sparsity import Pattern, dense_sparse_budget, magnitude_mask, refit_coefficients, \
    whitened_dense_sparse
from ..training import TrainConfig, model_loss, train, train_rows
from ..training.loop import rows_of
from ..config import ConfigError, at_least, nested, option, optional, positive_int
from .base import CompressionConfig, check_targets, log, register

INITS = ("svd", "cospadi", "random")


def _pattern(value) -> str | None:
    try:
        Pattern.parse(value)
    except (ValueError, TypeError, AttributeError) as err:
        return f"is not a sparsity pattern ({err}); use topk or n:m such as 2:4."
    return None


@dataclass
class DSFormerConfig(CompressionConfig):
    method = "dsformer"
    rho: float = option(2.0, "atoms per nonzero, k/s, for pattern topk (an n:m pattern fixes it to m/n)",
                        check=at_least(1.0))
    pattern: str = option("topk", "coefficient sparsity: topk (s largest per row) or n:m such as 2:4",
                          check=_pattern)
    blocks: int = option(1, "groups of output rows with their own basis (1: the whole matrix)", check=positive_int)
    init: str = option("svd", "starting factorization", choices=INITS)
    stf: bool = option(True, "learn the support while training (the Straight-Through Factorizer); --no-stf "
                             "freezes it after the start (the paper's ablation)")
    count: str = option("params", "what --ratio counts: params, or storage (support bits included); global "
                                  "allocation always counts stored bytes", choices=("params", "storage"))
    allocation: str = option("uniform", "uniform: every matrix loses --ratio; global: one budget of stored bytes, "
                                        "each matrix's (k, s) (or keeping it dense) chosen by predicted loss from "
                                        "the error of its start (needs a Fisher gradient pass)",
                             choices=("uniform", "global"))
    fisher_samples: int | None = option(None, "calibration sequences used for the Fisher gradient pass "
                                              "(default: all)", check=optional(positive_int),
                                        when=("allocation", "global"))
    train: TrainConfig = nested(TrainConfig, "the training run (its seed also seeds a random start)",
                                prefix="train-")

    def training_sequences(self) -> int:
        return self.train.steps * self.train.sequences_per_step

    def check(self) -> None:
        if self.heal:
            raise ConfigError("heal", "applies to the training-free methods; dsformer trains its factors already "
                                      "(with distillation: --train-distill), so raise --train-steps instead.")
        if self.allocation == "global":
            clash = ("--pattern " + self.pattern if self.pattern != "topk" else
                     f"--blocks {self.blocks}" if self.blocks != 1 else
                     "--init random" if self.init == "random" else None)
            if clash:
                raise ConfigError("allocation", f"global prices a top-k basis over whole matrices from calibration "
                                                f"statistics, so it does not combine with {clash}; drop one of "
                                                "the two.")


def _budget(name: str, out_f: int, in_f: int, config: DSFormerConfig, pattern: Pattern, value_bits: int):
    if out_f % config.blocks:
        raise FactorkitError(f"blocks={config.blocks} does not divide the {out_f} rows of {name}; "
                             "pick a divisor of every targeted matrix's output size.")
    k, s = dense_sparse_budget(in_f, out_f, config.ratio, config.rho, pattern=pattern, blocks=config.blocks,
                               count=config.count, value_bits=value_bits)
    if s < 1:
        raise FactorkitError(f"ratio {config.ratio} leaves {name} ({out_f}x{in_f}) no nonzero per row; "
                             "lower the ratio, the blocks or rho.")
    return k, s


def _initial_factors(W: torch.Tensor, gram: torch.Tensor | None, k: int, s: int, pattern: Pattern,
                     config: DSFormerConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (out x k) and basis (blocks*k x in) for one weight, block by block of rows."""
    coefs, bases = [], []
    for rows in W.chunk(config.blocks, dim=0):
        if config.init == "random":
            B = torch.randn(k, rows.shape[1], generator=gen, dtype=torch.float64)
            C = torch.randn(rows.shape[0], k, generator=gen, dtype=torch.float64) * (float(rows.std()) / s**0.5)
        elif config.init == "cospadi":
            fit = sparse_dictionary([rows], k, s, gram=gram, seed=config.train.seed)[0]
            C, B = torch.zeros(rows.shape[0], k, dtype=torch.float64).scatter_(1, fit.indices, fit.values), fit.atoms
            if pattern.structured:  # OMP's supports are free; cut them to the pattern and refit
                C = refit_coefficients(rows.double(), B, magnitude_mask(C, s, pattern), gram)
        else:
            C, B = whitened_dense_sparse(rows, k, s, pattern, gram)
        coefs.append(C)
        bases.append(B)
    return torch.cat(coefs), torch.cat(bases)


def _replace(model: nn.Module, config: DSFormerConfig, data: torch.Tensor | None, progress: bool,
             sizes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Put the start of every factorization in place: (k, s) from the uniform budget, or from ``sizes``
    (by matrix name; () keeps the matrix dense) when the allocation chose them."""
    names = check_targets(model, config)
    dtype = next(model.parameters()).dtype
    pattern = Pattern.parse(config.pattern)
    gen = torch.Generator().manual_seed(config.train.seed)
    bits = torch.finfo(dtype).bits

    def on_block(index: int, block_name: str, block: nn.Module, stats: dict | None) -> None:
        for name in names:
            full = f"{block_name}.{name}"
            if sizes is not None and not sizes[full]:
                continue  # the allocation keeps it dense
            linear = block.get_submodule(name)
            W = linear_weight(linear).detach().to(torch.float64).cpu()
            k, s = sizes[full] if sizes is not None else _budget(full, *W.shape, config, pattern, bits)
            gram = stats[name].gram.cpu() if stats is not None else None
            C, B = _initial_factors(W, gram, k, s, pattern, config, gen)
            bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
            module = DenseSparseLinear.from_factors(C.to(dtype), B.to(dtype), s, bias, blocks=config.blocks,
                                                    pattern=str(pattern), learn_mask=config.stf, dtype=dtype)
            replace_module(block, name, module.to(linear_weight(linear).device))

    if config.init == "random":
        list_name, blocks = find_blocks(model)
        for i, block in enumerate(blocks):
            on_block(i, f"{list_name}.{i}", block, None)
    else:
        calibrate_blockwise(model, data, on_block, targets=config.targets, stats=("gram",), sequential=True,
                            batch_size=config.batch_size, progress=progress, desc=f"dsformer init ({config.init})")


def training_data(data: Any) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
    """(token ids for calibrating the start, rows to train on) from token ids
    (causal LM) or a list of labelled batches (dicts of equal-length model
    inputs with ``labels``, for a model with a task head)."""
    rows = train_rows(data, "dsformer")
    return (rows, rows) if isinstance(rows, torch.Tensor) else (rows["input_ids"], rows)


def _compress_dsformer(model: nn.Module, config: DSFormerConfig, data: Any, progress: bool,
                       train_data: Any = None) -> dict:
    if data is None:
        raise FactorkitError("dsformer trains on text; pass calibration data.")
    tokens, rows = training_data(data)  # the start's statistics on ``data``; the training on ``train_data``
    if train_data is not None:
        rows = training_data(train_data)[1]
    teacher = copy.deepcopy(model).eval() if config.train.distill > 0 else None
    base = model.state_dict()  # the dense start: part of what a resumed training state must match
    allocation: dict = {}
    sizes = None
    if config.allocation == "global":
        from .auto import allocate

        # the Fisher pass on the loss being trained (labelled batches: the task head's), the profile on tokens
        chosen, allocation = allocate(model, config, tokens, ("dictionary",), progress, fisher_data=data)
        sizes = {name: option_.size for name, option_ in chosen.items()}
    _replace(model, config, tokens, progress, sizes)
    layers = [m for _, m in factor_modules(model) if isinstance(m, DenseSparseLinear)]
    start_masks = [m.mask.clone() for m in layers]
    tc = config.train

    def loss_fn(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model_loss(m, batch, teacher, tc.distill, tc.temperature)

    result = train(model, rows, factor_parameters(model, (DenseSparseLinear,)), tc, loss_fn, progress=progress,
                   desc="dsformer stf" if config.stf else "dsformer (masks frozen)",
                   run={"method": config.to_dict(), "base": base},
                   nonfinite_hint="lower --train-lr or --train-distill, or use --dtype float32")
    moved = sum(int((m.current_mask() != m0).sum()) // 2 for m, m0 in zip(layers, start_masks))
    total = sum(m.out_features * m.sparsity for m in layers)
    dtype = next(model.parameters()).dtype
    for name, module in list(factor_modules(model)):
        if isinstance(module, DenseSparseLinear):
            replace_module(model, name, module.export().to(dtype))
    log.info("dsformer: %d steps in %.0f s, final loss %.4f, %.1f%% of the support moved", len(result.losses),
             result.seconds, result.losses[-1] if result.losses else float("nan"), 100 * moved / max(total, 1))
    return {**allocation, "losses": result.losses, "train_s": result.seconds, "resumed_from": result.resumed_from,
            "support_moved": moved / max(total, 1), "sequences": rows_of(rows)}


@register(DSFormerConfig, "dense x semi-structured sparse factors trained jointly (Straight-Through Factorizer)")
def compress_dsformer(model: nn.Module, config: DSFormerConfig, data: Any, progress: bool,
                      train_data: Any = None) -> dict:
    return _compress_dsformer(model, config, data, progress, train_data)
