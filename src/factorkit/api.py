"""The library's verbs: compress, quantize, save, load, summarize, and run(job).

``compress`` changes a model in place and returns what the method measured
(a :class:`CompressionReport`). ``run`` does a whole job, the way the command
line does it, and returns a typed report:

    report = factorkit.run(CompressJob(method=SVDLLMConfig(ratio=0.2), eval="shakespeare", out="out/svdllm"))
    report.perplexity_after, report.compression.summary.ratio_targeted

Jobs: :class:`CompressJob` (load, calibrate, compress, quantize, evaluate, save), :class:`QuantizeJob`
(load any model, quantize, evaluate, save),
:class:`EvalJob` (perplexity and the zero-shot suite of any model), :class:`PretrainJob`,
:class:`FinetuneJob` (the workflows, plus saving).
"""

from __future__ import annotations

import copy
import os
import time
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, nested, option, optional, positive_int, whole
from .errors import FactorkitError
from .eval import TASKS, PerplexityResult, ZeroShotResult, check_tasks, perplexity, zero_shot
from .eval.perplexity import check_token_ids
from .factors import FactorModule, factor_modules
from .report import fmt_bytes, fmt_count, fmt_ppl
from .methods import DEFAULT_METHOD, METHODS, CompressionConfig, get_method
from .models import load_compressed, save as _save
from .models.checkpoint import is_factorkit_dir, parse_dtype, read_compression
from .quantization import GROUP_SIZES, SCHEMES, QuantizationReport, quantization_record, quantize, stored_bytes
from .surgery import find_blocks, linear_weight, model_targets
from .workflows.finetune import FinetuneConfig, FinetuneResult, finetune, save_finetuned
from .workflows.pretrain import PretrainConfig, PretrainResult, leave_distributed, pretrain



# ---------------------------------------------------------------- compress ---

@dataclass
class CompressionSummary:
    """Parameter counts of the targeted matrices and the whole model.

    ``ratio_targeted`` counts numbers only (parameters, as papers do);
    ``ratio_targeted_storage`` also counts the bits that sparse factors spend on
    their supports, at the model's dtype (``value_bits`` per number). Low-rank
    factors store no indices, so for them both are equal. The targeted matrices
    include those a method kept dense (counted at their dense size before and
    after); a dictionary shared by several layers is counted once."""

    factor_modules: int
    targeted_dense_params: int  # what the replaced Linears stored
    targeted_params: int  # what their factors store
    model_params_before: int
    model_params_after: int
    targeted_index_bits: int = 0  # support masks / indices of sparse factors
    value_bits: int = 32  # bits per stored number at the model's dtype

    @property
    def ratio_targeted(self) -> float:
        # (dense - kept) / dense: exact integers divided once, so a budget met exactly reads exactly the ratio
        d = self.targeted_dense_params
        return (d - self.targeted_params) / d if d else 0.0

    @property
    def ratio_targeted_storage(self) -> float:
        if not self.targeted_dense_params:
            return 0.0
        stored = self.targeted_params * self.value_bits + self.targeted_index_bits
        dense = self.targeted_dense_params * self.value_bits
        return (dense - stored) / dense

    @property
    def ratio_model(self) -> float:
        return (self.model_params_before - self.model_params_after) / self.model_params_before

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio_targeted": self.ratio_targeted,
                "ratio_targeted_storage": self.ratio_targeted_storage, "ratio_model": self.ratio_model}


@dataclass
class CompressionReport:
    """What one ``compress`` call did: the config, the counts, the time, and
    what the method measured (``fit``: per-matrix errors and times for
    CoSpaDi, ranks for the low-rank methods, the loss curve for DSFormer)."""

    config: CompressionConfig
    summary: CompressionSummary
    seconds: float
    kept_dense: list[str] = field(default_factory=list)  # targeted matrices the method left dense
    fit: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    def record(self) -> dict:
        """What factorkit.json keeps of it (``CompressionConfig.from_dict(record["config"])`` rebuilds the config)."""
        return {"method": self.method, "config": self.config.to_dict(), "kept_dense": self.kept_dense}

    def as_dict(self) -> dict:
        return {**self.record(), "summary": self.summary.as_dict(), "seconds": self.seconds, "fit": self.fit}


# How each model in memory was compressed (weakly held: the model owns nothing
# extra). save() writes it into factorkit.json; load() puts it back.
_RECORDS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def compression_record(model: nn.Module) -> dict | None:
    """{"method", "config", "kept_dense"} of a model compressed or loaded in this process, else None."""
    return _RECORDS.get(model)


