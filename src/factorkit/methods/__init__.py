"""One module per method: its config, and the recipe that walks the model.

Importing this package registers every method in ``METHODS``.
"""

from .base import METHODS, CompressionConfig, Method, get_method, register
from .cospadi import CoSpaDiConfig
from .dsformer import DSFormerConfig
from .lowrank import (
    ASVDConfig,
    FWSVDConfig,
    LowRankConfig,
    RankProfile,
    SVDConfig,
    SVDLLMConfig,
    fisher_information,
    rank_profile,
)
from .auto import AutoConfig

# The method `factorkit compress` uses when none is named: the best one
# implemented so far (see BENCHMARKS.md).
DEFAULT_METHOD = "svdllm"

__all__ = [
    "ASVDConfig",
    "AutoConfig",
    "CoSpaDiConfig",
    "CompressionConfig",
    "DSFormerConfig",
    "DEFAULT_METHOD",
    "FWSVDConfig",
    "LowRankConfig",
    "METHODS",
    "Method",
    "RankProfile",
    "SVDConfig",
    "SVDLLMConfig",
    "fisher_information",
    "get_method",
    "rank_profile",
    "register",
]
