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
import torch.nn.functional as F
from torch import nn

from .. import kernels

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


# Token counts up to which a few tokens times an int8-stored weight run in factorkit's compiled kernel
# (kernels/quant.cpp) rather than torch's path (the whole weight converted to float, then a GEMM);
# from benchmarks/bench_kernels.py.
INT8_MAX_TOKENS = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a torchao weight stored as int8 numbers (int8 with a scale per row, int4 one per byte with a
    scale per group of a row, symmetric) times a few tokens on the CPU runs factorkit's compiled kernel."""
    if not is_quantized(weight):  # float weights: nothing to look up
        return F.linear(x, weight, bias)
    parts = int8_parts(weight) if x.device.type == "cpu" and weight.device.type == "cpu" else None
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if parts is None or not 0 < tokens <= INT8_MAX_TOKENS or (torch.is_grad_enabled() and x.requires_grad):
        return F.linear(x, weight, bias)
    ext = kernels.dictionary()
    if not kernels.usable(ext):
        return F.linear(x, weight, bias)
    qdata, scale, group, by_columns = parts
    product = ext.int8_colgroups if by_columns else ext.int8_rows
    y = product(x.reshape(tokens, -1).float().contiguous(), qdata, scale, group)
    y = y.to(x.dtype).reshape(*x.shape[:-1], qdata.shape[0])
    return y if bias is None else y + bias


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding; a torchao weight stored as int8 numbers (with a scale per row, per group of a row or per
    group down the columns, symmetric) gives just the rows looked up, each times its scales: torchao's own
    lookup converts the whole table to float first (a vocabulary of 262k rows on every decoded token)."""
    parts = int8_parts(weight) if is_quantized(weight) else None
    if parts is None:
        return F.embedding(ids, weight)
    qdata, scale, group, by_columns = parts
    rows = qdata[ids].to(scale.dtype)
    if by_columns:  # one scale per `group` rows and column
        rows = rows * scale[torch.div(ids, group, rounding_mode="floor")]
    else:  # one scale per `group` numbers of a row
        rows = (rows.unflatten(-1, (-1, group)) * scale[ids].unsqueeze(-1)).flatten(-2)
    return rows.to(weight.dtype)


def int8_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, bool] | None:
    """(int8 numbers, float32 scales, numbers per scale, grouped down the columns?) of a weight the compiled
    int8 kernel can multiply, else None; worked out once per tensor and kept on it."""
    cached = getattr(weight, "_factorkit_int8", False)
    if cached is not False:
        return cached
    parts = None
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    block = tuple(getattr(weight, "block_size", ()) or ())
    zero = getattr(weight, "zero_point", None)
    weight_only = (getattr(weight, "act_quant_kwargs", None) is None
                   and getattr(weight, "activation_quantization", None) is None
                   and getattr(weight, "act_pre_scale", None) is None)
    if (isinstance(qdata, torch.Tensor) and qdata.dtype == torch.int8 and qdata.ndim == 2 and len(block) == 2
            and isinstance(scale, torch.Tensor) and weight_only and (zero is None or not bool(zero.any()))):
        out, cols = qdata.shape
        if block[0] == 1 and cols % block[1] == 0 and scale.numel() == out * (cols // block[1]):
            parts = (qdata.contiguous(), scale.float().contiguous().view(out, -1), int(block[1]), False)
        elif block[1] == 1 and out % block[0] == 0 and scale.numel() == (out // block[0]) * cols:
            parts = (qdata.contiguous(), scale.float().contiguous().view(-1, cols), int(block[0]), True)
    weight._factorkit_int8 = parts
    return parts


def is_quantized(tensor: torch.Tensor) -> bool:
    """A torchao quantized tensor (it has integer ``qdata`` and ``dequantize``), not a plain float tensor."""
    return hasattr(tensor, "qdata") and hasattr(tensor, "dequantize")


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in its float dtype: dequantized when torchao quantized it, else itself."""
    return tensor.dequantize() if is_quantized(tensor) else tensor


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
