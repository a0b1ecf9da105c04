"""Turn parsed YAML into frozen, typed dataclasses, and back.

Configs are plain frozen dataclasses with type hints; this module checks every value
against its hint (no silent coercion except int -> float) so a typo in a config file
stops the run before any work starts, with the file, the dotted key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from typing import Any, Literal, Union

from gemmascope.errors import ConfigError, InvalidValue

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Stages hand config ints to NumPy, TensorStore and JAX, which hold them in 64 bits.
INT_LIMIT = 2**63

_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxdict = 3, 8, 6
_short.maxstring, _short.maxother, _short.maxlong = 1000, 60, 40


def show(value: Any) -> str:
    """A value as an error message quotes it: its repr, with long lists, mappings and numbers
    shortened so the message stays one readable line (strings, often paths, are kept whole up
    to 1,000 characters)."""
    return _short.repr(value)


def show_key(key: str) -> str:
    """A key as an error message names it: quoted when it is not a plain name (a newline, a space)."""
    return ".".join(part if _NAME.fullmatch(part) else repr(part) for part in key.split("."))


class _OutOfRange(ConfigError):
    """The value has the right type but no stage can use it (NaN, beyond 64 bits): reported
    as it is rather than as a type mismatch with every arm of a union."""


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _convert(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in typing.get_args(hint)):
            return value
        raise _type_error(source, key, value, hint)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _convert(arm, value, key, source)
            except _OutOfRange:
                raise
            except ConfigError:
                continue
        raise _type_error(source, key, value, hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _type_error(source, key, value, hint)
        (item,) = typing.get_args(hint)[:1]
        return tuple(_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if hint is type(None):
        if value is None:
            return None
        raise _type_error(source, key, value, hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _type_error(source, key, value, hint)
        return from_mapping(hint, value, source=source, prefix=f"{key}.")
    if hint is float:
        return _to_float(value, key, source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT <= value < INT_LIMIT:
                raise _OutOfRange(f"{source}: {key}={show(value)}: out of range (beyond 64 bits)")
            return value
        raise _type_error(source, key, value, hint)
    if hint in (str, bool):
        if isinstance(value, hint):
            return value
        raise _type_error(source, key, value, hint)
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _to_float(value: Any, key: str, source: str) -> float:
    """A finite float: no value of a config means NaN or infinity, and comparisons with NaN
    are always false, so range checks would let it through."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int past the largest float
            number = math.inf
    # YAML 1.1 reads exponents without a sign or a dot (4.95e14, 1e9) as strings.
    elif isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        number = float(value)
    else:
        raise _type_error(source, key, value, float)
    if not math.isfinite(number):
        raise _OutOfRange(f"{source}: {key}={show(value)}: must be a finite number")
    return number


def _type_error(source: str, key: str, value: Any, hint: Any) -> ConfigError:
    return ConfigError(f"{source}: {key}={show(value)}: expected {_describe(hint)}")


def from_mapping(cls: type, data: dict, *, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{source}: {prefix}{show(key)}: keys must be names, not {type(key).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{source}: {prefix}{show_key(key)}={show(data[key])}: unknown key (known: {', '.join(sorted(fields))})"
        )
    kwargs = {
        name: _convert(hints[name], value, f"{prefix}{name}", source)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except InvalidValue as err:
        raise ConfigError(f"{source}: {prefix}{err.key}={show(err.value)}: {err.reason}") from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {err}") from None


def to_mapping(obj: Any) -> Any:
    """The inverse of `from_mapping`: plain dicts, lists and scalars (for JSON and YAML)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_mapping(v) for v in obj]
    return obj


def apply_override(data: dict, dotted_key: str, value: Any, *, source: str) -> None:
    """Set `a.b.c` in nested dicts, creating intermediate mappings as needed."""
    if not all(dotted_key.split(".")):
        raise ConfigError(f"{source}: override {show(dotted_key)}: a part of the dotted key is empty")
    *parents, leaf = dotted_key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"{source}: {show_key(dotted_key)}={show(value)}: {show_key(where)} is not a mapping")
        node = child
    node[leaf] = value
