"""Runs a model block by block on calibration batches and collects per-Linear statistics."""

from .blocks import find_blocks, linear_weight, target_linears
from .engine import LinearStats, calibrate_blockwise, capture_block_inputs, run_block

__all__ = [
    "LinearStats",
    "calibrate_blockwise",
    "capture_block_inputs",
    "find_blocks",
    "linear_weight",
    "run_block",
    "target_linears",
]
