"""What every factor module knows about itself.

A factor module stands where an ``nn.Linear`` stood and computes the same
kind of map. It can count its parameters, rebuild the dense matrix it
approximates, and describe its shape in a small dict (``spec``) from which an
empty module of the same shape is rebuilt when a saved model is loaded; the
values then come from the safetensors file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

FACTOR_TYPES: dict[str, type["FactorModule"]] = {}


class FactorModule(nn.Module, ABC):
    factor_type: ClassVar[str]
    # weight matrices factorkit.quantize may replace by torchao quantized tensors (the module's forward and
    # dense_weight then read them through plain()); () for modules it must leave alone
    quantizable: ClassVar[tuple[str, ...]] = ()
    in_features: int
    out_features: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "factor_type" in cls.__dict__:
            FACTOR_TYPES[cls.factor_type] = cls

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able constructor arguments that rebuild an empty module of this shape."""

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this module applies."""

    def param_count(self) -> int:
        """Numbers stored by this module (factors and bias)."""
        return sum(p.numel() for p in self.parameters())

    def index_bits(self) -> int:
        """Bits stored besides the numbers in parameters (supports of sparse codes; 0 for dense factors)."""
        return 0

    def dense_param_count(self) -> int:
        """Numbers the nn.Linear it replaces stored."""
        bias = getattr(self, "bias", None)
        return self.in_features * self.out_features + (self.out_features if bias is not None else 0)

    def dense_equivalent(self) -> nn.Linear:
        """An nn.Linear that computes the same map (for inspection and merging)."""
        weight = self.dense_weight()
        bias = getattr(self, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None) -> "FactorModule":
        return cls(**spec, dtype=dtype)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in its float dtype: dequantized when torchao quantized it (it has ``qdata``), else itself."""
    return tensor.dequantize() if hasattr(tensor, "qdata") and hasattr(tensor, "dequantize") else tensor


def factor_modules(model: nn.Module) -> Iterator[tuple[str, FactorModule]]:
    for name, module in model.named_modules():
        if isinstance(module, FactorModule):
            yield name, module


def factor_parameters(model: nn.Module, kinds: tuple[type, ...] = (FactorModule,)) -> list[tuple[str, nn.Parameter]]:
    """The named parameters of every factor module of the given kinds, each once (a dictionary shared by
    several layers is listed under its first owner)."""
    seen: set[int] = set()
    out = []
    for name, module in factor_modules(model):
        if isinstance(module, kinds):
            for pname, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{name}.{pname}", p))
    return out
