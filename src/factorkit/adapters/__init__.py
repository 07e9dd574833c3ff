"""Adapters trained on a frozen base: WaRA (factorkit's own layer) and WaRA as a PEFT LoRA variant."""

from .wara import WaRAConfig, get_wara_model, load_adapter, merge_and_unload, save_adapter, trainable_parameters

__all__ = ["WaRAConfig", "get_wara_model", "load_adapter", "merge_and_unload", "save_adapter", "trainable_parameters"]
