"""Finished groups of blocks of a long compression, kept on disk so a rerun resumes.

A block-by-block compression (CoSpaDi takes tens of minutes on a CPU) calls
:meth:`FinishedGroups.store` after each group of blocks; an interrupted run
started again with the same folder, model, data and settings gets each
finished group back from :meth:`FinishedGroups.restore` instead of solving it
again, and ends with the same weights as an uninterrupted run: later blocks
are calibrated on the outputs of the restored ones, which are bit-identical.

The folder holds ``run.json`` (what the run is: method, settings, a hash of
the model's weights and of the calibration data), per finished group, a
safetensors file with the factor modules of its blocks and a json with their
specs and the method's report (the json is written last, so a group counts as
finished only once both files are complete), and ``<key>.info.json`` for what
the run decided before its first group (``methods.auto``: the allocation).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..surgery import replace_module
from ..errors import FactorkitError
from ..factors import FACTOR_TYPES, factor_modules
from .checkpoint import _tie, _tied_factor_parameters
from .files import atomic_file

RUN_JSON = "run.json"


def fingerprint(*parts: Any) -> str:
    """sha256 over tensors (their bytes), mappings, sequences and JSON-able values."""
    digest = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            for key in sorted(x):
                digest.update(str(key).encode())
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(b"[")
            for item in x:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(json.dumps(x, sort_keys=True, default=str).encode())

    for part in parts:
        feed(part)
    return digest.hexdigest()


class FinishedGroups:
    """The groups of blocks a run has finished, in ``folder``.

    ``run`` describes the run (JSON-able); a folder that holds another run's
    groups raises one clear error instead of mixing the two.
    """

    def __init__(self, folder: str | os.PathLike, run: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise FactorkitError(f"{self.folder} is a file, not a folder; choose a folder for the checkpoints.")
        self.folder.mkdir(parents=True, exist_ok=True)
        run = json.loads(json.dumps(dict(run), default=str))
        marker = self.folder / RUN_JSON
        if marker.exists():
            if json.loads(marker.read_text()) != run:
                raise FactorkitError(f"{self.folder} holds the finished blocks of another run (other model, data or "
                                     "settings); use a fresh checkpoint folder or delete it.")
        else:
            with atomic_file(marker) as tmp:
                tmp.write_text(json.dumps(run, indent=2))

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.safetensors", self.folder / f"{key}.json"

    def finished(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json") if p.with_suffix(".safetensors").exists())

    def store_info(self, key: str, info: Mapping[str, Any]) -> None:
        """Keep ``info`` (JSON-able) as ``key``: what a run decided before its first group (an allocation)."""
        with atomic_file(self.folder / f"{key}.info.json") as tmp:
            tmp.write_text(json.dumps(dict(info), default=float))

    def restore_info(self, key: str) -> dict | None:
        """What :meth:`store_info` kept as ``key``, or None."""
        path = self.folder / f"{key}.info.json"
        return json.loads(path.read_text()) if path.exists() else None

    def store(self, key: str, blocks: Iterable[nn.Module], info: Mapping[str, Any]) -> None:
        """Keep the factor modules of ``blocks`` (and the method's ``info``) as group ``key``."""
        container = nn.ModuleList(blocks)
        modules = dict(factor_modules(container))
        # every tensor stored on its own (a shared dictionary once per holder): simple and strict to reload
        state = {f"{name}.{k}": v.detach().cpu().clone().contiguous()
                 for name, m in modules.items() for k, v in m.state_dict().items()}
        manifest = {"modules": {name: {"type": m.factor_type, **m.spec()} for name, m in modules.items()},
                    "tied": _tied_factor_parameters(container), "info": dict(info)}
        weights, meta = self._paths(key)
        with atomic_file(weights) as tmp:
            save_file(state, str(tmp))
        with atomic_file(meta) as tmp:
            tmp.write_text(json.dumps(manifest, default=float))

    def restore(self, key: str, blocks: Iterable[nn.Module], dtype: torch.dtype) -> dict | None:
        """Put group ``key``'s factor modules back into ``blocks``; its info, or None if not finished."""
        weights, meta = self._paths(key)
        if not meta.exists():
            return None
        manifest = json.loads(meta.read_text())
        state = load_file(str(weights))
        container = nn.ModuleList(blocks)
        for name, spec in manifest["modules"].items():
            spec = dict(spec)
            old = container.get_submodule(name)
            device = next(old.parameters()).device
            module = FACTOR_TYPES[spec.pop("type")].from_spec(spec, dtype=dtype)
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            replace_module(container, name, module.to(device))
        _tie(container, manifest["tied"])
        return manifest["info"]
