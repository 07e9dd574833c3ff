"""factorkit: compress transformer weights into structured factorizations.

    import factorkit
    model, tok = factorkit.models.load("smollm2-135m")
    data = factorkit.data.calibration_tokens(tok, "shakespeare", n_samples=32, seq_len=512)
    factorkit.compress(model, factorkit.SVDLLMConfig(ratio=0.2), data)
    factorkit.save(model, "out/smollm2-svdllm", tokenizer=tok)
    model = factorkit.load("out/smollm2-svdllm")
"""

__version__ = "0.1.0"

from . import data, models  # noqa: E402
from .api import compress, load, save, summarize  # noqa: E402
from .errors import FactorkitError  # noqa: E402
from .methods import ASVDConfig, CompressionConfig, SVDConfig, SVDLLMConfig  # noqa: E402

__all__ = [
    "ASVDConfig",
    "CompressionConfig",
    "FactorkitError",
    "SVDConfig",
    "SVDLLMConfig",
    "compress",
    "data",
    "load",
    "models",
    "save",
    "summarize",
]
