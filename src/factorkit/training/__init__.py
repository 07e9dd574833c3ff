"""Training loops shared by the methods that train (DSFormer's STF, fine-tuned baselines)."""

from .loop import TrainConfig, TrainResult, batch_rows, causal_lm_loss, train

__all__ = ["TrainConfig", "TrainResult", "batch_rows", "causal_lm_loss", "train"]
