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
from .methods import (  # noqa: E402
    ASVDConfig,
    CoSpaDiConfig,
    CompressionConfig,
    DSFormerConfig,
    FWSVDConfig,
    RankProfile,
    SVDConfig,
    SVDLLMConfig,
    fisher_information,
    rank_profile,
)

__all__ = [
    "ASVDConfig",
    "CoSpaDiConfig",
    "CompressionConfig",
    "DSFormerConfig",
    "FWSVDConfig",
    "FactorkitError",
    "RankProfile",
    "SVDConfig",
    "SVDLLMConfig",
    "compress",
    "data",
    "fisher_information",
    "load",
    "models",
    "rank_profile",
    "save",
    "summarize",
]
