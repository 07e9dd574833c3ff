"""What every compression method shares: its config base class and the registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ..surgery import find_blocks, target_linears
from ..config import Above, Config, ConfigError, hint, nested, open_unit, option, positive_int, whole
from ..errors import FactorkitError
from ..training import TrainConfig

log = logging.getLogger("factorkit")


@dataclass
class CompressionConfig(Config):
    """Settings common to every method (each field's help says what it is).

    Embeddings and the LM head are never targeted. Subclasses set ``method``
    (the registry name) and ``needs_data``; their fields validate when the
    config is built.
    """

    method: ClassVar[str]
    needs_data: ClassVar[bool] = True

    ratio: float = option(0.2, "fraction of the targeted parameters to remove, in (0, 1)",
                          check=hint(open_unit, "pass the fraction of parameters to remove, e.g. 0.2"))
    targets: tuple[str, ...] | None = option(
        None, "comma-separated Linear names to compress inside each block, e.g. q_proj,k_proj (default: all); "
              "a name matches itself or any *.name")
    batch_size: int = option(4, "calibration sequences run through a block at once", check=positive_int)
    heal: int = option(0, "steps of healing after compressing: the compressed model distilled from the dense one "
                          "on the calibration text, only the factors trained (0: none)", check=whole(0))
    heal_train: TrainConfig = nested(TrainConfig, "the healing run", prefix="heal-", hide=("steps",),
                                     when=("heal", Above(0)), distill=1.0, lr=5e-5, warmup=None)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) for t in self.targets)):
            raise ConfigError("targets", f"must be Linear names such as q_proj, got {self.targets!r}.")
        super().__post_init__()

    def uses_data(self) -> bool:
        """Whether the method itself needs calibration data with this config."""
        return self.needs_data

    def wants_data(self) -> bool:
        """Whether compress() needs calibration data: for the method, or to heal on."""
        return self.uses_data() or self.heal > 0

    def training_sequences(self) -> int:
        """Sequences the training inside compress() takes in all (steps x batch x accumulation): the
        healing's; 0 when nothing is trained. A method that trains its factors counts its own run."""
        return self.heal * self.heal_train.sequences_per_step

    def to_dict(self) -> dict:
        out = {"method": self.method, **super().to_dict()}
        if not self.heal:  # the healing run's settings mean nothing without it; its steps are ``heal``
            out.pop("heal_train", None)
        elif "heal_train" in out:
            out["heal_train"].pop("steps", None)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "CompressionConfig":
        """Rebuild the config a ``to_dict`` (or factorkit.json) describes; the
        ``method`` key picks the class when called on the base class."""
        if not isinstance(values, dict):
            raise FactorkitError(f"{cls.__name__} needs a mapping of settings, got {type(values).__name__}.")
        values = dict(values)
        name = values.pop("method", None)
        if cls is CompressionConfig or (name is not None and name != getattr(cls, "method", None)):
            if name is None:
                raise FactorkitError("the settings name no method; add \"method\": one of "
                                     f"{', '.join(sorted(METHODS))}.")
            cls = get_method(name).config_cls
        return Config.from_dict.__func__(cls, values)


def check_targets(model: nn.Module, config: CompressionConfig) -> list[str]:
    """Names (inside a block) of the Linears ``config.targets`` selects; one clear error if none."""
    _, blocks = find_blocks(model)
    names = list(target_linears(blocks[0], config.targets))
    unmatched = [t for t in config.targets or () if not target_linears(blocks[0], [t])]
    if not names or unmatched:  # a misspelt name is refused, never dropped
        available = ", ".join(target_linears(blocks[0])) or "none"
        raise FactorkitError(
            f"no Linear layer in the blocks matches targets {unmatched or list(config.targets or [])}; "
            f"the first block has: {available}."
        )
    return names


def warn_shift(where: str, shift: float, gram: torch.Tensor) -> None:
    """Log the diagonal shift a singular X^T X needed, and why when inputs were always zero (Gemma's
    RMSNorm scales by 1 + w, and its weights of -1 silence channels; those inputs never reach the layer)."""
    zero = int((gram.diagonal() == 0).sum())
    why = (f" ({zero} of its {gram.shape[0]} input channels {'was' if zero == 1 else 'were'} zero on every "
           "calibration token)") if zero else ""
    log.warning("%s: X^T X was not positive definite%s; shifted its diagonal by %.3g", where, why, shift)


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
