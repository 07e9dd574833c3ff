"""Compression of a model whose transformer blocks stay on disk (``factorkit compress --offload``).

The model is built with its blocks on the meta device (accelerate's ``init_empty_weights``); the rest
(embeddings, final norm, head) is read from the checkpoint into memory, for the calibration engine to embed
the calibration text; once it has (``release_rest``), those go back to the meta device too. The engine then
asks for one block at a time: ``materialize`` reads that block's tensors from the memory-mapped safetensors
file, ``release`` writes the compressed block to a work folder and puts it back on the meta device. Saving
then streams every tensor, one at a time, into model.safetensors (``write_weights``), the blocks from the work
folder and the rest from the checkpoint: the file is the one ``save`` writes for the same model in memory,
tensor for tensor. While blocks are compressed the process holds one block, its calibration inputs and
statistics, and no other weights (SmolLM2-135M: not the 113 MiB embedding; Gemma-3-270M: not its 671 MB).
"""

from __future__ import annotations

import json
import struct
import weakref
from pathlib import Path
from typing import Iterable

import torch
import transformers
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import FactorkitError
from ..surgery import find_blocks
from .files import atomic_file

_STORES: "weakref.WeakKeyDictionary[nn.Module, OffloadedBlocks]" = weakref.WeakKeyDictionary()

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class OffloadedBlocks:
    """The blocks of ``model`` (the ModuleList ``list_name``), on the meta device until needed."""

    def __init__(self, model: nn.Module, files: dict[str, Path], list_name: str, workdir: Path) -> None:
        self.model, self.files, self.list_name, self.workdir = model, files, list_name, Path(workdir)
        self.done: dict[int, Path] = {}
        self.rest: dict[str, str] = {}  # a released non-block tensor's name -> its name in the checkpoint
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _prefix(self, index: int) -> str:
        return f"{self.list_name}.{index}."

    def materialize(self, index: int, block: nn.Module) -> None:
        """Read block ``index``'s weights from the checkpoint (a released block: from the work folder)."""
        prefix = self._prefix(index)
        dtype = self.model.get_input_embeddings().weight.dtype
        names = [n for n, t in block.state_dict(keep_vars=True).items() if t.is_meta]
        if not names:
            return
        source = self.done.get(index)
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(source or self.files[prefix + name], []).append(name)
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in group:
                    tensor = f.get_tensor(name if source else prefix + name)
                    if tensor.is_floating_point() and not source:
                        if not bool(torch.isfinite(tensor).all()):
                            raise FactorkitError(f"the weight {prefix + name} holds NaN or infinite values; compress "
                                                 "a model with finite weights (check how it was saved or trained).")
                        tensor = tensor.to(dtype)
                    set_module_tensor_to_device(block, name, "cpu", value=tensor)

    def release(self, index: int, block: nn.Module) -> None:
        """Keep block ``index`` (compressed) in the work folder and free its memory."""
        state = {n: t.detach().contiguous() for n, t in block.state_dict(keep_vars=True).items() if not t.is_meta}
        if state:
            file = self.workdir / f"block-{index:05d}.safetensors"
            with atomic_file(file) as tmp:
                save_file(_unshared(state), str(tmp))
            self.done[index] = file
        for name, tensor in block.state_dict(keep_vars=True).items():
            if not tensor.is_meta:
                set_module_tensor_to_device(block, name, "meta")

    def release_rest(self) -> None:
        """Put the weights outside the blocks (embeddings, final norm, head) back on the meta device; saving reads
        them from the checkpoint again. Tied tensors stay tied."""
        head = self.list_name + "."
        groups: dict[int, list[str]] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if not name.startswith(head) and not tensor.is_meta:
                groups.setdefault(id(tensor), []).append(name)
        for names in groups.values():
            source = next((n for n in names if n in self.files), None)
            if source is None:  # made by the model, not read from the checkpoint: nothing to read it back from
                continue
            for name in names:
                self.rest[name] = source
                set_module_tensor_to_device(self.model, name, "meta")
        if self.rest:
            self.model.tie_weights()

    def write_weights(self, file: Path, metadata: dict[str, str] | None = None) -> None:
        """model.safetensors of the whole model, streamed tensor by tensor, as safetensors' save_model writes
        it: each tensor shared by several names stored once, under the first name in sorted order."""
        state = self.model.state_dict(keep_vars=True)
        groups: dict[int, list[str]] = {}
        for name, tensor in state.items():
            groups.setdefault(id(tensor), []).append(name)
        kept, meta = [], dict(metadata or {})
        for names in groups.values():
            keep = sorted(names)[0]
            kept.append(keep)
            meta.update({n: keep for n in sorted(names) if n != keep and n not in meta})
        entries, offset = {}, 0
        for name in sorted(kept, key=lambda n: (-_align(state[n].dtype), n)):
            tensor = state[name]
            size = tensor.numel() * tensor.element_size()
            entries[name] = {"dtype": _CODES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [offset, offset + size]}
            offset += size
        header = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with atomic_file(file) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            for name in entries:
                out.write(_bytes(self._tensor(name, state[name])))

    def _tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_meta:
            return tensor.detach()
        if name in self.rest:
            with safe_open(str(self.files[self.rest[name]]), framework="pt") as f:
                value = f.get_tensor(self.rest[name])
            return value.to(tensor.dtype) if value.is_floating_point() else value
        head = self.list_name + "."
        index, _, inner = name[len(head):].partition(".")
        with safe_open(str(self.done[int(index)]), framework="pt") as f:
            return f.get_tensor(inner)


