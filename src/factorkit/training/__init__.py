"""Training loops shared by the methods that train (DSFormer's STF, fine-tuned
baselines) and pretraining from scratch (SLTrain and its baselines)."""

from .loop import Distributed, TrainConfig, TrainResult, as_batch, batch_rows, model_loss, train, train_rows

__all__ = ["Distributed", "TrainConfig", "TrainResult", "as_batch", "batch_rows", "model_loss", "train", "train_rows"]
