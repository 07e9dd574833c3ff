"""Configs that describe themselves: help text, command-line exposure, checks
at construction, and a round trip through plain dicts.

Every settings dataclass of factorkit (method configs, the training loop,
pretraining, fine-tuning, the whole-job descriptions) derives from
:class:`Config` and declares its fields with :func:`option`:

    @dataclass
    class ASVDConfig(LowRankConfig):
        alpha: float = option(0.5, "exponent of the activation scale mean|x|^alpha",
                              check=finite)

- ``help`` is the one line the command line shows (the CLI is generated from
  these fields, so an option exists in exactly one place);
- ``check`` runs when the config is built (``__post_init__``): a config
  never exists with an invalid value, and nothing rewrites a field later;
- ``to_dict()`` / ``from_dict()`` round-trip the recorded fields, nested
  configs included, so ``factorkit.json`` rebuilds the config that made a model.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

from .errors import FactorkitError


class ConfigError(FactorkitError):
    """A setting outside what its field accepts. ``name`` is the field; the
    message is one sentence that starts with it, so the CLI can name the flag."""

    def __init__(self, name: str, problem: str) -> None:
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")


Check = Callable[[Any], "str | None"]  # None when the value is fine, else what is wrong (and the fix)


@dataclass(frozen=True)
class Above:
    """For ``option(when=("heal", Above(0)))``: the option means something only while
    that other field is above ``bound``."""

    bound: float

    def __contains__(self, value: Any) -> bool:
        return _number(value) and value > self.bound

    def __str__(self) -> str:
        return f"above {self.bound:g}"


def option(default: Any = MISSING, help: str = "", *, check: Check | None = None, choices: tuple | None = None,
           cli: bool = True, flag: str | None = None, record: bool = True, factory: Callable | None = None,
           prefix: str = "", hide: tuple[str, ...] = (), when: tuple[str, Any] | None = None) -> Any:
    """A config field with its help text and rules.

    check: returns None or the problem (see ``positive``, ``fraction`` ...).
    choices: the allowed values (checked, and listed by the CLI).
    cli: False keeps the field out of the command line (tensors, callbacks).
    flag: the option's name when it is not the field's (``density`` -> ``--delta``).
    record: False leaves the field out of ``to_dict`` (precomputed statistics,
        resume folders: how a run was done, not what it made).
    prefix: for a nested config, put before the nested options' names.
    hide: for a nested config, its options that mean nothing for this owner.
    when: (field, value): the option only means something when that other
        field has that value (one of a tuple of values, or a number
        ``Above(bound)``); the CLI refuses it otherwise.
    """
    metadata = {"help": help, "check": check, "choices": choices, "cli": cli, "flag": flag, "record": record,
                "prefix": prefix, "hide": hide, "when": when}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---- checks: each returns None or the problem, phrased to follow the field's name ----

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(minimum: int = 1) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"must be a whole number of at least {minimum}, got {value!r}."
        return None
    return check


def optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


positive_int = whole(1)


def finite(value: Any) -> str | None:
    return None if _number(value) and math.isfinite(value) else f"must be a finite number, got {value!r}."


def positive(value: Any) -> str | None:
    if _number(value) and math.isfinite(value) and value > 0:
        return None
    return f"must be a positive finite number, got {value!r}."


def non_negative(value: Any) -> str | None:
    if _number(value) and math.isfinite(value) and value >= 0:
        return None
    return f"must be a finite number of at least 0, got {value!r}."


def at_least(minimum: float) -> Check:
    def check(value: Any) -> str | None:
        if _number(value) and math.isfinite(value) and value >= minimum:
            return None
        return f"must be a finite number of at least {minimum}, got {value!r}."
    return check


def open_unit(value: Any) -> str | None:
    if _number(value) and 0.0 < value < 1.0:
        return None
    return f"must lie in (0, 1), got {value!r}."


def hint(check: Check, fix: str) -> Check:
    """``check`` with the fix appended to its problem."""
    def checked(value: Any) -> str | None:
        problem = check(value)
        return None if problem is None else f"{problem[:-1]}; {fix}."
    return checked


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[f.name]


def config_type(tp: Any) -> type | None:
    """The Config class a field holds (also through ``X | None``), or None."""
    for candidate in (tp, *typing.get_args(tp)):
        if isinstance(candidate, type) and issubclass(candidate, Config):
            return candidate
    return None


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def is_tuple(tp: Any) -> bool:
    return any(typing.get_origin(t) is tuple or t is tuple for t in (tp, *typing.get_args(tp)))


@dataclass
class Config:
    """Base of every settings dataclass (see the module's docstring)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            kind = hints[f.name]
            if isinstance(value, list) and is_tuple(kind):
                value = tuple(value)  # from JSON or a user's list
                setattr(self, f.name, value)
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f.name, f"must be True or False, got {value!r}.")
            sub = config_type(kind)
            if sub is not None and not isinstance(value, sub) and not (value is None and _optional(kind)):
                raise ConfigError(f.name, f"must be a {sub.__name__}, got {type(value).__name__}.")
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f.name, f"must be one of {', '.join(map(str, choices))}, got {value!r}.")
            check = f.metadata.get("check")
            problem = check(value) if check is not None else None
            if problem:
                raise ConfigError(f.name, problem)
        self.check()

    def check(self) -> None:
        """Rules that tie several fields together; raise ConfigError."""

    def validate(self) -> None:
        """Run the checks again (after fields were changed in place)."""
        self.__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """The recorded settings as JSON-ready values (nested configs as dicts)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.metadata.get("record", True):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Rebuild a config from ``to_dict``'s output; an unknown key is one clear error."""
        if not isinstance(values, dict):
            raise FactorkitError(f"{cls.__name__} needs a mapping of settings, got {type(values).__name__}.")
        known = {f.name: f for f in fields(cls) if f.init}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise FactorkitError(f"{cls.__name__} has no setting {unknown[0]!r}; its settings are "
                                 f"{', '.join(known)}.")
        kwargs = {}
        for name, value in values.items():
            nested = config_type(_field_type(cls, known[name]))
            kwargs[name] = nested.from_dict(value) if nested is not None and isinstance(value, dict) else value
        return cls(**kwargs)

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields the command line exposes, in declaration order."""
        return [f for f in fields(cls) if f.init and f.metadata.get("cli", True)]


def nested(cls: type[Config], help: str = "", prefix: str = "", hide: tuple[str, ...] = (),
           when: tuple[str, Any] | None = None, **defaults: Any) -> Any:
    """A field holding another config (``TrainConfig`` inside ``DSFormerConfig``);
    ``defaults`` change the nested config's defaults for this owner."""
    return option(help=help, prefix=prefix, hide=hide, when=when, factory=lambda: cls(**defaults))

