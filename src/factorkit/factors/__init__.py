"""nn.Modules that replace nn.Linear. They hold factors; they never compute them."""

from .base import FACTOR_TYPES, FactorModule, factor_modules
from .lowrank import LowRankLinear

__all__ = ["FACTOR_TYPES", "FactorModule", "LowRankLinear", "factor_modules"]
