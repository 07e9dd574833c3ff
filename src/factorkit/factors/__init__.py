"""nn.Modules that replace nn.Linear. They hold factors; they never compute them."""

from .base import FACTOR_TYPES, FactorModule, factor_modules, factor_parameters
from .densesparse import DenseSparseLinear
from .dictionary import DictionaryLinear
from .lowrank import LowRankLinear
from .sparselowrank import SparseLowRankLinear

__all__ = ["DenseSparseLinear", "DictionaryLinear", "FACTOR_TYPES", "FactorModule", "LowRankLinear",
           "SparseLowRankLinear", "factor_modules", "factor_parameters"]
