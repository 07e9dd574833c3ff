"""Runs a model block by block on calibration batches and collects per-Linear statistics."""

from .engine import LinearStats, calibrate_blockwise, calibrate_groupwise, capture_block_inputs, run_block
from .fisher import FisherStats, collect_fisher

__all__ = [
    "FisherStats",
    "LinearStats",
    "calibrate_blockwise",
    "calibrate_groupwise",
    "capture_block_inputs",
    "collect_fisher",
    "run_block",
]
