"""Small LLaMA-style models to pretrain from scratch.

The family follows the shapes the SLTrain and GaLore papers pretrain (their
smallest, "60M", is hidden 512, 8 layers, 8 heads, MLP 1376 with a 32k
vocabulary), scaled down to what a CPU trains in minutes. A name counts the
parameters at the papers' 32k vocabulary; the real vocabulary comes from the
tokenizer (a 4k one trained on Shakespeare makes llama-20m 6.8M parameters,
4.7M of them in the blocks). Embeddings and the LM head are separate (untied), as
in the papers.

A name is one of ``PRETRAIN_CONFIGS`` or a path to a JSON file of
``transformers.LlamaConfig`` fields (vocab_size is set from the tokenizer);
a file naming another ``model_type`` (a Gemma-3 config.json) is refused, since
pretraining is LLaMA-only by design. Compression and fine-tuning take any
architecture built from Linear blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError

from ..errors import FactorkitError
from .files import first_sentence

PRETRAIN_CONFIGS: dict[str, dict] = {
    # MLP width ~ 8/3 of hidden, a multiple of 16; llama-60m is the papers' own shape
    "llama-5m": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 176},
    "llama-20m": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 688},
    "llama-60m": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 1376},
}
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "max_position_embeddings")
COMMON = {"max_position_embeddings": 1024, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
          "attention_dropout": 0.0, "hidden_act": "silu"}


def llama_config(name: str, vocab_size: int, max_positions: int | None = None) -> transformers.LlamaConfig:
    """The LlamaConfig of a family member or of a JSON file, with the tokenizer's vocabulary."""
    if name in PRETRAIN_CONFIGS:
        fields = {**COMMON, **PRETRAIN_CONFIGS[name]}
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FactorkitError(f"unknown model config {name!r}; use one of {', '.join(PRETRAIN_CONFIGS)} "
                                 "or a path to a JSON file of LlamaConfig fields.")
        try:
            given = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FactorkitError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file.") from None
        if not isinstance(given, dict):
            raise FactorkitError(f"{path} holds a JSON {type(given).__name__}, not an object of LlamaConfig fields; "
                                 "fix the file.")
        model_type = given.pop("model_type", "llama")
        if model_type != "llama":  # LlamaConfig would take a Gemma's fields and build a LLaMA that claims to be one
            raise FactorkitError(f"{path} describes a {model_type!r} model, but pretraining builds LLaMA models "
                                 "only; give LlamaConfig fields (or model_type llama).")
        fields = {**COMMON, **given}
    for size in SIZES:  # checked here: transformers builds zero or negative sizes, or fails deep inside
        value = fields.get(size, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FactorkitError(f"model config {name!r} sets {size} to {value!r}; it must be a whole number of at "
                                 "least 1.")
    fields["vocab_size"] = vocab_size
    if max_positions is not None:
        fields["max_position_embeddings"] = max(max_positions, fields.get("max_position_embeddings", 0))
    try:
        return transformers.LlamaConfig(**fields)
    except (TypeError, ValueError, StrictDataclassError) as exc:
        raise FactorkitError(f"model config {name!r} is not a valid LlamaConfig ({first_sentence(exc)}); "
                             "fix the file.") from None


def build_llama(config: transformers.LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                ) -> transformers.LlamaForCausalLM:
    """A randomly initialised LLaMA (transformers' own initialisation), seeded."""
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype)