def compress(model: nn.Module, config: CompressionConfig, data: torch.Tensor | None = None,
             *, train_data: torch.Tensor | None = None, progress: bool = True,
             heal_data: torch.Tensor | None = None) -> CompressionReport:
    """Compress ``model`` in place with the method ``config`` names; return the report.

    ``data`` holds calibration token ids, shape (samples, seq_len); see
    :func:`factorkit.data.calibration_tokens`. Models with a task head may
    instead get a list of labelled batches (dicts of model inputs with
    ``labels``): FWSVD's Fisher information then comes from the task loss.
    Data-free methods ignore it. With ``config.heal`` > 0 the compressed model
    is then distilled from a copy of the dense one on ``data`` for that many
    steps (see :mod:`factorkit.methods.heal`); ``fit["heal"]`` holds its losses.
    ``train_data`` (same form as ``data``) is the text training draws from
    instead, the healing's or that of a method that trains its factors
    (dsformer), while the method's statistics stay on ``data``: a run that
    takes more sequences than it is given repeats them and overfits, so pass
    at least ``config.training_sequences()``. ``heal_data`` is its old name.
    """
    if not isinstance(model, nn.Module):
        raise FactorkitError(f"model must be a torch.nn.Module such as a transformers model, got "
                             f"{type(model).__name__}.")
    if not isinstance(config, CompressionConfig):
        raise FactorkitError(f"config must be a method config such as SVDLLMConfig(ratio=0.2), got {type(config).__name__}.")
    method = get_method(config.method)
    find_blocks(model)  # fails with a clear message on a model without Linear blocks
    if any(True for _ in factor_modules(model)):
        raise FactorkitError("this model is already compressed; load the original model to compress it again.")
    if config.wants_data():
        if data is None:
            need = "is data-aware" if config.uses_data() else "heals on text (heal > 0)"
            raise FactorkitError(f"{config.method} {need} and needs calibration tokens; pass "
                                 "data=calibration_tokens(...).")
        _check_data(model, data)
    if heal_data is not None:
        if train_data is not None:
            raise FactorkitError("heal_data is the old name of train_data; pass only train_data.")
        train_data = heal_data
    if train_data is not None:
        if not config.training_sequences():
            raise FactorkitError(f"train_data is only used when compress() trains (heal > 0, or a method that "
                                 f"trains its factors such as dsformer), and {config.method} with these settings "
                                 "does not; set heal in the config or drop train_data.")
        _check_data(model, train_data)
    # names only: holding the Linears would keep every dense weight alive while the method replaces them
    targeted = list(model_targets(model, config.targets))
    for name in targeted:  # (offloaded blocks: checked as each is read)
        weight = linear_weight(model.get_submodule(name))
        if not weight.is_meta and not bool(torch.isfinite(weight).all()):
            raise FactorkitError(f"the weight of {name} holds NaN or infinite values; compress a model with finite "
                                 "weights (check how it was loaded or trained).")
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    teacher = copy.deepcopy(model) if config.heal else None  # the dense model, before the method changes it
    trains_itself = train_data is not None and not config.heal  # (dsformer refuses heal: it trains already)
    fit = method.fn(model, config, data, progress, **({"train_data": train_data} if trains_itself else {})) or {}
    if teacher is not None:
        from .methods.heal import heal

        fit["heal"] = heal(model, teacher, data if train_data is None else train_data, config, progress)
        del teacher
    seconds = time.perf_counter() - start
    # Targeted matrices a method chose to keep dense (global allocation does
    # when a factorization would store as much); summarize() counts them.
    kept = [name for name in targeted if not isinstance(model.get_submodule(name), FactorModule)]
    _RECORDS[model] = {"method": config.method, "config": config.to_dict(), "kept_dense": kept}
    summary = summarize(model)
    assert summary.model_params_before == before, "summarize() must count the dense model it replaced"
    return CompressionReport(config, summary, seconds, kept, fit)


def _check_data(model: nn.Module, data) -> None:
    if isinstance(data, torch.Tensor):
        if data.ndim == 2 and data.dtype == torch.long and data.shape[0] >= 1:
            check_token_ids(model, data)
            return
    elif isinstance(data, (list, tuple)) and data and all(isinstance(b, Mapping) for b in data):
        return
    raise FactorkitError("calibration data must be a LongTensor of token ids with shape (samples, seq_len), "
                         "or a non-empty list of batches (dicts of model inputs, with 'labels' for Fisher).")


