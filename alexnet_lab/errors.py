"""Bad input as one line naming the key or file and what to do; the one place a config range is checked.

``setting`` and ``check_fields`` are the one place where a config value's allowed range is
written and checked: every config dataclass declares its fields with ``setting(...)`` and
calls ``check_fields`` in ``__post_init__``, so a value out of range fails with the same
one-line message whether it came from the command line, a YAML file or Python.
How each command reports them is in cli.py. Nothing here imports torch, Hydra or Lightning.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import operator
import os
import sys
import types
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


def accepts(kind: Any, value: Any) -> bool:
    """Whether ``value`` has the type an annotation names: int, float, bool, str, Optional, Union, Literal, list, dict.

    What it cannot tell (a callable, a class of Lightning's) it accepts: that is checked where it is used.
    """
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args and not isinstance(value, bool)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, (str, os.PathLike))  # a Path from Python is as good as a string
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return isinstance(value, (list, tuple))
    if isinstance(origin or kind, type) and (origin or kind) is not object:
        return isinstance(value, origin or kind)
    return True


def type_text(kind: Any) -> str:
    """An annotation in words: ``an integer``, ``a string or an integer (or null)``, ``one of 32, '16-mixed'``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        literals = [value for arg in args if typing.get_origin(arg) is typing.Literal for value in typing.get_args(arg)]
        others = [arg for arg in args if arg is not type(None) and typing.get_origin(arg) is not typing.Literal]
        words = dict.fromkeys([type_text(typing.Literal[tuple(literals)])] if literals else [])
        words.update(dict.fromkeys(type_text(arg) for arg in others))
        return " or ".join(words) + (" (or null)" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    if (origin or kind) in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return "a list"
    return names.get(origin or kind, getattr(kind, "__name__", str(kind)))


_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


def _rule_text(rule: Mapping[str, Any], kind: Any) -> str:
    """``one of 'a', 'b'``, ``an integer >= 1`` or ``a number in [0, 1)``."""
    if rule.get("choices") is not None:
        return "one of " + ", ".join(
            str(choice).lower() if isinstance(choice, bool) else repr(choice) for choice in rule["choices"]
        )
    noun = "an integer" if int in (kind, *typing.get_args(kind)) else "a number"
    low = next(((key, rule[key]) for key in ("ge", "gt") if rule.get(key) is not None), None)
    high = next(((key, rule[key]) for key in ("le", "lt") if rule.get(key) is not None), None)
    if low and high:
        return f"{noun} in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    key, op, _ = next(bound for bound in _BOUNDS if rule.get(bound[0]) is not None)
    return f"{noun} {op} {rule[key]:g}"


def _breaks(value: Any, rule: Mapping[str, Any]) -> bool:
    if rule.get("choices") is not None:
        return value not in rule["choices"]
    bounds = [(rule[key], compare) for key, _, compare in _BOUNDS if rule.get(key) is not None]
    if not bounds:
        return False
    if not accepts(float, value) or math.isnan(value):
        return True
    return not all(compare(value, bound) for bound, compare in bounds)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_value(key: str, value: Any, kind: Any, rule: Mapping[str, Any] | None = None) -> None:
    """One config value against its type annotation and its ``setting`` rule; a ConfigError names the key."""
    problem = ""
    if not accepts(kind, value):
        problem = f"must be {type_text(kind)}"
    elif rule and value is not None and _breaks(value, rule):
        problem = f"must be {_rule_text(rule, kind)}"
    if problem:
        hint = f" ({rule['hint']})" if rule and rule.get("hint") else ""
        raise ConfigError(f"{key}={value!r}: {problem}{hint}")


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of a config dataclass against its type and ``setting`` rule; ConfigError names the key.

    The one place a config value's type and range are checked: Hydra composes the config
    untyped (cli.py), so that a wrong value fails here, inside the job, with one line, and a
    sweep's other jobs still run.
    """
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        check_value(_key(prefix, field.name), getattr(obj, field.name), hints[field.name], field.metadata)


def from_mapping(cls: type[T], values: Mapping[str, Any] | T | None, prefix: str) -> T:
    """``cls(**values)`` for a config dataclass, nested config dataclasses built the same way.

    ``values`` are plain data (a DictConfig works); each dataclass checks its own fields in
    ``__post_init__``. An unknown key is a ConfigError naming it.
    """
    if values is None:
        return cls()
    if not isinstance(values, Mapping):  # already a cls
        return values
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]  # T: any config dataclass (not expressible as a bound)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{_key(prefix, unknown[0])} is not a setting: use {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        nested = [kind for kind in (hints[key], *typing.get_args(hints[key])) if isinstance(kind, type)]
        schemas = [kind for kind in nested if dataclasses.is_dataclass(kind)]
        kwargs[key] = from_mapping(schemas[0], value, _key(prefix, key)) if schemas and value is not None else value
    return cls(**kwargs)


def defaults(schema: type[Any]) -> dict[str, Any]:
    """A config dataclass's defaults as plain data, without running its checks (``???`` stays unset)."""
    plain = {}
    for field in dataclasses.fields(schema):
        factory: Any = field.default_factory
        value: Any = field.default if factory is dataclasses.MISSING else factory()
        is_config = dataclasses.is_dataclass(value) and not isinstance(value, type)
        plain[field.name] = dataclasses.asdict(value) if is_config else value
    return plain


# ----------------------------------------------------------------------------- reporting


def fail(message: str, status: int = EXIT_BAD_INPUT) -> typing.NoReturn:
    """Print ``error: message`` (one line) on stderr and exit with ``status`` (bad input: :data:`EXIT_BAD_INPUT`)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
