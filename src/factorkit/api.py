"""The library's verbs: compress, save, load, summarize."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .surgery import find_blocks, linear_weight, model_targets
from .errors import FactorkitError
from .factors import FactorModule, factor_modules
from .methods import CompressionConfig, get_method
from .models import load_compressed, save as _save
from .models.checkpoint import is_factorkit_dir


def compress(model: nn.Module, config: CompressionConfig, data: torch.Tensor | None = None,
             *, progress: bool = True) -> nn.Module:
    """Compress ``model`` in place with the method ``config`` names and return it.

    ``data`` holds calibration token ids, shape (samples, seq_len); see
    :func:`factorkit.data.calibration_tokens`. Models with a task head may
    instead get a list of labelled batches (dicts of model inputs with
    ``labels``): FWSVD's Fisher information then comes from the task loss.
    Data-free methods ignore it.
    """
    if not isinstance(config, CompressionConfig):
        raise FactorkitError(f"config must be a method config such as SVDLLMConfig(ratio=0.2), got {type(config).__name__}.")
    method = get_method(config.method)
    config.validate()
    find_blocks(model)  # fails with a clear message on a model without Linear blocks
    if any(True for _ in factor_modules(model)):
        raise FactorkitError("this model is already compressed; load the original model to compress it again.")
    if config.uses_data():
        if data is None:
            raise FactorkitError(f"{config.method} is data-aware and needs calibration tokens; pass data=calibration_tokens(...).")
        _check_data(data)
    targeted = list(model_targets(model, config.targets))
    method.fn(model, config, data, progress)
    # Targeted matrices a method chose to keep dense (global allocation does
    # when a factorization would store as much); summarize() counts them.
    kept = [name for name in targeted if not isinstance(model.get_submodule(name), FactorModule)]
    model.factorkit_compression = {"method": config.method, "config": config.record(), "kept_dense": kept}
    return model


def _check_data(data) -> None:
    if isinstance(data, torch.Tensor):
        if data.ndim == 2 and data.dtype == torch.long and data.shape[0] >= 1:
            return
    elif isinstance(data, (list, tuple)) and data and all(isinstance(b, Mapping) for b in data):
        return
    raise FactorkitError("calibration data must be a LongTensor of token ids with shape (samples, seq_len), "
                         "or a non-empty list of batches (dicts of model inputs, with 'labels' for Fisher).")


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False):
    """Save to a folder (safetensors + factorkit.json); atomic, never half-written."""
    return _save(model, path, tokenizer=tokenizer, overwrite=overwrite)


def load(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved with :func:`save`."""
    if not is_factorkit_dir(path):
        raise FactorkitError(f"{path} is not a folder written by factorkit.save (no factorkit.json); "
                             "use factorkit.models.load for other models.")
    return load_compressed(path, dtype)


@dataclass
class CompressionSummary:
    """Parameter counts of the targeted matrices and the whole model.

    ``ratio_targeted`` counts numbers only (parameters, as papers do);
    ``ratio_targeted_storage`` also counts the bits that sparse factors spend on
    their supports, at the model's dtype (``value_bits`` per number). Low-rank
    factors store no indices, so for them both are equal. The targeted matrices
    include those a method kept dense (counted at their dense size before and
    after); a dictionary shared by several layers is counted once."""

    factor_modules: int
    targeted_dense_params: int  # what the replaced Linears stored
    targeted_params: int  # what their factors store
    model_params_before: int
    model_params_after: int
    targeted_index_bits: int = 0  # support masks / indices of sparse factors
    value_bits: int = 32  # bits per stored number at the model's dtype

    @property
    def ratio_targeted(self) -> float:
        return 1 - self.targeted_params / self.targeted_dense_params if self.targeted_dense_params else 0.0

    @property
    def ratio_targeted_storage(self) -> float:
        if not self.targeted_dense_params:
            return 0.0
        stored = self.targeted_params * self.value_bits + self.targeted_index_bits
        return 1 - stored / (self.targeted_dense_params * self.value_bits)

    @property
    def ratio_model(self) -> float:
        return 1 - self.model_params_after / self.model_params_before

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio_targeted": self.ratio_targeted,
                "ratio_targeted_storage": self.ratio_targeted_storage, "ratio_model": self.ratio_model}


def summarize(model: nn.Module) -> CompressionSummary:
    """How much the factor modules in ``model`` saved (tied and shared weights counted once)."""
    modules = [m for _, m in factor_modules(model)]
    dense = sum(m.dense_param_count() for m in modules)
    unique = {id(p): p.numel() for m in modules for p in m.parameters()}
    factored = sum(unique.values())
    after = sum(p.numel() for p in model.parameters())
    info = getattr(model, "factorkit_compression", None) or {}
    kept = sum(linear_weight(model.get_submodule(name)).numel() for name in info.get("kept_dense", []))
    bits = next(model.parameters()).element_size() * 8
    return CompressionSummary(len(modules), dense + kept, factored + kept, after - factored + dense, after,
                              sum(m.index_bits() for m in modules), bits)
