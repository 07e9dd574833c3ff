"""Training loops shared by the methods that train (DSFormer's STF, fine-tuned baselines)."""

from .loop import TrainConfig, TrainResult, as_batch, batch_rows, model_loss, train

__all__ = ["TrainConfig", "TrainResult", "as_batch", "batch_rows", "model_loss", "train"]
