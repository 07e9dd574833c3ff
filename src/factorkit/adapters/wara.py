"""WaRA: wavelet low-rank adaptation (Heidari et al., 2025), PEFT-shaped.

    config = WaRAConfig(target_modules=("q_proj", "v_proj"), r=8, alpha=16, wavelet="db2", levels=2)
    model = get_wara_model(model, config)        # base frozen, WaRALinear on the targets
    ... train: only the A and B of the adapters have requires_grad ...
    save_adapter(model, "out/adapter")           # adapter_config.json + adapter_model.safetensors (A, B only)
    model = load_adapter(fresh_base, "out/adapter")
    model = merge_and_unload(model)              # plain nn.Linear layers again, update folded in

Each targeted Linear gets the update (alpha / r) * IDWT(B @ A): the low-rank
factors hold wavelet coefficients, and the multi-level inverse transform
turns a rank-r coefficient matrix into a weight update of rank up to
r * (2 * levels - 1) with multi-scale, local structure (``solvers.wavelets``).
One level alone is separable, S_o^T (B A) S_i, so it is LoRA in a rotated
basis: the gain needs levels >= 2 (the default is 2).
At the same rank WaRA and LoRA train the same number of parameters.

This module needs nothing from PEFT; its file layout and verbs follow PEFT's
(adapter_config.json, adapter_model.safetensors, merge_and_unload). The same
adapter inside PEFT itself, as a LoRA variant: ``adapters.wara_peft``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..surgery import model_targets, replace_module
from ..errors import FactorkitError
from ..factors.wara import WaRALinear
from ..models.files import atomic_dir, first_sentence, read_json
from ..solvers.wavelets import check_levels

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class WaRAConfig:
    """target_modules: Linear names inside the blocks (a name matches itself or
        any ``*.name``); None: every Linear in the blocks.
    r: rank of the coefficient factors; alpha: the update is scaled by alpha / r.
    wavelet: an orthogonal wavelet (haar, db2, db4, sym4, ...); levels: levels
        of the 2-D transform (every targeted side divisible by 2^levels).
    dropout: on the adapter's input, while training.
    """

    target_modules: tuple[str, ...] | None = None
    r: int = 8
    alpha: float = 16.0
    wavelet: str = "db2"
    levels: int = 2
    dropout: float = 0.0

    def validate(self) -> None:
        if self.r < 1:
            raise FactorkitError(f"r must be at least 1, got {self.r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise FactorkitError(f"dropout must lie in [0, 1), got {self.dropout}.")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


def get_wara_model(model: nn.Module, config: WaRAConfig) -> nn.Module:
    """Wrap the targeted Linears of ``model`` in WaRA adapters, in place, and
    freeze everything else; returns the model."""
    config.validate()
    targets = model_targets(model, config.target_modules)
    if not targets:
        raise FactorkitError(f"no Linear layer in the blocks matches target_modules {config.target_modules}; "
                             "name layers such as q_proj, v_proj, or pass None for all.")
    if any(isinstance(m, WaRALinear) for m in model.modules()):
        raise FactorkitError("this model already has WaRA adapters; load a fresh base model to add new ones.")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets.items():
        if not isinstance(linear, nn.Linear):
            raise FactorkitError(f"{name} is a {type(linear).__name__}; WaRA adapts nn.Linear layers only.")
        try:
            check_levels(tuple(linear.weight.shape), config.wavelet, config.levels)
            adapter = WaRALinear(linear, config.r, config.alpha, config.wavelet, config.levels, config.dropout)
        except ValueError as exc:
            raise FactorkitError(f"{name} ({linear.out_features}x{linear.in_features}): {exc}.") from None
        replace_module(model, name, adapter)
    model.wara_config = config
    return model


def wara_modules(model: nn.Module) -> dict[str, WaRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, WaRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' A and B, by module name."""
    return {f"{name}.{p}": getattr(m, p).detach() for name, m in wara_modules(model).items() for p in ("A", "B")}


def save_adapter(model: nn.Module, path: str | os.PathLike, overwrite: bool = False,
                 base_model: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (A and B only), atomically.

    The ``factorkit_version`` key marks the folder as factorkit's, so a later
    save with ``overwrite`` may replace it; the base model's folder never is."""
    config = getattr(model, "wara_config", None)
    if config is None or not wara_modules(model):
        raise FactorkitError("this model has no WaRA adapters to save; wrap it with get_wara_model first.")
    if any(m.merged for m in wara_modules(model).values()):
        raise FactorkitError("the adapters are merged into the base weights; unmerge them before saving the adapter.")
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"adapter_type": "wara", "factorkit_version": __version__, "base_model": base_model,
            **asdict(config), "modules": sorted(wara_modules(model))}
    with atomic_dir(path, overwrite, protect=base_model) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    return Path(path)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapter saved at ``path`` onto ``model`` (a fresh base of the same architecture)."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise FactorkitError(f"{path} is not a WaRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}); "
                             "pass a folder written by save_adapter.")
    meta = read_json(path / ADAPTER_CONFIG)
    if meta.get("adapter_type") != "wara":
        raise FactorkitError(f"{path} holds a {meta.get('adapter_type')!r} adapter, not a WaRA one.")
    config = WaRAConfig(**{f.name: meta[f.name] for f in fields(WaRAConfig) if f.name in meta})
    get_wara_model(model, config)
    if sorted(wara_modules(model)) != meta.get("modules", sorted(wara_modules(model))):
        raise FactorkitError(f"the adapter in {path} was trained on other layers than this model has; "
                             "load it onto the base model it was trained on.")
    try:
        state = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise FactorkitError(f"{path / ADAPTER_WEIGHTS} cannot be read ({first_sentence(exc)}); "
                             "the folder is damaged, save the adapter again.") from None
    mine = adapter_state_dict(model)
    if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in mine):
        raise FactorkitError(f"the adapter in {path} does not fit this model (other layer names or shapes); "
                             "load it onto the base model it was trained on.")
    with torch.no_grad():
        for name, module in wara_modules(model).items():
            module.A.copy_(state[f"{name}.A"])
            module.B.copy_(state[f"{name}.B"])
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain Linear back."""
    for name, module in wara_modules(model).items():
        module.merge()
        module._unmerged_weight = None  # the model keeps no way back, and no copy
        replace_module(model, name, module.base)
    if hasattr(model, "wara_config"):
        del model.wara_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers, as PEFT's print_trainable_parameters counts them."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
