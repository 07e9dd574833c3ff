"""Saving and loading compressed models.

A saved folder looks like a Hugging Face model folder (config.json, tokenizer
files, model.safetensors) plus ``factorkit.json``, which names every factor
module and the constructor arguments that rebuild it. When the model holds
factor modules, config.json is that of a custom-code model (``factorkit_model.py``,
copied beside it): plain transformers refuses the folder, and with
``trust_remote_code=True`` hands it to factorkit. The architecture's own config
is kept under ``factorkit_base_config``. A model without factor modules is
saved as a plain Hugging Face folder.

Loading checks everything it can before it allocates: factorkit.json and
config.json parse, the safetensors header (not the data) is read, and the
model is first built on the meta device, where the shape and dtype of every
tensor it expects is compared with the header. An edited number therefore
fails in milliseconds instead of allocating terabytes. Only then is the model
built for real and filled with strict key checking.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from .. import __version__, quantization
from ..errors import FactorkitError
from ..factors import FACTOR_TYPES, factor_modules
from ..surgery import replace_module
from . import factorkit_model, offload
from .files import FACTORKIT_JSON, atomic_dir, first_sentence, read_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
REMOTE_CODE = "factorkit_model.py"
FORMAT_VERSION = 2  # 2: torchao quantized tensors (factorkit.json "quantization"); a folder without them is 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# safetensors' dtype names -> torch
FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
# the Auto class each kind of head is loaded through, by the suffix of its class name
AUTO_CLASSES = {"ForCausalLM": "AutoModelForCausalLM", "LMHeadModel": "AutoModelForCausalLM",
                "ForSequenceClassification": "AutoModelForSequenceClassification"}
# spec entries that are sizes: whole numbers of at least 1
SIZES = ("in_features", "out_features", "rank", "atoms", "sparsity", "blocks")


def parse_dtype(dtype: Any) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16"); None stays None."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise FactorkitError(f"dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}.")


def is_factorkit_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / FACTORKIT_JSON).is_file()


def save(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False, *,
         compression: dict | None = None, protect: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (compressed, quantized or not) to the folder ``path``, atomically.

    ``compression``: how the model was compressed (JSON-able, kept in factorkit.json);
    ``protect``: the input model's path, which the folder may neither be nor hold.
    A quantized model (``factorkit.quantize``) is stored through torchao's flattening
    (its integer numbers, scales and zero points, int4 packed two per byte) and always
    as a custom-code folder: plain transformers would fill its quantized layers at random."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_diff_dict"):
        raise FactorkitError("only Hugging Face transformers models can be saved; this model has no .config.")
    architecture = type(model).__name__
    quantized = quantization.quantization_record(model)
    manifest = {
        "format_version": FORMAT_VERSION if quantized else 1,
        "factorkit_version": __version__,
        "architecture": architecture,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "compression": compression,
        "modules": {name: {"type": m.factor_type, **m.spec()} for name, m in factor_modules(model)},
        "tied": _tied_factor_parameters(model),
    }
    if quantized:
        manifest["quantization"] = quantized
    hf_config = {**config.to_diff_dict(), "architectures": [architecture]}
    if manifest["modules"] or quantized:
        hf_config = _remote_code_config(hf_config, architecture)
    # serialized before the folder is started: what cannot be written fails first
    config_text, manifest_text = json.dumps(hf_config, indent=2, sort_keys=True), json.dumps(manifest, indent=2)
    with atomic_dir(path, overwrite, protect=protect) as tmp:
        if manifest["modules"] or quantized:
            shutil.copyfile(factorkit_model.__file__, tmp / REMOTE_CODE)
        (tmp / CONFIG).write_text(config_text + "\n")
        offloaded = offload.store(model)
        if offloaded is not None:  # blocks on disk: streamed tensor by tensor
            offloaded.write_weights(tmp / WEIGHTS, metadata={"format": "pt"})
        elif quantized:
            _save_quantized(model, tmp / WEIGHTS)
        else:
            save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / FACTORKIT_JSON).write_text(manifest_text)
    return Path(path)


def _save_quantized(model: nn.Module, file: Path) -> None:
    """model.safetensors of a quantized model: plain tensors as they are, each tied tensor once, and the
    quantized ones flattened by torchao (metadata in the safetensors header, JSON)."""
    plain, quantized, seen = {}, {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        q = quantization.is_quantized(tensor)
        key = id(tensor) if q else (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            if q:
                quantized[name] = tensor.detach()
            else:
                plain[name] = tensor.detach().contiguous()
    data, metadata = quantization.flatten(quantized)
    save_file({**plain, **data}, str(file), metadata={**metadata, "format": "pt"})


def _remote_code_config(base: dict, architecture: str) -> dict:
    """config.json of a folder with factor modules: transformers must run factorkit_model.py to load it."""
    auto = next((a for suffix, a in AUTO_CLASSES.items() if architecture.endswith(suffix)), "AutoModel")
    module = REMOTE_CODE.removesuffix(".py")
    return {"model_type": factorkit_model.FactorkitConfig.model_type,
            "architectures": [factorkit_model.FactorkitModel.__name__],
            "auto_map": {"AutoConfig": f"{module}.{factorkit_model.FactorkitConfig.__name__}",
                         auto: f"{module}.{factorkit_model.FactorkitModel.__name__}"},
            "factorkit_base_config": base}


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
        shared, own = model.get_parameter(owner), model.get_parameter(name)
        if shared.shape != own.shape:  # a shared dictionary of another shape would load, and compute garbage
            raise ValueError(f"{name} {list(own.shape)} cannot share {owner} {list(shared.shape)}")
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, shared)


def _damaged(file: Path, problem: str) -> FactorkitError:
    return FactorkitError(f"{file} {problem}; the folder is damaged, save the model again.")


def _read_manifest(path: Path) -> dict:
    file = path / FACTORKIT_JSON
    manifest = read_json(file)
    for key, kind in {"format_version": int, "architecture": str, "dtype": str, "modules": dict,
                      "tied": dict}.items():
        if not isinstance(manifest.get(key), kind):
            raise _damaged(file, f"has no {kind.__name__} {key!r}")
    if not isinstance(manifest.get("compression"), (dict, type(None))):
        raise _damaged(file, "has a 'compression' record that is not an object")
    if manifest["format_version"] > FORMAT_VERSION:
        raise FactorkitError(f"{file} was written by a newer factorkit; upgrade factorkit to load it.")
    if manifest["dtype"] not in DTYPES:
        raise _damaged(file, f"names the dtype {manifest['dtype']!r}, not one of {', '.join(DTYPES)}")
    for name, spec in manifest["modules"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise _damaged(file, f"describes {name} without a factor type")
        if spec["type"] not in FACTOR_TYPES:
            raise FactorkitError(f"{file} uses factor type {spec['type']!r}, unknown to this factorkit; "
                                 "upgrade factorkit.")
        bad = [k for k in SIZES if k in spec and (type(spec[k]) is not int or spec[k] < 1)]
        if bad:
            raise _damaged(file, f"gives {name} the {bad[0]} {spec[bad[0]]!r}, not a whole number of at least 1")
        if "sparsity" in spec and "atoms" in spec and spec["sparsity"] > spec["atoms"]:
            raise _damaged(file, f"gives {name} more nonzeros per row (sparsity) than atoms")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["tied"].items()):
        raise _damaged(file, "has a 'tied' entry that is not a pair of parameter names")
    quant = manifest.get("quantization")
    if quant is not None:
        lists = ("tensors", "int8_fallback", "by_columns")
        if not (isinstance(quant, dict) and quant.get("scheme") in quantization.SCHEMES
                and all(isinstance(quant.get(k), list) and all(isinstance(n, str) for n in quant[k]) for k in lists)
                and (quant["scheme"] == "int8" or quant.get("group_size") in quantization.GROUP_SIZES)):
            raise _damaged(file, "has a 'quantization' record without a known scheme, group size and tensor names")
    return manifest


def read_compression(path: str | os.PathLike) -> dict | None:
    """How the model saved at ``path`` was compressed (what save() got as ``compression``)."""
    return _read_manifest(Path(path)).get("compression")


def _read_config(path: Path) -> transformers.PretrainedConfig:
    file = path / CONFIG
    config = read_json(file)
    if config.get("model_type") == factorkit_model.FactorkitConfig.model_type:
        config = config.get("factorkit_base_config")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in transformers.CONFIG_MAPPING:
        raise FactorkitError(f"{file} names the model type {model_type!r}, which this transformers version does not "
                             "know; upgrade transformers, or save the model again if the file is damaged.")
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise _damaged(file, f"is not a valid {model_type} config ({first_sentence(exc)})") from None


def _read_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from the safetensors header alone (the file
    is mapped, not read); safetensors checks that the offsets cover the file."""
    if not file.is_file():
        raise _damaged(file, "is missing")
    try:
        with safe_open(str(file), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(file, f"cannot be read ({first_sentence(exc)})") from None


def _build(path: Path, config: transformers.PretrainedConfig, manifest: dict, dtype: torch.dtype) -> nn.Module:
    """The saved architecture with empty factor modules (on the meta device inside ``torch.device("meta")``)."""
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, manifest["architecture"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FactorkitError(f"{path / FACTORKIT_JSON} names the architecture {manifest['architecture']!r}, which "
                             "this transformers version does not have; upgrade transformers or save the model again.")
    try:
        with no_init_weights():  # every value is overwritten from the safetensors file
            model = cls._from_config(config, dtype=dtype)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise _damaged(path / CONFIG, f"does not fit {cls.__name__} ({first_sentence(exc)})") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # no_init_weights skips the tying that init_weights does
    errors = (TypeError, ValueError, KeyError, AttributeError, RuntimeError, OverflowError)
    for name, spec in manifest["modules"].items():
        spec = dict(spec)
        try:
            replace_module(model, name, FACTOR_TYPES[spec.pop("type")].from_spec(spec, dtype=dtype))
        except errors as exc:
            raise _damaged(path / FACTORKIT_JSON, f"describes {name} with values that build no module "
                                                  f"({first_sentence(exc)})") from None
    try:
        _tie(model, manifest["tied"])
    except errors as exc:
        raise _damaged(path / FACTORKIT_JSON, f"has a 'tied' entry that does not fit the model "
                                              f"({first_sentence(exc)})") from None
    return model


def _int4_columns(quant: dict | None, expected: dict[str, torch.Tensor]) -> dict[str, int]:
    """The int4 tensors of a quantized folder and their number of columns (their numbers are packed)."""
    if not quant or quant["scheme"] != "int4":
        return {}
    fallback = set(quant["int8_fallback"])
    return {n: expected[n].shape[-1] for n in quant["tensors"] if n not in fallback and n in expected}


def _check_tensors(skeleton: nn.Module, header: dict[str, tuple[str, list[int]]], path: Path,
                   quant: dict | None = None) -> None:
    """Every tensor the model expects is in the file with its shape and a compatible
    dtype, and nothing else is. Tied tensors (embeddings and LM head, shared
    dictionaries) are stored once under any of their names. A quantized tensor is
    stored as torchao's parts (``{module}._{name}_qdata``, ``_scale``, ...): its
    integer numbers are checked here, the rest when torchao rebuilds it."""
    expected = skeleton.state_dict(keep_vars=True)
    file = path / WEIGHTS
    header = dict(header)
    if quant:
        int4 = _int4_columns(quant, expected)
        for name in quant["tensors"]:
            if name not in expected:
                raise _damaged(path / FACTORKIT_JSON, f"quantizes {name}, which the model does not have")
            want = list(expected[name].shape)
            if name in int4:
                want[-1] = -(-want[-1] // 2)
            prefix = quantization.part_prefix(name)
            got = header.get(prefix + "qdata")
            if got is None or list(got[1]) != want or got[0] != ("U8" if name in int4 else "I8"):
                raise _damaged(file, f"holds {name}'s quantized numbers as {got} but {FACTORKIT_JSON} describes "
                                     f"{'U8' if name in int4 else 'I8'} {want}")
            for key in [k for k in header if k.startswith(prefix)]:
                del header[key]
            tensor = expected[name]
            for alias in [k for k, t in expected.items() if t is tensor]:
                del expected[alias]
    names: dict[int, list[str]] = {}
    for key, tensor in expected.items():
        names.setdefault(id(tensor), []).append(key)
    missing = sorted(k for k, t in expected.items() if not any(n in header for n in names[id(t)]))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise _damaged(file, f"does not match {FACTORKIT_JSON} and {CONFIG} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    for key, (dtype, shape) in header.items():
        want = expected[key]
        stored = FILE_DTYPES.get(dtype)
        # a float tensor may be cast (some models keep a few in float32 whatever the model's dtype);
        # indices and masks may not
        fits = stored == want.dtype or (stored is not None and stored.is_floating_point and want.is_floating_point())
        if list(want.shape) != shape or not fits:
            raise _damaged(file, f"holds {key} as {dtype} {shape} but {FACTORKIT_JSON} and {CONFIG} describe "
                                 f"{str(want.dtype).removeprefix('torch.')} {list(want.shape)}")


def load_compressed(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`; logits match the saved model exactly."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    manifest = _read_manifest(path)
    config = _read_config(path)
    header = _read_header(path / WEIGHTS)
    saved = DTYPES[manifest["dtype"]]
    quant = manifest.get("quantization")
    if quant and dtype not in (None, saved):
        raise FactorkitError(f"{path} holds {quant['scheme']} weights quantized from {manifest['dtype']}; load it "
                             f"in {manifest['dtype']} (no dtype), or quantize the float model in the dtype you want.")
    with torch.device("meta"):
        _check_tensors(_build(path, config, manifest, saved), header, path, quant)
    # build in the wanted dtype and let load_state_dict cast: model.to(dtype) would
    # also cast buffers that transformers keeps in float32 (rotary tables)
    model = _build(path, config, manifest, dtype or saved)
    try:
        tensors = load_file(str(path / WEIGHTS))
        if quant:
            _load_quantized(model, path / WEIGHTS, tensors, quant)
        # the post-load hooks check what shapes cannot: a support mask with the wrong number of atoms per row
        model.load_state_dict(tensors, strict=False)
    except (SafetensorError, OSError, ValueError, RuntimeError, AssertionError, KeyError, TypeError) as exc:
        raise _damaged(path / WEIGHTS, f"holds values that do not fit the model ({first_sentence(exc)})") from None
    quantization.remember(model, quant)
    model.eval()
    return model


def _load_quantized(model: nn.Module, file: Path, tensors: dict[str, torch.Tensor], quant: dict) -> None:
    """Rebuild the quantized tensors of ``quant["tensors"]`` through torchao and put them in place (and in
    every module that shares them); their parts are taken out of ``tensors``."""
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata() or {}
    int4 = _int4_columns(quant, dict(model.state_dict(keep_vars=True)))
    prefixes = tuple(quantization.part_prefix(n) for n in quant["tensors"])
    parts = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefixes)]}
    rebuilt = quantization.unflatten(parts, metadata, int4)
    held = quantization.holders(model)  # the skeleton's ties: embeddings and head, shared dictionaries
    for name in quant["tensors"]:
        if name not in rebuilt:
            raise ValueError(f"the quantized parts of {name} are incomplete")
        quantization.put(held, model.get_parameter(name), rebuilt[name])
    quantization.route(model)
