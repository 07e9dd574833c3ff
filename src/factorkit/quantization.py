"""Weight-only quantization on top of a compressed (or dense) model, through torchao.

    report = factorkit.quantize(model, "int4", group_size=32)

What is quantized: every weight matrix inside the transformer blocks, whatever
form it has: the Linears left dense, and the factors of the factor modules
(``FactorModule.quantizable``: U and V of low rank, the dictionary and the
code values of a sparse dictionary). Biases, norms, embeddings and the LM head
stay at the model's dtype, as GPTQ, AWQ and most weight-only recipes keep
them; the support masks of sparse codes are bits already. ``head=True``
quantizes the LM head too (one scale per vocabulary row, as llama.cpp and
ExecuTorch do for small models, whose decoding the head's bytes bound), and
with it the input embeddings when the two are tied: the lookup reads the same
quantized rows, so the tie and the bytes saved are kept.

Schemes (round to nearest, symmetric, torchao's tensor subclasses):

- ``int8``: one scale per row (``Int8Tensor``, what ``Int8WeightOnlyConfig`` makes);
- ``int4``: one scale per ``group_size`` consecutive numbers of a row
  (``IntxUnpackedToInt8Tensor`` with int4 values, what ``IntxWeightOnlyConfig``
  makes: torchao's int4 layout that runs on any CPU). A factor whose rows do not
  split into groups (a rank or a number of nonzeros that is not a multiple of
  the group size) is grouped down its columns instead; one that fits neither
  way stays int8 per row, and the report lists it.

In memory torchao keeps an int4 number in a byte; the saved file packs two in a
byte, so what ``stored_bytes`` counts is what the file holds. Saved folders
record the scheme in factorkit.json and reload to identical logits.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn

from .errors import FactorkitError
from .factors import FactorModule
from .factors.base import embedding, is_quantized, linear
from .surgery import find_blocks

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
INSTALL = "pip install 'factorkit[quant]' (torchao)"


@dataclass
class QuantizationReport:
    """What one ``quantize`` call did: how many tensors took the scheme, which fell back to int8, and the
    bytes the model stores (``stored_bytes``) before and after."""

    scheme: str
    group_size: int | None
    tensors: list[str]  # parameter names quantized
    int8_fallback: list[str] = field(default_factory=list)  # int4 tensors kept at int8 (no group fits)
    by_columns: list[str] = field(default_factory=list)  # int4 tensors grouped down their columns
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    def record(self) -> dict:
        """What factorkit.json keeps (and what ``load`` needs to rebuild the tensors)."""
        return {"scheme": self.scheme, "group_size": self.group_size, "tensors": self.tensors,
                "int8_fallback": self.int8_fallback, "by_columns": self.by_columns}

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _quiet_torchao_import():
    # torchao's first import logs a warning per CUDA-only library it cannot load on a CPU machine, and torch
    # one per enum torchao registers; none concerns the CPU paths used here
    loggers = [logging.getLogger(n) for n in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def preload_torchao() -> None:
    """Import torchao (when installed) without its import-time warnings; transformers imports it too."""
    with _quiet_torchao_import(), contextlib.suppress(ImportError):
        import torchao.prototype.safetensors.safetensors_support  # noqa: F401  (what transformers imports)
        import torchao.quantization  # noqa: F401


def _torchao():
    try:
        with _quiet_torchao_import():
            from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor, MappingType, PerRow
    except ImportError:
        raise FactorkitError(f"quantization runs through torchao, which is not installed; {INSTALL}.") from None
    return Int8Tensor, IntxUnpackedToInt8Tensor, MappingType, PerRow


def holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) that holds it (tied embeddings, shared dictionaries)."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, tensor in module.named_parameters(recurse=False):
            found.setdefault(id(tensor), []).append((module, attr))
    return found


def _head(model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """The LM head's weight as (name, holder, attribute), named as the saved file names it: by its first
    name in the state dict (the input embeddings' when the two are tied)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return None
    name = next(k for k, t in model.state_dict(keep_vars=True).items() if t is head.weight)
    module_name, _, attr = name.rpartition(".")
    return name, model.get_submodule(module_name), attr


def quantizable(model: nn.Module, head: bool = False) -> Iterator[tuple[str, nn.Module, str]]:
    """(full parameter name, owner module, attribute) of every weight matrix quantize() changes, each
    shared tensor once (under its first holder); with ``head``, the LM head last."""
    list_name, blocks = find_blocks(model)
    if head:
        found = _head(model)
        if found is None:
            raise FactorkitError("this model has no nn.Linear LM head to quantize; drop the head option.")
    seen: set[int] = set()
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, FactorModule):
                names = module.quantizable
                if not names:
                    raise FactorkitError(f"{list_name}.{i}.{name} is a {module.factor_type} module, which quantize "
                                         "does not handle; quantize a model compressed by compress() (DSFormer "
                                         "exports its layers) or merge the adapters first.")
            elif type(module) is nn.Linear:
                names = ("weight",)
            else:
                continue
            for attr in names:
                tensor = getattr(module, attr)
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield f"{list_name}.{i}.{name}.{attr}", module, attr
    if head and id(getattr(found[1], found[2])) not in seen:
        yield found


