"""Runs a model block by block on calibration batches and collects per-Linear statistics."""

from .blocks import find_blocks, linear_weight, model_targets, target_linears
from .fisher import FisherStats, collect_fisher
from .engine import LinearStats, calibrate_blockwise, calibrate_groupwise, capture_block_inputs, run_block

__all__ = [
    "FisherStats",
    "collect_fisher",
    "LinearStats",
    "calibrate_blockwise",
    "calibrate_groupwise",
    "capture_block_inputs",
    "find_blocks",
    "linear_weight",
    "model_targets",
    "run_block",
    "target_linears",
]