def _align(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block's tensors for save_file: a tensor held under two names is stored under each (cloned)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def store(model: nn.Module) -> OffloadedBlocks | None:
    """The offloaded blocks of ``model``, or None for a model wholly in memory."""
    return _STORES.get(model)


def forget(model: nn.Module) -> None:
    _STORES.pop(model, None)


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a Hugging Face folder (one file or an index of shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FactorkitError(f"{folder} has no model.safetensors; --offload reads a Hugging Face folder of "
                             "safetensors weights (a built-in name or such a folder).")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_offloaded(folder: Path, dtype: torch.dtype, workdir: Path) -> nn.Module:
    """The model of the Hugging Face ``folder`` with its blocks on the meta device, everything else in
    memory, and its ``OffloadedBlocks`` registered (see ``store``)."""
    from accelerate import init_empty_weights

    from .hub import _model_class

    files = _checkpoint_files(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = _model_class(config)._from_config(config, dtype=dtype)
    model.eval()
    list_name, _ = find_blocks(model)
    state = model.state_dict(keep_vars=True)
    block_names = [n for n in state if n.startswith(list_name + ".")]
    missing = [n for n in block_names if n not in files]
    if missing:
        raise FactorkitError(f"{folder} names its tensors differently from the model transformers builds "
                             f"(no {missing[0]}); compress it without --offload.")
    rest = [n for n in state if not n.startswith(list_name + ".") and state[n].is_meta]
    for name in rest:
        if name in files:
            with safe_open(str(files[name]), framework="pt") as f:
                tensor = f.get_tensor(name)
            value = tensor.to(dtype) if tensor.is_floating_point() else tensor
            set_module_tensor_to_device(model, name, "cpu", value=value)
    model.tie_weights()
    still = [n for n, t in model.state_dict(keep_vars=True).items()
             if t.is_meta and not n.startswith(list_name + ".")]
    if still:
        raise FactorkitError(f"{folder} lacks {still[0]} outside the blocks; the folder is damaged, save or "
                             "download it again.")
    _STORES[model] = OffloadedBlocks(model, files, list_name, workdir)
    return model


def blocks_in_memory(model: nn.Module) -> Iterable[int]:
    """Indices of the blocks whose weights are in memory now (for tests and probes)."""
    _, blocks = find_blocks(model)
    return [i for i, b in enumerate(blocks) if not any(t.is_meta for t in b.state_dict().values())]
