"""Whole jobs that train: pretraining from scratch and fine-tuning with adapters."""