def _tokenizer_fix(loaded: tuple | None) -> str:
    """How to mend token ids a job's tokenizer made outside its model's vocabulary."""
    if loaded is not None:
        return "the tokenizer passed with the model does not match it; pass the model's own tokenizer"
    return "the tokenizer saved with the model does not match it; save the model's own tokenizer beside it"


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         report: CompressionReport | None = None, protect: str | os.PathLike | None = None):
    """Save to a folder (safetensors + factorkit.json); atomic, never half-written.
    ``report`` defaults to what ``compress`` (or ``load``) recorded for this model;
    ``protect`` (the model's source folder) is never replaced, even with overwrite."""
    record = report.record() if report is not None else compression_record(model)
    return _save(model, path, tokenizer=tokenizer, overwrite=overwrite, compression=record, protect=protect)


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Rebuild a model saved with :func:`save`."""
    if not is_factorkit_dir(path):
        raise FactorkitError(f"{path} is not a folder written by factorkit.save (no factorkit.json); "
                             "use factorkit.models.load for other models.")
    model = load_compressed(path, parse_dtype(dtype))
    _remember(model, path)
    return model


def _remember(model: nn.Module, path: str | os.PathLike) -> None:
    record = read_compression(path)
    if record is not None:
        _RECORDS[model] = record


def summarize(model: nn.Module) -> CompressionSummary:
    """How much the factor modules in ``model`` saved (tied and shared weights counted once)."""
    modules = [m for _, m in factor_modules(model)]
    dense = sum(m.dense_param_count() for m in modules)
    unique = {id(p): p.numel() for m in modules for p in m.parameters()}
    factored = sum(unique.values())
    after = sum(p.numel() for p in model.parameters())
    record = compression_record(model) or {}
    kept = sum(linear_weight(model.get_submodule(name)).numel() for name in record.get("kept_dense", []))
    bits = next(model.parameters()).element_size() * 8
    return CompressionSummary(len(modules), dense + kept, factored + kept, after - factored + dense, after,
                              sum(m.index_bits() for m in modules), bits)


# -------------------------------------------------------------------- jobs ---

def _model_option(default: str = "smollm2-135m") -> Any:
    return option(default, "a folder written by factorkit, a Hugging Face model folder, a .gguf file, a built-in "
                           "name (smollm2-135m, gemma3-270m, all-minilm-l6-v2) or a hub id (online)")


def _text_help(what: str) -> str:
    return f"{what}: shakespeare or general (built in), wikitext2 or c4 (online), or a UTF-8 text file"


@dataclass
class _EvalSettings(Config):
    seq_len: int = option(2048, "evaluation chunk length in tokens", check=whole(2))
    max_chunks: int | None = option(None, "evaluate at most this many chunks (default: all)",
                                    check=optional(positive_int))
    dtype: str = option("float32", "dtype to run the model in", choices=("float32", "bfloat16", "float16"))


def _out() -> Any:
    return option(None, "folder to write to")


def _overwrite() -> Any:
    return option(False, "replace --out if factorkit wrote it (never a folder holding other files)")


def _scheme(default: str | None) -> Any:
    lead = "then quantize" if default is None else "quantize"
    return option(default, f"{lead} the weight matrices of the blocks (dense layers and factors) with torchao: int8 "
                           "(a scale per row) or int4 (a scale per --group-size numbers)", choices=SCHEMES)


def _group_size() -> Any:
    return option(32, "numbers per int4 scale", choices=GROUP_SIZES, when=("quantize", "int4"))


def _quantize_head(when: bool = True) -> Any:
    return option(False, "quantize the LM head too (a scale per vocabulary row), and the input embeddings tied to "
                         "it: what bounds decoding in small models with large vocabularies",
                  when=("quantize", SCHEMES) if when else None)


OFFLOAD_METHODS = ("svdllm", "asvd", "cospadi")


@dataclass
class CompressJob(_EvalSettings):
    """Load ``model``, calibrate on ``calib``, compress with ``method``,
    measure perplexity on ``eval`` before and after (optional), save to ``out``."""

    method: CompressionConfig | None = option(None, "the method's config (default: SVD-LLM at ratio 0.2)", cli=False)
    model: str = _model_option()
    calib: str = option("shakespeare", _text_help("calibration text (for shakespeare, the calibration plays)"))
    calib_samples: int = option(32, "calibration sequences", check=positive_int)
    calib_seq_len: int = option(512, "tokens per calibration sequence", check=whole(2))
    train_samples: int | None = option(None, "sequences of the calibration text that training draws, with --heal "
                                             "or a method that trains its factors (dsformer); the method's "
                                             "statistics stay on --calib-samples (default: as many as the run "
                                             "takes, steps x batch x accumulation, so that none repeats)",
                                       check=optional(positive_int))
    heal_samples: int | None = option(None, "the old name of --train-samples", check=optional(positive_int),
                                      record=False)
    seed: int = option(0, "seed for data splits and sampling", check=whole(0))
    eval: str | None = option(None, "also measure perplexity before and after on this text (its held-out split)")
    eval_before: bool = option(True, "with eval, also measure the model before compressing (sweeps that "
                                     "measured it once turn this off)", cli=False)
    max_chunks: int | None = option(16, "evaluate at most this many chunks", check=optional(positive_int))
    quantize: str | None = _scheme(None)
    group_size: int = _group_size()
    quantize_head: bool = _quantize_head()
    offload: bool = option(False, "keep the blocks' weights on disk and hold one block at a time (a model larger "
                                  "than memory): svdllm, asvd or cospadi with uniform ratios; needs a Hugging Face "
                                  "folder of safetensors or a built-in name")
    out: str | None = _out()
    overwrite: bool = _overwrite()

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = METHODS[DEFAULT_METHOD].config_cls()
        elif isinstance(self.method, Mapping):
            self.method = CompressionConfig.from_dict(dict(self.method))
        if not isinstance(self.method, CompressionConfig):
            raise ConfigError("method", f"must be a method config such as SVDLLMConfig(ratio=0.2), got "
                                        f"{type(self.method).__name__}.")
        super().__post_init__()

    def check(self) -> None:
        if self.heal_samples is not None:
            if self.train_samples not in (None, self.heal_samples):
                raise ConfigError("heal_samples", "is the old name of --train-samples; give only --train-samples.")
            self.train_samples = self.heal_samples
        if self.train_samples is not None and not self.method.training_sequences():
            raise ConfigError("heal_samples" if self.heal_samples is not None else "train_samples",
                              "applies only when the compression trains (--heal above 0, or --method dsformer); "
                              "add --heal STEPS or drop it.")
        if self.quantize_head and not self.quantize:
            raise ConfigError("quantize_head", "applies only with --quantize; add --quantize int8 (or int4).")
        if self.offload:
            self._check_offload()

    def _check_offload(self) -> None:
        """What --offload cannot do: each needs the whole model in memory."""
        m = self.method
        for name, command in (("eval", "eval"), ("quantize", "quantize")):
            if getattr(self, name):
                raise ConfigError(name, f"needs the whole model in memory and does not combine with --offload; drop "
                                        f"it and run factorkit {command} on the saved folder.")
        if m.heal:
            raise ConfigError("offload", "does not combine with --heal, which trains the whole model in memory; "
                                         "drop one of the two.")
        if m.method not in OFFLOAD_METHODS:
            raise ConfigError("offload", f"works with {', '.join(OFFLOAD_METHODS)} (block by block), not {m.method}; "
                                         "drop --offload or change the method.")
        if getattr(m, "allocation", "uniform") != "uniform":
            raise ConfigError("offload", "works with uniform ratios only (global allocation profiles the whole "
                                         "model at once); drop --allocation global or --offload.")
        if getattr(m, "group", 1) > 1 or getattr(m, "checkpoint_dir", None):
            what = "--group" if getattr(m, "group", 1) > 1 else "--checkpoint-dir"
            raise ConfigError("offload", f"does not combine with {what} yet; drop one of the two.")
        if self.out is None:
            raise ConfigError("offload", "writes the compressed blocks to disk as it goes; name the folder with "
                                         "--out.")


@dataclass
class QuantizeJob(_EvalSettings):
    """Load ``model`` (dense or compressed), quantize its weight matrices with torchao, measure perplexity on
    ``eval`` before and after (optional), save to ``out``."""

    model: str = _model_option()
    quantize: str = _scheme("int8")
    group_size: int = _group_size()
    quantize_head: bool = _quantize_head(when=False)
    seed: int = option(0, "seed of the shakespeare split", check=whole(0))
    eval: str | None = option(None, "also measure perplexity before and after on this text (its held-out split)")
    max_chunks: int | None = option(16, "evaluate at most this many chunks", check=optional(positive_int))
    out: str | None = _out()
    overwrite: bool = _overwrite()


def _schemes(value: Any) -> str | None:
    bad = [v for v in value or () if v not in SCHEMES]
    return f"must list schemes among {', '.join(SCHEMES)}, got {bad[0]!r}." if bad else None


def _counts(what: str, example: str) -> Any:
    def check(value: Any) -> str | None:
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            return f"must list one or more {what} (whole numbers of at least 1) such as {example}, got {value!r}."
        return None
    return check


@dataclass
class SpeedJob(Config):
    """Greedy decode speed, prefill time and memory of ``model`` and of the models to ``compare`` with it
    (and of ``model`` quantized in memory), one after the other in this process, as ratios against ``model``."""

    model: str = _model_option()
    compare: tuple[str, ...] | None = option(None, "models to measure against --model, comma separated (saved "
                                                   "factorkit folders, model folders, .gguf files or names)")
    quantize: tuple[str, ...] | None = option(None, "also measure --model quantized in memory, one row per scheme: "
                                                    "int8, int4 (a scale per --group-size numbers)", check=_schemes)
    group_size: int = option(32, "numbers per int4 scale", choices=GROUP_SIZES)
    quantize_head: bool = _quantize_head(when=False)
    new_tokens: int = option(64, "tokens each sequence decodes", check=positive_int)
    batch_sizes: tuple[int, ...] = option((1, 8), "decode batch sizes, comma separated",
                                          check=_counts("batch sizes", "1,8"))
    prefill: tuple[int, ...] = option((512, 2048), "prompt lengths of the prefill timing, comma separated",
                                      check=_counts("prompt lengths", "512,2048"))
    repeats: int = option(3, "timed repeats of each measurement (the best is kept)", check=positive_int)
    dtype: str = option("float32", "dtype to run the models in", choices=("float32", "bfloat16", "float16"))

    def check(self) -> None:
        if self.quantize and len(set(self.quantize)) != len(self.quantize):
            raise ConfigError("quantize", "names a scheme twice; list each once.")
        if self.quantize_head and not self.quantize:
            raise ConfigError("quantize_head", "applies to the --quantize rows; add --quantize int8 (or int4).")


@dataclass
class SpeedReport:
    job: SpeedJob
    result: Any  # eval.speed.SpeedResult

    def as_dict(self) -> dict:
        return {"job": self.job.to_dict(), **self.result.as_dict()}

    def table(self) -> tuple:
        return self.result.table(f"speed against {self.job.model} ({self.job.dtype})")


def _task_names(value: Any) -> str | None:
    if value is None or isinstance(value, tuple) and value and all(isinstance(t, str) and t.strip() for t in value):
        return None
    if isinstance(value, str):
        return f"must be a tuple of task names such as ({value!r},), got the string {value!r}."
    return f"must name at least one task, such as piqa,arc_easy, got {value!r}."


@dataclass
class EvalJob(_EvalSettings):
    """Perplexity of ``model`` on ``text`` (for shakespeare, the held-out plays) and its accuracy on the
    zero-shot ``tasks`` of lm-evaluation-harness (given tasks, perplexity is measured only with a text)."""

    model: str = _model_option()
    text: str | None = option(None, _text_help("text to measure perplexity on (its held-out split)")
                              + "; when not given, shakespeare, or with --tasks no perplexity")
    seed: int = option(0, "seed of the shakespeare split", check=whole(0))
    tasks: tuple[str, ...] | None = option(None, f"zero-shot tasks of lm-evaluation-harness, comma separated: "
                                                 f"{', '.join(TASKS)} (documents on this machine), all (these 8), "
                                                 "or any other lm-eval task (downloaded; online)", check=_task_names)
    limit: int | None = option(None, "with --tasks, score only the first LIMIT documents of each task (none: all)",
                               check=optional(positive_int))
    batch_size: int = option(8, "with --tasks, requests scored per forward pass", check=positive_int)

    @property
    def perplexity_text(self) -> str | None:
        """The text perplexity is measured on, or None."""
        return self.text if self.text is not None else (None if self.tasks else "shakespeare")

    def check(self) -> None:
        if self.limit is not None and not self.tasks:
            raise ConfigError("limit", "applies only with tasks (--tasks); name the tasks or drop it.")


def _load_with_tokenizer(name: str, dtype: str):
    from .models import load as load_model

    model, tokenizer = load_model(name, parse_dtype(dtype))
    if tokenizer is None:
        raise FactorkitError(f"{name} has no tokenizer files; save the tokenizer beside the model.")
    if is_factorkit_dir(name):
        _remember(model, name)
    return model, tokenizer


STORED_AS = {"dense": "kept dense", "lowrank": "stored as low rank", "dictionary": "stored as sparse dictionaries"}


def allocation_rows(fit: dict) -> list[list[str]]:
    """Rows of a byte-budget allocation (methods.auto) for the compression table: the bytes against the budget,
    how many matrices took each factor type and the bytes each type holds, and where the time went."""
    if "types" not in fit:
        return []
    rows = [["stored bytes of the targeted matrices", fmt_bytes(fit["dense_bytes"]),
             f"{fmt_bytes(fit['bytes'])} (budget {fmt_bytes(fit['budget_bytes'])})"]]
    rows += [[f"matrices {STORED_AS.get(kind, kind)}", "", f"{entry['matrices']}, {fmt_bytes(entry['bytes'])}"]
             for kind, entry in sorted(fit["types"].items())]
    split = [(label, fit[key]) for label, key in (("Fisher", "fisher_s"), ("profile", "profile_s"),
                                                  ("knapsack", "knapsack_s"), ("solve", "solve_s")) if key in fit]
    rows.append([" / ".join(label for label, _ in split) + " time", "",
                 " / ".join(f"{seconds:.1f} s" for _, seconds in split)])
    return rows


@dataclass
class CompressJobReport:
    job: CompressJob
    compression: CompressionReport
    bytes_before: int  # the dense weights as save() would write them
    bytes_after: int  # the safetensors file written (0 without --out)
    perplexity_before: PerplexityResult | None = None
    perplexity_after: PerplexityResult | None = None
    eval_seconds: tuple[float, float] = (0.0, 0.0)
    quantization: QuantizationReport | None = None
    rank: int = 0  # under torchrun, this process's rank (only rank 0 writes and reports)

    def as_dict(self) -> dict:
        ppl = {k: (getattr(self, k).as_dict() if getattr(self, k) is not None else None)
               for k in ("perplexity_before", "perplexity_after")}
        return {"job": self.job.to_dict(), "compression": self.compression.as_dict(), "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, **ppl, "eval_seconds": list(self.eval_seconds),
                "quantization": self.quantization.as_dict() if self.quantization else None}

    def table(self) -> tuple:
        """(title, header, rows, caption) for ``report.print_table``."""
        job, s = self.job, self.compression.summary
        rows = [["parameters (model)", fmt_count(s.model_params_before), fmt_count(s.model_params_after)],
                ["parameters (targeted matrices)", fmt_count(s.targeted_dense_params), fmt_count(s.targeted_params)],
                [f"file size (model.safetensors, {job.dtype})", fmt_bytes(self.bytes_before),
                 fmt_bytes(self.bytes_after) if job.out else "not saved"],
                ["compression wall time", "", f"{self.compression.seconds:.1f} s"]]
        rows += allocation_rows(self.compression.fit)
        rows += quantization_rows(self.quantization)
        healed = self.compression.fit.get("heal")
        if healed and healed["losses"]:
            on = f" on {healed['sequences']} sequences" if "sequences" in healed else ""
            rows.append([f"healing loss (first and last of {len(healed['losses'])} steps{on}, "
                         f"{healed['seconds']:.0f} s)", f"{healed['losses'][0]:.4f}", f"{healed['losses'][-1]:.4f}"])
        ppl = _ppl_rows(job, self.perplexity_before, self.perplexity_after, self.eval_seconds)
        if ppl:
            rows = [ppl[0], *rows, ppl[1]]
        config = job.method
        title = (f"{job.model}: {config.method} at ratio {config.ratio}"
                 + (" (global allocation)" if getattr(config, "allocation", "uniform") == "global" else ""))
        types = self.compression.fit.get("types")  # a byte-budget allocation also counts the matrices it kept dense
        targeted = sum(t["matrices"] for t in types.values()) if types else s.factor_modules
        caption = (f"Removed {s.ratio_targeted:.1%} of the parameters of the {targeted} targeted matrices, "
                   f"{s.ratio_model:.1%} of the model (parameters counted; "
                   + (f"{s.ratio_targeted_storage:.1%} counting the {fmt_bytes(s.targeted_index_bits // 8)} of "
                      "support masks)." if s.targeted_index_bits else "low-rank factors store no indices).")
                   + (f" Saved to {job.out}." if job.out else ""))
        return title, ["", "before", "after"], rows, caption


def quantization_rows(report: QuantizationReport | None) -> list[list[str]]:
    """Rows of a quantization for a job's table: the stored bytes of the whole model and what fell back."""
    if report is None:
        return []
    scheme = report.scheme + (f", groups of {report.group_size}" if report.group_size else "")
    rows = [[f"stored bytes of the model (weights; {scheme} after)", fmt_bytes(report.bytes_before),
             fmt_bytes(report.bytes_after)],
            ["matrices quantized", "", str(len(report.tensors))]]
    if report.by_columns:
        rows.append(["int4 matrices grouped down their columns (rows not a multiple of the group)", "",
                     str(len(report.by_columns))])
    if report.int8_fallback:
        rows.append(["int4 matrices kept at int8 (no dimension a multiple of the group)", "",
                     str(len(report.int8_fallback))])
    return rows


