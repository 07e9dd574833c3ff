"""What every compression method shares: its config base class and the registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import torch
from torch import nn

from ..surgery import find_blocks, target_linears
from ..errors import FactorkitError

log = logging.getLogger("factorkit")


@dataclass
class CompressionConfig:
    """Settings common to every method.

    ratio: fraction of the parameters of the targeted matrices to remove, in (0, 1).
    targets: names of the Linear layers to compress inside each block (a name
        matches itself or any ``*.name``); None means every Linear in the blocks.
        Embeddings and the LM head are never targeted.
    batch_size: calibration sequences run through a block at once.
    """

    method: ClassVar[str]
    needs_data: ClassVar[bool] = True

    ratio: float = 0.2
    targets: tuple[str, ...] | None = None
    batch_size: int = 4

    def validate(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) < 1.0:
            raise FactorkitError(
                f"ratio {self.ratio!r} is outside (0, 1); pass the fraction of parameters to remove, e.g. 0.2."
            )
        if self.batch_size < 1:
            raise FactorkitError(f"batch_size must be at least 1, got {self.batch_size}.")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)

    def uses_data(self) -> bool:
        """Whether compress() needs calibration data with this config."""
        return self.needs_data

    def record(self) -> dict:
        """The settings as JSON-ready values, for factorkit.json (fields marked
        ``metadata={"record": False}``, such as precomputed statistics, are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("record", True)}


def check_targets(model: nn.Module, config: CompressionConfig) -> list[str]:
    """Names (inside a block) of the Linears ``config.targets`` selects; one clear error if none."""
    _, blocks = find_blocks(model)
    names = list(target_linears(blocks[0], config.targets))
    if not names:
        available = ", ".join(target_linears(blocks[0])) or "none"
        raise FactorkitError(
            f"no Linear layer in the blocks matches targets {list(config.targets or [])}; "
            f"the first block has: {available}."
        )
    return names


MethodFn = Callable[[nn.Module, CompressionConfig, "torch.Tensor | None", bool], None]


@dataclass
class Method:
    name: str
    config_cls: type[CompressionConfig]
    fn: MethodFn
    summary: str


METHODS: dict[str, Method] = {}


def register(config_cls: type[CompressionConfig], summary: str) -> Callable[[MethodFn], MethodFn]:
    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[config_cls.method] = Method(config_cls.method, config_cls, fn, summary)
        return fn
    return wrap


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FactorkitError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}.") from None