def quantize_tensor(weight: torch.Tensor, scheme: str, group_size: int | None) -> tuple[torch.Tensor, str]:
    """(quantized tensor, how: "rows", "columns" or "int8") for one float matrix."""
    Int8Tensor, IntxTensor, MappingType, PerRow = _torchao()
    weight = weight.detach()
    rows, cols = weight.shape
    if scheme == "int4":
        block = (1, group_size) if cols % group_size == 0 else (group_size, 1) if rows % group_size == 0 else None
        if block is not None:
            q = IntxTensor.from_hp(weight, block, torch.int4, mapping_type=MappingType.SYMMETRIC)
            return q, "rows" if block[0] == 1 else "columns"
    return Int8Tensor.from_hp(weight, granularity=PerRow()), "rows" if scheme == "int8" else "int8"


def check_scheme(scheme: str, group_size: int | None) -> None:
    if scheme not in SCHEMES:
        raise FactorkitError(f"quantization scheme {scheme!r} is unknown; choose one of {', '.join(SCHEMES)}.")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise FactorkitError(f"int4 group size {group_size!r} is not supported; choose one of "
                             f"{', '.join(map(str, GROUP_SIZES))}.")


def quantize(model: nn.Module, scheme: str = "int8", group_size: int | None = 32, head: bool = False
             ) -> QuantizationReport:
    """Quantize the weight matrices of ``model``'s blocks in place, with ``head`` the LM head too (see the
    module docstring)."""
    check_scheme(scheme, group_size)
    _torchao()
    if quantization_record(model) is not None or any(is_quantized(p) for p in model.parameters()):
        raise FactorkitError("this model is already quantized; quantize the float model.")
    targets = list(quantizable(model, head))
    for name, module, attr in targets:
        tensor = getattr(module, attr)
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise FactorkitError(f"{name} is not a float matrix ({tensor.dtype} {list(tensor.shape)}); only weight "
                                 "matrices can be quantized.")
        if not bool(torch.isfinite(tensor).all()):
            raise FactorkitError(f"{name} holds NaN or infinite values; quantize a model with finite weights.")
    start = time.perf_counter()
    before = stored_bytes(model)
    report = QuantizationReport(scheme, group_size if scheme == "int4" else None, [])
    held = holders(model)
    for name, module, attr in targets:
        tensor = getattr(module, attr)
        q, how = quantize_tensor(tensor, scheme, group_size)
        put(held, tensor, q)
        report.tensors.append(name)
        if how == "int8":
            report.int8_fallback.append(name)
        elif how == "columns":
            report.by_columns.append(name)
    route(model)
    report.bytes_before, report.bytes_after = before, stored_bytes(model)
    report.seconds = time.perf_counter() - start
    _RECORDS[model] = report.record()
    return report


def put(held: dict[int, list[tuple[nn.Module, str]]], tensor: torch.Tensor, quantized: torch.Tensor) -> None:
    """``quantized`` in place of ``tensor`` in every module that holds it (``held``: from :func:`holders`)."""
    param = nn.Parameter(quantized, requires_grad=False)
    for owner, attr in held[id(tensor)]:
        setattr(owner, attr, param)


class QuantizedLinear(nn.Linear):
    """An nn.Linear whose weight quantize() replaced. Its forward goes through ``factors.base.linear``: a few
    tokens on the CPU run factorkit's compiled int8 kernel instead of torchao's convert-then-GEMM. quantize()
    and load() make the quantized Linears of a model this class in place, so their names, hooks and
    ``isinstance(module, nn.Linear)`` stay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class QuantizedEmbedding(nn.Embedding):
    """The lookup of an nn.Embedding (or of a subclass, which this class is put under: Gemma's scaled
    embeddings keep their scaling) whose weight quantize() replaced: ``factors.base.embedding`` reads
    just the rows asked for."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.max_norm is not None:  # renormalizes the table in place: torch's own path
            return super().forward(input)
        return embedding(input, self.weight)


