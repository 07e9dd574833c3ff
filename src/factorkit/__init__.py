"""factorkit: compress transformer weights into structured factorizations.

    import factorkit
    model, tok = factorkit.models.load("smollm2-135m")
    data = factorkit.data.calibration_tokens(tok, "shakespeare", n_samples=32, seq_len=512)
    report = factorkit.compress(model, factorkit.SVDLLMConfig(ratio=0.2), data)
    factorkit.save(model, "out/smollm2-svdllm", tokenizer=tok)
    model = factorkit.load("out/smollm2-svdllm")
    factorkit.quantize(model, "int4", group_size=32)  # torchao, on top of the factors

    # or the whole job (load, calibrate, compress, evaluate, save) in one call:
    report = factorkit.run(factorkit.CompressJob(method=factorkit.SVDLLMConfig(ratio=0.2), eval="shakespeare",
                                                 out="out/smollm2-svdllm"))
"""

__version__ = "0.1.0"

from .quantization import preload_torchao  # noqa: E402

preload_torchao()  # before transformers imports it, so that its CPU-machine warnings stay quiet
from . import data, models  # noqa: E402
from .api import (  # noqa: E402
    CompressionReport,
    CompressJob,
    EvalJob,
    FinetuneJob,
    PretrainJob,
    QuantizationReport,
    QuantizeJob,
    compress,
    compression_record,
    load,
    quantize,
    run,
    save,
    stored_bytes,
    summarize,
)
from .errors import FactorkitError  # noqa: E402
from .methods import (  # noqa: E402
    ASVDConfig,
    AutoConfig,
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
from .training import TrainConfig  # noqa: E402

__all__ = [
    "ASVDConfig",
    "CompressJob",
    "CompressionReport",
    "EvalJob",
    "FinetuneJob",
    "PretrainJob",
    "QuantizationReport",
    "QuantizeJob",
    "TrainConfig",
    "compression_record",
    "run",
    "AutoConfig",
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
    "quantize",
    "rank_profile",
    "save",
    "stored_bytes",
    "summarize",
]