def _ppl_rows(job, before: PerplexityResult | None, after: PerplexityResult | None,
              seconds: tuple[float, float]) -> tuple[list[str], list[str]] | None:
    """The perplexity row (first) and the evaluation-time row (last) of a job that measured before and after."""
    if after is None:
        return None
    return ([f"perplexity ({job.eval}, {after.tokens} tokens)", fmt_ppl(before.perplexity) if before else "",
             fmt_ppl(after.perplexity)],
            ["evaluation wall time", f"{seconds[0]:.1f} s", f"{seconds[1]:.1f} s"])


@dataclass
class QuantizeJobReport:
    job: QuantizeJob
    quantization: QuantizationReport
    bytes_before: int  # the weights as save() would have written them before
    bytes_after: int  # the folder written (0 without --out)
    perplexity_before: PerplexityResult | None = None
    perplexity_after: PerplexityResult | None = None
    eval_seconds: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict:
        ppl = {k: (getattr(self, k).as_dict() if getattr(self, k) is not None else None)
               for k in ("perplexity_before", "perplexity_after")}
        return {"job": self.job.to_dict(), "quantization": self.quantization.as_dict(),
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, **ppl,
                "eval_seconds": list(self.eval_seconds)}

    def table(self) -> tuple:
        job, q = self.job, self.quantization
        rows = quantization_rows(q)
        rows.append(["folder size", "", fmt_bytes(self.bytes_after) if job.out else "not saved"])
        rows.append(["quantization wall time", "", f"{q.seconds:.1f} s"])
        ppl = _ppl_rows(job, self.perplexity_before, self.perplexity_after, self.eval_seconds)
        if ppl:
            rows = [ppl[0], *rows, ppl[1]]
        caption = (f"Quantized {len(q.tensors)} weight matrices with torchao ({q.scheme}); embeddings, norms and "
                   "biases kept." + (f" Saved to {job.out}." if job.out else ""))
        return f"{job.model}: {q.scheme} weights", ["", "before", "after"], rows, caption


