"""Saving and loading compressed models.

A saved folder looks like a Hugging Face model folder (config.json, tokenizer
files, model.safetensors) plus ``factorkit.json``, which names every factor
module and the constructor arguments that rebuild it. Loading builds the base
architecture from config.json, swaps in empty factor modules, then fills all
weights from the safetensors file with strict key checking.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_model
from torch import nn

from .. import __version__
from ..surgery import replace_module
from ..errors import FactorkitError
from ..factors import FACTOR_TYPES, factor_modules
from .files import atomic_dir

FACTORKIT_JSON = "factorkit.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def is_factorkit_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / FACTORKIT_JSON).is_file()


def save(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write ``model`` (compressed or not) to the folder ``path``, atomically."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        raise FactorkitError("only Hugging Face transformers models can be saved; this model has no .config.")
    manifest = {
        "format_version": FORMAT_VERSION,
        "factorkit_version": __version__,
        "architecture": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "compression": getattr(model, "factorkit_compression", None),
        "modules": {name: {"type": m.factor_type, **m.spec()} for name, m in factor_modules(model)},
        "tied": _tied_factor_parameters(model),
    }
    with atomic_dir(path, overwrite) as tmp:
        config.to_json_file(tmp / "config.json")
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / FACTORKIT_JSON).write_text(json.dumps(manifest, indent=2))
    return Path(path)


def _tied_factor_parameters(model: nn.Module) -> dict[str, str]:
    """Factor parameters that are the same tensor as an earlier one (a dictionary
    shared by a group of layers): {name: name of the first holder}. The file
    stores such a tensor once; loading ties the modules together again."""
    owners: dict[int, str] = {}
    tied: dict[str, str] = {}
    for module_name, module in factor_modules(model):
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}"
            if id(param) in owners:
                tied[full] = owners[id(param)]
            else:
                owners[id(param)] = full
    return tied


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    for name, owner in tied.items():
        module_name, _, attr = name.rpartition(".")
        owner_module, _, owner_attr = owner.rpartition(".")
        setattr(model.get_submodule(module_name), attr, getattr(model.get_submodule(owner_module), owner_attr))


def _empty_model(path: Path, architecture: str, dtype: torch.dtype) -> nn.Module:
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise FactorkitError(f"{path} was saved from {architecture}, which this transformers version does not have.")
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every value is overwritten from the safetensors file
        model = cls._from_config(config, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # no_init_weights skips the tying that init_weights does
    return model


def _load_weights(model: nn.Module, file: Path) -> tuple[list[str], list[str]]:
    """Fill ``model`` from a safetensors file. Tied tensors (embeddings and LM
    head) are stored once under either name, so a key counts as present when
    any name sharing its storage was loaded."""
    state = load_file(str(file))
    result = model.load_state_dict(state, strict=False)
    tensors = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for key, tensor in tensors.items():
        aliases.setdefault(tensor.data_ptr(), []).append(key)
    missing = [k for k in result.missing_keys if not any(a in state for a in aliases[tensors[k].data_ptr()])]
    return sorted(missing), sorted(result.unexpected_keys)


def load_compressed(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`; logits match the saved model exactly."""
    path = Path(path)
    manifest = json.loads((path / FACTORKIT_JSON).read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise FactorkitError(f"{path} was written by a newer factorkit; upgrade factorkit to load it.")
    # build in the wanted dtype and let load_state_dict cast: model.to(dtype) would
    # also cast buffers that transformers keeps in float32 (rotary tables)
    dtype = dtype or getattr(torch, manifest.get("dtype", "float32"))
    model = _empty_model(path, manifest["architecture"], dtype)
    for name, spec in manifest["modules"].items():
        spec = dict(spec)
        kind = spec.pop("type")
        if kind not in FACTOR_TYPES:
            raise FactorkitError(f"{path} uses factor type {kind!r}, unknown to this factorkit; upgrade factorkit.")
        replace_module(model, name, FACTOR_TYPES[kind].from_spec(spec, dtype=dtype))
    _tie(model, manifest.get("tied", {}))
    missing, unexpected = _load_weights(model, path / WEIGHTS)
    if missing or unexpected:
        raise FactorkitError(
            f"{path / WEIGHTS} does not match {FACTORKIT_JSON} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the folder is damaged, save the model again."
        )
    if manifest.get("compression") is not None:
        model.factorkit_compression = manifest["compression"]
    model.eval()
    return model
