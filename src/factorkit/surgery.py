"""Finding the repeated blocks of a transformer and the Linear layers inside them."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .errors import FactorkitError
from .factors import FactorModule

try:  # GPT-2 style models use a transposed Linear called Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear-like layer as (out_features, in_features)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.T  # Conv1D stores (in, out) and computes x @ W + b
    raise TypeError(f"{type(module).__name__} is not a Linear layer")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of repeated transformer blocks: the ModuleList of identical
    module types holding the most parameters (model.layers in LLaMA/Qwen/Mistral/Gemma,
    transformer.h in GPT-2). Blocks already compressed still count."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(is_linear(m) or isinstance(m, FactorModule) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise FactorkitError(
            f"{type(model).__name__} has no list of repeated blocks containing Linear layers; "
            "factorkit compresses transformers built from such blocks (LLaMA, Qwen, Mistral, Gemma, GPT-2 style)."
        )
    return best[1], best[2]


def target_linears(block: nn.Module, targets: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Linear layers of one block, by their name inside the block.

    ``targets`` keeps only the layers whose name equals one of the entries or
    ends with ``.entry`` (``"q_proj"`` matches ``self_attn.q_proj``).
    """
    found = {name: m for name, m in block.named_modules() if name and is_linear(m)}
    if targets is None:
        return found
    wanted = list(targets)
    return {n: m for n, m in found.items() if any(n == t or n.endswith("." + t) for t in wanted)}


def model_targets(model: nn.Module, targets: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Targeted Linear layers of every block, by their full name in the model."""
    list_name, blocks = find_blocks(model)
    return {f"{list_name}.{i}.{n}": m for i, block in enumerate(blocks)
            for n, m in target_linears(block, targets).items()}


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