@dataclass
class EvalReport:
    job: EvalJob
    perplexity: PerplexityResult | None  # None when no text was measured
    summary: CompressionSummary
    compression: dict | None  # the record of a compressed model, else None
    seconds: float  # measuring perplexity
    zero_shot: ZeroShotResult | None = None

    def as_dict(self) -> dict:
        return {"job": self.job.to_dict(), "perplexity": self.perplexity.as_dict() if self.perplexity else None,
                "summary": self.summary.as_dict(), "compression": self.compression, "seconds": self.seconds,
                "zero_shot": self.zero_shot.as_dict() if self.zero_shot else None}

    def tables(self) -> list[tuple]:
        """The model (and perplexity) table, then the zero-shot table; each for ``report.print_table``."""
        r, c = self.perplexity, self.compression
        rows = [["dtype", self.job.dtype],
                ["parameters", fmt_count(self.summary.model_params_after)],
                ["compression", f"{c['method']}, {self.summary.ratio_targeted:.1%} of targeted parameters removed"
                 if c else "none"]]
        if r is not None:
            rows = [["perplexity", fmt_ppl(r.perplexity)],
                    ["tokens counted", f"{r.tokens} ({r.chunks} chunks of {r.seq_len})"],
                    *rows, ["wall time", f"{self.seconds:.1f} s"]]
        title = f"{self.job.model} on {self.job.perplexity_text}" if r is not None else self.job.model
        return [(title, ["", "value"], rows, None)] + ([self.zero_shot.table()] if self.zero_shot else [])

    def table(self) -> tuple:
        return self.tables()[0]


