"""Bad input as one line naming the key or file and what to do; the one place a config range is checked.

``setting`` and ``check_fields`` are the one place where a config value's allowed range is
written and checked: every config dataclass declares its fields with ``setting(...)`` and
calls ``check_fields`` in ``__post_init__``, so a value out of range fails with the same
one-line message whether it came from the command line, a YAML file or Python.
How each command reports them is in cli.py. Nothing here imports torch, Hydra or Lightning.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: exit status of a command stopped by bad input (a config value, a file, a checkpoint)
EXIT_BAD_INPUT = 2


class LabError(ValueError):
    """Bad input; the message is one line naming the config key or the file, and what to do."""


class ConfigError(LabError):
    """A config value that cannot work."""


class DataError(LabError):
    """Data that cannot be used: a missing, empty or one-class folder, an unusable cache."""


class CheckpointError(LabError):
    """A checkpoint that cannot be used."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message (what users see; the traceback goes to the log)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------- ranges


def setting(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    hint: str = "",
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with its default and its allowed values, checked by :func:`check_fields`.

    ``hint`` is said after the rule when a value breaks it ("1 = the paper's widths").
    """
    rule = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "hint": hint}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=rule)
    return dataclasses.field(default=default, metadata=rule)


def _type_name(kind: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _has_type(value: Any, kind: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, (str, os.PathLike))  # a Path from Python is as good as a string
    return not isinstance(kind, type) or isinstance(value, kind)


_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


def _rule_text(rule: Mapping[str, Any], kind: Any) -> str:
    """``one of 'a', 'b'``, ``an integer >= 1`` or ``a number in [0, 1)``."""
    if rule["choices"] is not None:
        return "one of " + ", ".join(
            str(choice).lower() if isinstance(choice, bool) else repr(choice) for choice in rule["choices"]
        )
    noun = "an integer" if kind is int else "a number"
    low = next(((key, rule[key]) for key in ("ge", "gt") if rule[key] is not None), None)
    high = next(((key, rule[key]) for key in ("le", "lt") if rule[key] is not None), None)
    if low and high:
        return f"{noun} in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    key, op, _ = next(bound for bound in _BOUNDS if rule[bound[0]] is not None)
    return f"{noun} {op} {rule[key]:g}"


def _breaks(value: Any, rule: Mapping[str, Any]) -> bool:
    if rule["choices"] is not None:
        return value not in rule["choices"]
    bounds = [(rule[key], compare) for key, _, compare in _BOUNDS if rule[key] is not None]
    if not bounds:
        return False
    if not _has_type(value, float) or math.isnan(value):
        return True
    return not all(compare(value, bound) for bound, compare in bounds)


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of a config dataclass against its type and ``setting`` rule; ConfigError names the key."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value, rule = getattr(obj, field.name), field.metadata
        kind = hints.get(field.name)
        if type(None) in typing.get_args(kind):  # Optional: None is allowed
            if value is None:
                continue
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        problem = ""
        if kind in (int, float, bool, str) and not _has_type(value, kind):
            problem = f"must be {_type_name(kind)}"
        elif rule and _breaks(value, rule):
            problem = f"must be {_rule_text(rule, kind)}"
        if problem:
            hint = f" ({rule['hint']})" if rule and rule.get("hint") else ""
            raise ConfigError(f"{prefix}{'.' if prefix else ''}{field.name}={value!r}: {problem}{hint}")


def from_mapping(cls: type[T], values: Mapping[str, Any] | T | None, prefix: str) -> T:
    """``cls(**values)`` for a config dataclass (a DictConfig works); an unknown key is a ConfigError naming it."""
    if values is None:
        return cls()
    if not isinstance(values, Mapping):  # already a cls
        return values
    known = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]} is not a setting: use {', '.join(sorted(known))}")
    return cls(**values)


# ----------------------------------------------------------------------------- reporting


def fail(message: str) -> typing.NoReturn:
    """Print ``error: message`` (one line) on stderr and exit with :data:`EXIT_BAD_INPUT`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