_EMBEDDING_CLASSES: dict[type, type] = {nn.Embedding: QuantizedEmbedding}


def _quantized_embedding_class(cls: type) -> type:
    """``cls`` with QuantizedEmbedding's lookup under its own forward (one class per embedding class)."""
    if cls not in _EMBEDDING_CLASSES:
        _EMBEDDING_CLASSES[cls] = type(f"Quantized{cls.__name__}", (cls, QuantizedEmbedding), {})
    return _EMBEDDING_CLASSES[cls]


def route(model: nn.Module) -> None:
    """Make every nn.Linear of ``model`` that holds a quantized weight a QuantizedLinear, and every
    embedding a quantized lookup (in place)."""
    for module in model.modules():
        if type(module) is nn.Linear and is_quantized(module.weight):
            module.__class__ = QuantizedLinear
        elif (isinstance(module, nn.Embedding) and not isinstance(module, QuantizedEmbedding)
              and is_quantized(module.weight)):
            module.__class__ = _quantized_embedding_class(type(module))


def packed_int4(qdata: torch.Tensor) -> torch.Tensor:
    """int8 numbers in [-8, 7] (rows x cols) -> uint8 (rows x ceil(cols/2)), two per byte, low nibble first."""
    nibbles = (qdata.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpacked_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of :func:`packed_int4`."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)[..., :cols]
    return ((nibbles.to(torch.int16) ^ 8) - 8).to(torch.int8)  # sign-extend 4 bits


def _is_int4(tensor: torch.Tensor) -> bool:
    return getattr(tensor, "target_dtype", None) == torch.int4


def tensor_bytes(tensor: torch.Tensor, packed: bool = True) -> int:
    """Bytes a tensor takes in a saved file (an int4 tensor's numbers packed two per byte); with
    ``packed=False``, in memory (torchao keeps one int4 number per byte)."""
    if not is_quantized(tensor):
        return tensor.numel() * tensor.element_size()
    names = [*tensor.tensor_data_names, *getattr(tensor, "optional_tensor_data_names", ())]
    parts = [p for p in (getattr(tensor, n, None) for n in names) if p is not None]
    total = sum(p.numel() * p.element_size() for p in parts)
    if packed and _is_int4(tensor):
        rows, cols = tensor.qdata.shape
        total -= rows * cols - rows * -(-cols // 2)
    return total


def stored_bytes(model: nn.Module) -> int:
    """The bytes the model's saved weights hold: every parameter and persistent buffer once (tied and shared
    tensors once), quantized tensors at their stored width with their scales, support masks included."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = id(tensor) if is_quantized(tensor) else (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                                                        tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(tensor)
    return total


# How each model in memory was quantized (weakly held). save() writes it into factorkit.json; load() restores it.
_RECORDS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def quantization_record(model: nn.Module) -> dict | None:
    return _RECORDS.get(model)


def remember(model: nn.Module, record: dict | None) -> None:
    if record is not None:
        _RECORDS[model] = record


def flatten(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Quantized tensors -> (plain tensors for safetensors, string metadata), through torchao's own
    flattening (JSON attributes, allow-listed classes: nothing is unpickled); int4 numbers packed."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    data, metadata = flatten_tensor_state_dict(tensors)
    for name, tensor in tensors.items():
        if _is_int4(tensor):
            key = _part(name, "qdata")
            data[key] = packed_int4(data[key])
    return data, metadata


def unflatten(data: dict[str, torch.Tensor], metadata: dict[str, str], int4_cols: dict[str, int]
              ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten`; ``int4_cols``: the int4 parameters and their number of columns."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    data = dict(data)
    for name, cols in int4_cols.items():
        key = _part(name, "qdata")
        data[key] = unpacked_int4(data[key], cols)
    result, _ = unflatten_tensor_state_dict(data, metadata)
    return result


def _part(name: str, part: str) -> str:
    """torchao's flattened key of one component of the quantized parameter ``name``."""
    module, _, attr = name.rpartition(".")
    return f"{module}._{attr}_{part}"


def part_prefix(name: str) -> str:
    """The prefix of the keys a saved quantized parameter occupies in model.safetensors."""
    return _part(name, "")
