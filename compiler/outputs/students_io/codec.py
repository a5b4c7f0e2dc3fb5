"""The reload record's format: file names, the JSON form of module attributes, canonical tensors.

A module attribute is recorded when it is public and simple (numbers, strings, ``None``, and
tuples/lists/sets of them); tuples and sets keep their kind as ``{"__tuple__": [...]}`` /
``{"__set__": [...]}``. Tied tensors are saved once, under their first name; the others are
aliases.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

RECORD_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"
RECORD_FORMAT = "potstill.student"
RECORD_VERSION = 1
LOADER_POTSTILL = "potstill.load_student"

_SIMPLE = (bool, int, float, str, type(None))


# ---------------------------------------------------------------------------------------------
# JSON encoding of module attributes (ints, floats, strings, tuples/lists/sets of them)


def _encode(value: Any) -> Any:
    """JSON form of a simple attribute value, or ``...`` (Ellipsis) when it is not simple."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, torch.Size):
        value = tuple(value)
    if isinstance(value, (tuple, list, set, frozenset)) and all(isinstance(v, _SIMPLE) for v in value):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
        kind = {tuple: "tuple", list: "list", set: "set", frozenset: "set"}[type(value)]
        return {f"__{kind}__": items}
    return ...


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        (key, items), = value.items()
        if key == "__tuple__":
            return tuple(items)
        if key == "__set__":
            return set(items)
        if key == "__list__":
            return list(items)
    return value


def _module_attrs(mod: nn.Module) -> dict[str, Any]:
    """The public, simple attributes of one module (what ``__init__`` derived from its arguments)."""
    out = {}
    for key, value in vars(mod).items():
        if key.startswith("_") or key in ("training", "name_or_path"):  # state and provenance, not shape
            continue
        enc = _encode(value)
        if enc is not ...:
            out[key] = enc
    return out


# ---------------------------------------------------------------------------------------------
# Tensors


def canonical_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> tensor, each name once) and (alias -> canonical name) for tied tensors."""
    first: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if t is None:
            continue
        key = id(t)
        if key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t
    return tensors, aliases
