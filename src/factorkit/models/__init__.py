"""Loading models (local folder, GGUF file, built-in name, hub id) and saving compressed ones."""

from .checkpoint import FACTORKIT_JSON, is_factorkit_dir, load_compressed, save
from .hub import BUILTIN_MODELS, cache_dir, load

__all__ = [
    "BUILTIN_MODELS",
    "FACTORKIT_JSON",
    "cache_dir",
    "is_factorkit_dir",
    "load",
    "load_compressed",
    "save",
]