def _run_compress(job: CompressJob, progress: bool, loaded: tuple | None) -> CompressJobReport:
    """Under torchrun every process runs the job (the methods divide their independent solves, see
    ``parallel``) and rank 0 alone writes ``out``."""
    from . import parallel
    from .models.files import check_writable_target

    if job.out is not None:
        check_writable_target(job.out, job.overwrite, protect=job.model)  # fail before any long work
    team = parallel.current()
    failed = True
    try:
        report = _compress_job(job, progress, loaded, write=team.rank == 0)
        report.rank = team.rank
        failed = False
    finally:
        if team.world > 1:
            parallel.leave(failed)
    return report


def _offloaded_model(job: CompressJob, loaded: tuple | None, workdir: Path):
    """The model of ``job.model`` with its blocks on disk (models.offload), and its tokenizer."""
    from .models.hub import BUILTIN_MODELS, builtin_path
    from .models.offload import load_offloaded

    if loaded is not None:
        raise FactorkitError("offload reads the model from disk; call run() without model= or drop offload.")
    folder = builtin_path(job.model) if job.model in BUILTIN_MODELS else Path(job.model).expanduser()
    if not (folder / "config.json").is_file() or is_factorkit_dir(folder):
        raise FactorkitError(f"--offload reads a Hugging Face folder of safetensors weights or a built-in name, and "
                             f"{job.model} is not one; drop --offload or convert the model.")
    import transformers

    model = load_offloaded(folder, parse_dtype(job.dtype), workdir)
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def _compress_job(job: CompressJob, progress: bool, loaded: tuple | None, write: bool) -> CompressJobReport:
    if not job.offload:
        return _compress_loaded(job, progress, loaded, write)
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix=".factorkit-offload-", dir=Path(job.out).expanduser().resolve().parent))
    try:
        return _compress_loaded(job, progress, _offloaded_model(job, loaded, workdir), write)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _compress_loaded(job: CompressJob, progress: bool, loaded: tuple | None, write: bool) -> CompressJobReport:
    from .data import calibration_tokens, eval_tokens
    from .models.files import folder_size

    model, tokenizer = loaded if loaded is not None else _load_with_tokenizer(job.model, job.dtype)
    config = job.method
    data = train_data = None
    if config.wants_data():
        data = calibration_tokens(tokenizer, job.calib, job.calib_samples, job.calib_seq_len, job.seed)
    train_samples = job.train_samples if job.train_samples is not None else config.training_sequences()
    if train_samples:
        train_data = calibration_tokens(tokenizer, job.calib, train_samples, job.calib_seq_len, job.seed)
    chunks = eval_tokens(tokenizer, job.eval, job.seq_len, job.max_chunks, job.seed) if job.eval else None
    for ids in (data, train_data, chunks):
        if ids is not None:
            check_token_ids(model, ids, _tokenizer_fix(loaded))
    bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights appear once
    before = after = None
    times = [0.0, 0.0]
    if chunks is not None and job.eval_before:
        t = time.perf_counter()
        before = perplexity(model, chunks, progress=progress, desc="perplexity (dense)",
                            nonfinite_hint="try --dtype float32 or check the model's weights")
        times[0] = time.perf_counter() - t
    compression = compress(model, config, data, train_data=train_data, progress=progress)
    quantized = quantize(model, job.quantize, job.group_size, job.quantize_head) if job.quantize else None
    if chunks is not None:  # measured before saving: a broken model is never written
        t = time.perf_counter()
        after = perplexity(model, chunks, progress=progress, desc="perplexity (compressed)",
                           nonfinite_hint="try --dtype float32 or a smaller --ratio")
        times[1] = time.perf_counter() - t
    bytes_after = 0
    if job.out is not None and write:
        save(model, job.out, tokenizer=tokenizer, overwrite=job.overwrite, report=compression, protect=job.model)
        bytes_after = folder_size(job.out)
    return CompressJobReport(job, compression, bytes_before, bytes_after, before, after, tuple(times), quantized)


