"""Runs a model block by block on calibration batches and collects per-Linear statistics."""

from .engine import LinearStats, calibrate_blockwise, calibrate_groupwise, capture_block_inputs, run_block
from .errors import linear_inputs, relative_output_error, relative_output_errors
from .fisher import FisherStats, collect_fisher

__all__ = [
    "FisherStats",
    "LinearStats",
    "calibrate_blockwise",
    "calibrate_groupwise",
    "capture_block_inputs",
    "collect_fisher",
    "linear_inputs",
    "relative_output_error",
    "relative_output_errors",
    "run_block",
]
