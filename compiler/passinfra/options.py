"""Pass options: frozen dataclasses whose fields are typed by their annotations.

``build_options(Options, {"ratio": "0.5"}, "prune.width")`` builds the dataclass from values read
out of a pipeline string or a recipe, converting each by its annotation (``typing.get_type_hints``,
as xDSL's ``arg_spec.py`` does, never by its default): unions, ``Literal``, tuples, pydantic records,
``bool`` from ``true``/``false``, ints that are ints. An unknown option or a value of the wrong type
is an ``InputError`` naming the pass, the option and what it takes. ``format_value`` writes a value
back in the pipeline-string form ``parse_pipeline`` reads.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any

from potstill.errors import InputError


def format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if hasattr(value, "model_dump"):  # a pydantic record: YAML flow mapping, read back by parse_pipeline
        dumped = value.model_dump(exclude_defaults=True)
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in dumped.items()) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def option_types(options_cls: type) -> dict[str, Any]:
    """Field name -> annotated type of an options dataclass (string annotations resolved)."""
    module = sys.modules.get(options_cls.__module__)
    try:
        return typing.get_type_hints(options_cls, vars(module) if module else None)
    except (NameError, TypeError):  # an annotation that cannot be resolved: fall back to no coercion
        return {f.name: Any for f in dataclasses.fields(options_cls)}


def build_options(options_cls: type, values: dict[str, Any], pass_name: str = "") -> Any:
    """Build a frozen options dataclass from a dict, with errors that name the field."""
    if not dataclasses.is_dataclass(options_cls):
        raise TypeError(f"{options_cls!r} is not a dataclass")
    known = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(
            f"pass '{pass_name}': unknown option(s) {unknown}; it takes {sorted(known) or 'no options'}"
        )
    hints = option_types(options_cls)
    converted = {key: _coerce(value, key, hints.get(key, Any), pass_name) for key, value in values.items()}
    try:
        return options_cls(**converted)
    except (TypeError, ValueError) as e:
        raise InputError(f"pass '{pass_name}': bad options {values}: {e}") from e


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _type_name(kind: Any) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        return " or ".join(repr(a) for a in args)
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _convert(value: Any, kind: Any) -> Any:
    """``value`` as ``kind`` (an annotation); raises ValueError/TypeError when it is not one."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any or kind is object:
        return tuple(value) if isinstance(value, list) else value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"one of {list(args)}")
        return value
    if origin in (tuple, list) or kind in (tuple, list):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(items):
                raise ValueError(f"{len(args)} items")
            return tuple(_convert(v, a) for v, a in zip(items, args))
        inner = args[0] if args else Any
        return tuple(_convert(v, inner) for v in items)
    if isinstance(kind, type) and hasattr(kind, "model_validate"):
        return value if isinstance(value, kind) else kind.model_validate(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(value)
        return str(value)
    if value is None:
        raise ValueError("None")
    return value


def _coerce(value: Any, name: str, kind: Any, pass_name: str) -> Any:
    try:
        return _convert(value, kind)
    except (TypeError, ValueError) as e:
        raise InputError(
            f"pass '{pass_name}': option '{name}' must be {_type_name(kind)}, got {value!r}"
        ) from e