def _run_quantize(job: QuantizeJob, progress: bool, loaded: tuple | None) -> QuantizeJobReport:
    from .data import eval_tokens
    from .models.files import check_writable_target, folder_size

    if job.out is not None:
        check_writable_target(job.out, job.overwrite, protect=job.model)
    model, tokenizer = loaded if loaded is not None else _load_with_tokenizer(job.model, job.dtype)
    if quantization_record(model) is not None:
        raise FactorkitError(f"{job.model} is quantized already; quantize the float model.")
    chunks = eval_tokens(tokenizer, job.eval, job.seq_len, job.max_chunks, job.seed) if job.eval else None
    if chunks is not None:
        check_token_ids(model, chunks, _tokenizer_fix(loaded))
    bytes_before = stored_bytes(model)
    times, before, after = [0.0, 0.0], None, None
    if chunks is not None:
        t = time.perf_counter()
        before = perplexity(model, chunks, progress=progress, desc="perplexity (float)")
        times[0] = time.perf_counter() - t
    report = quantize(model, job.quantize, job.group_size, job.quantize_head)
    if chunks is not None:
        t = time.perf_counter()
        after = perplexity(model, chunks, progress=progress, desc=f"perplexity ({job.quantize})",
                           nonfinite_hint="try int8 or --dtype float32")
        times[1] = time.perf_counter() - t
    bytes_after = 0
    if job.out is not None:
        save(model, job.out, tokenizer=tokenizer, overwrite=job.overwrite, protect=job.model)
        bytes_after = folder_size(job.out)
    return QuantizeJobReport(job, report, bytes_before, bytes_after, before, after, tuple(times))


def _run_eval(job: EvalJob, progress: bool, loaded: tuple | None) -> EvalReport:
    from .data import eval_tokens

    plan = check_tasks(job.tasks) if job.tasks else None  # before any model work
    model, tokenizer = loaded if loaded is not None else _load_with_tokenizer(job.model, job.dtype)
    text = job.perplexity_text
    chunks = eval_tokens(tokenizer, text, job.seq_len, job.max_chunks, job.seed) if text else None
    if chunks is not None:
        check_token_ids(model, chunks, _tokenizer_fix(loaded))
    suite = None
    if plan is not None:
        suite = zero_shot(model, tokenizer, plan, job.limit, job.batch_size, progress=progress)
    result, t = None, time.perf_counter()
    if chunks is not None:
        compressed = compression_record(model) is not None
        result = perplexity(model, chunks, progress=progress,
                            nonfinite_hint="try --dtype float32 or " + ("compress it with a smaller ratio" if compressed
                                                                        else "check the model's weights"))
    return EvalReport(job, result, summarize(model), compression_record(model), time.perf_counter() - t, suite)


def _run_speed(job: SpeedJob, progress: bool, loaded: tuple | None) -> SpeedReport:
    import logging

    from .eval import speed
    from .models import load as load_model
    from .models.hub import check_source

    for name in (job.model, *(job.compare or ())):  # every model exists before the first is timed
        check_source(name)
    dtype = parse_dtype(job.dtype)

    def reference(scheme: str | None = None):
        def make() -> nn.Module:
            model = (loaded[0] if scheme is None else copy.deepcopy(loaded[0])) if loaded is not None \
                else load_model(job.model, dtype)[0]
            config = getattr(model.config, "text_config", None) or model.config
            positions = getattr(config, "max_position_embeddings", None)
            if positions is not None and max(job.prefill) > positions:  # found on the first model, before timing
                raise FactorkitError(f"--prefill {max(job.prefill)} is longer than the {positions} positions "
                                     f"{job.model} supports; give shorter prompt lengths.")
            if scheme is not None:
                if quantization_record(model) is not None:
                    raise FactorkitError(f"{job.model} is quantized already; drop --quantize or measure the float "
                                         "model.")
                quantize(model, scheme, job.group_size, job.quantize_head)
            return model
        return make

    loaders = [(job.model, reference())]
    loaders += [(f"{job.model} {scheme}" + (f" (groups of {job.group_size})" if scheme == "int4" else "")
                 + (" + head" if job.quantize_head else ""),
                 reference(scheme)) for scheme in job.quantize or ()]
    loaders += [(name, lambda name=name: load_model(name, dtype)[0]) for name in job.compare or ()]
    log = logging.getLogger("factorkit.speed")
    rows = speed.compare(loaders, progress=(lambda label: log.info("measured %s", label)) if progress else None,
                         new_tokens=job.new_tokens, batch_sizes=job.batch_sizes, prefill=job.prefill,
                         repeats=job.repeats)
    return SpeedReport(job, speed.SpeedResult(rows, job.new_tokens, job.batch_sizes, job.prefill, job.repeats))


@dataclass
class PretrainJob(Config):
    """Pretrain a small LLaMA from scratch with full-rank, low-rank or SLTrain weights (data parallel under
    torchrun) and save it with its tokenizer to ``out`` (``workflows.pretrain``)."""

    config: PretrainConfig = nested(PretrainConfig, "the pretraining settings")
    memory: bool = option(False, "also measure the peak tensor memory of one training step (profiler on CPU; "
                                 "slower start)")
    out: str | None = _out()
    overwrite: bool = _overwrite()


@dataclass
class FinetuneJob(Config):
    """Fine-tune a causal LM with a WaRA or LoRA adapter (or fully) on a text and save the adapter (or the
    model, for full) to ``out`` (``workflows.finetune``)."""

    config: FinetuneConfig = nested(FinetuneConfig, "the fine-tuning settings")
    out: str | None = _out()
    overwrite: bool = _overwrite()


@dataclass
class TrainJobReport:
    job: PretrainJob | FinetuneJob
    result: PretrainResult | FinetuneResult
    saved: bool  # False on the processes of a torchrun job that do not write

    def as_dict(self) -> dict:
        return {"job": self.job.to_dict(), "result": self.result.summary(), "saved": self.saved}

    def table(self) -> tuple:
        r, c = self.result, self.job.config
        saved = f" Saved to {self.job.out}." if self.saved else ""
        if isinstance(r, FinetuneResult):
            rows = [["held-out perplexity", fmt_ppl(r.perplexity_before), fmt_ppl(r.perplexity_after)],
                    ["trainable parameters", "", f"{fmt_count(r.trainable)} of {fmt_count(r.total)}"],
                    ["training wall time", "", f"{r.seconds:.1f} s ({r.seconds / max(1, r.steps_run):.2f} s/step)"]]
            adapter = c.adapter if c.adapter == "full" else f"{c.adapter} (r={c.r})"
            return (f"finetune {c.model} with {adapter} on {c.text}", ["", "before", "after"], rows,
                    saved or None)
        last, info = (r.evals[-1] if r.evals else {}), r.params
        rows = [["held-out perplexity", fmt_ppl(last["perplexity"]) if last else "not evaluated"],
                ["final training loss", f"{r.losses[-1]:.4f}" if r.losses else "no step run"],
                ["parameters (total / in the blocks)",
                 f"{fmt_count(info['params_total'])} / {fmt_count(info['params_blocks'])}"],
                ["trainable parameters", fmt_count(info["params_trainable"])],
                ["training tokens (this call)",
                 f"{r.tokens} in {r.seconds:.1f} s ({r.tokens / max(r.seconds, 1e-9):.0f} tokens/s)"]]
        if "optimizer_state_bytes" in info:
            rows += [["AdamW state", fmt_bytes(info["optimizer_state_bytes"])],
                     ["peak tensor memory of a step", fmt_bytes(info["peak_step_bytes"])]]
        return f"pretrain {c.model} ({c.param}) on {c.text}", ["", "value"], rows, saved or None


def _run_pretrain(job: PretrainJob, progress: bool, loaded: None) -> TrainJobReport:
    import torch.distributed as tdist

    from .models import save as save_model
    from .models.files import check_writable_target

    if job.out is not None:
        check_writable_target(job.out, job.overwrite)
    failed = True
    try:
        result = pretrain(job.config, progress=progress, measure_memory=job.memory)
        rank = tdist.get_rank() if tdist.is_initialized() else 0
        if rank == 0 and job.out is not None:  # only rank 0 writes
            save_model(result.model, job.out, tokenizer=result.tokenizer, overwrite=job.overwrite)
        failed = False
    finally:
        leave_distributed(failed)
    return TrainJobReport(job, result, rank == 0 and job.out is not None)


def _run_finetune(job: FinetuneJob, progress: bool, loaded: tuple | None) -> TrainJobReport:
    from .models.files import check_writable_target

    if job.out is not None:
        check_writable_target(job.out, job.overwrite, protect=job.config.model)
    model, tokenizer = loaded if loaded is not None else (None, None)
    result = finetune(job.config, progress=progress, model=model, tokenizer=tokenizer)
    if job.out is not None:
        save_finetuned(result, job.config, job.out, job.overwrite)
    return TrainJobReport(job, result, job.out is not None)


def resume_folder(job: Config) -> str | None:
    """Where a job keeps what an interrupted run resumes from (None: nowhere)."""
    inner = getattr(job, "method", None) or getattr(job, "config", None)
    train = getattr(inner, "train", None)
    return getattr(train, "checkpoint_dir", None) or getattr(inner, "checkpoint_dir", None)


_RUNNERS = {CompressJob: _run_compress, QuantizeJob: _run_quantize, EvalJob: _run_eval, SpeedJob: _run_speed,
            PretrainJob: _run_pretrain, FinetuneJob: _run_finetune}


def run(job: CompressJob | QuantizeJob | EvalJob | SpeedJob | PretrainJob | FinetuneJob, *, progress: bool = True,
        model: tuple[nn.Module, Any] | None = None):
    """Do a whole job, as the command line does; returns its typed report.

    ``model``: a (model, tokenizer) already in memory to use instead of
    loading ``job.model`` (a compress job changes it in place: pass a copy to
    keep the original), e.g. for a sweep over many settings of one model."""
    runner = _RUNNERS.get(type(job))
    if runner is None:
        raise FactorkitError("run() takes a CompressJob, QuantizeJob, EvalJob, SpeedJob, PretrainJob or FinetuneJob, "
                             f"got {type(job).__name__}.")
    if model is not None and runner is _run_pretrain:
        raise FactorkitError("a pretraining job builds its own model; call run() without model=.")
    return runner(job, progress, model)

__all__ = ["CompressJob", "CompressJobReport", "CompressionReport", "CompressionSummary", "EvalJob", "EvalReport",
           "FinetuneJob", "PretrainJob", "QuantizationReport", "QuantizeJob", "QuantizeJobReport", "SpeedJob",
           "SpeedReport", "TrainJobReport", "compress", "compression_record", "load", "quantize", "run", "save",
           "stored_bytes", "summarize"]
