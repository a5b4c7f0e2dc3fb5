"""Pipelines: the lazy pass registry and ``build_pipeline``; every name of the pass infrastructure.

The infrastructure lives in ``potstill.passinfra`` (``base``: ``Pass``, ``PassResult``, predicates;
``options``: option coercion; ``text``: pipeline strings; ``instruments``; ``manager``:
``PassManager``); this module re-exports it, so ``from potstill.pipeline import Pass`` is the one
import a pass needs.

A pass is a small object with a ``name``, an ``Options`` frozen dataclass, the predicates on the
state it ``requires`` and ``ensures`` (as in onnx-ir's ``PassBase``), and one method
``run(state) -> PassResult``. Passes register with ``@register_pass``; built-in passes are listed
in ``BUILTIN_PASSES`` by module path and imported only when a pipeline names them, so
``potstill --help`` never imports NNCF or TensorRT. A name is registered once: a plugin cannot
silently replace a built-in.

A plain function becomes a pass with ``@function_pass``::

    @function_pass("my.scale", options=ScaleOptions)
    def scale(state, opts):
        ...
        return True   # changed

Pipeline strings name passes with options: ``importance.magnitude,prune.width{ratio=0.5}``.
Option values are typed by the options dataclass's annotations (``typing.get_type_hints``).
The ``PassManager`` appends each pass it ran to every student's history.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from potstill.errors import InputError, PassError
from potstill.passinfra.base import (
    Fact,
    NoOptions,
    Pass,
    PassResult,
    Predicate,
    describe,
    needs_fact,
    predicates,
)
from potstill.passinfra.instruments import (
    DumpIRInstrument,
    PassInstrument,
    SkipInstrument,
    TimingInstrument,
    VerifyInstrument,
)
from potstill.passinfra.manager import PassManager
from potstill.passinfra.options import _type_name, build_options, format_value, option_types
from potstill.passinfra.text import parse_pipeline

if TYPE_CHECKING:
    from potstill.state import CompileState

__all__ = [
    "BUILTIN_PASSES",
    "PASS_FAMILIES",
    "DumpIRInstrument",
    "Fact",
    "NoOptions",
    "Pass",
    "PassError",
    "PassInstrument",
    "PassManager",
    "PassResult",
    "Predicate",
    "SkipInstrument",
    "TimingInstrument",
    "VerifyInstrument",
    "_type_name",
    "available_passes",
    "build_options",
    "build_pipeline",
    "describe",
    "format_value",
    "function_pass",
    "get_pass",
    "needs_fact",
    "option_types",
    "parse_pipeline",
    "predicates",
    "register_pass",
]


# ---------------------------------------------------------------------------------------------
# Registry

#: Built-in passes: name -> module that defines (and registers) it. Imported on first use.
BUILTIN_PASSES: dict[str, str] = {
    "importance.magnitude": "potstill.passes.importance.magnitude",
    "importance.taylor": "potstill.passes.importance.taylor",
    "importance.fisher": "potstill.passes.importance.fisher",
    "importance.activation": "potstill.passes.importance.activation",
    "importance.obs": "potstill.passes.importance.obs",
    "importance.blocks": "potstill.passes.importance.blocks",
    "prune.width": "potstill.passes.prune.width",
    "prune.depth": "potstill.passes.prune.depth",
    "prune.experts": "potstill.passes.prune.experts",
    "bn.recalibrate": "potstill.passes.prune.bn_recalibrate",
    "fidelity": "potstill.fidelity",
    "distill": "potstill.passes.distill.pass_",
    "elastic.nest": "potstill.passes.elastic.pass_",
    "elastic.train": "potstill.passes.elastic.pass_",
    "elastic.search": "potstill.passes.elastic.pass_",
    "distill.progressive": "potstill.passes.distill.progressive_pass",
    "quantize.int8": "potstill.targets.lowering",
    "record": "potstill.targets.recording",
    "record.teacher": "potstill.targets.recording",
}

#: Pass families: a name prefix -> the module whose ``family_pass(rest)`` builds and registers the
#: pass ``prefix + rest`` on first use, and whose ``family_names()`` lists them: ``lower.<target>``
#: exists for every registered target (``potstill.targets.registry``), a plugin's included.
PASS_FAMILIES: dict[str, str] = {
    "lower.": "potstill.targets.lowering",
}

_REGISTRY: dict[str, type[Pass]] = {}


def _family(name: str) -> str | None:
    """The module of the family ``name`` belongs to (None: no family)."""
    return next((module for prefix, module in PASS_FAMILIES.items() if name.startswith(prefix)), None)


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipelines under ``cls.name``.

    A name is taken once. Registering another class under a taken name (or under a built-in
    name from another module) raises ``InputError`` naming both; re-running the module that
    defined the pass (a reload) replaces it.
    """
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a frozen dataclass")
    predicates(cls.requires)  # type-checks the declarations now rather than at the first run
    predicates(cls.ensures)
    family = _family(cls.name)
    if family is not None and cls.__module__ != family:
        prefix = next(p for p in PASS_FAMILIES if cls.name.startswith(p))
        raise InputError(f"pass names '{prefix}*' are made by {family} for each target; {_origin(cls)} must use "
                         "another name (a new backend is a function decorated with @target, potstill.targets.registry)")
    builtin = BUILTIN_PASSES.get(cls.name)
    if builtin is not None and cls.__module__ != builtin:
        raise InputError(f"pass name '{cls.name}' is a built-in pass ({builtin}); {_origin(cls)} must use another name")
    old = _REGISTRY.get(cls.name)
    if old is not None and _origin(old) != _origin(cls):
        raise InputError(
            f"pass name '{cls.name}' is taken by {_origin(old)}; {_origin(cls)} must use another name"
        )
    _REGISTRY[cls.name] = cls
    return cls


def function_pass(
    name: str,
    options: type = NoOptions,
    requires: Iterable[str | Predicate] = (),
    ensures: Iterable[str | Predicate] = (),
) -> Callable[[Callable[[CompileState, Any], bool]], type[Pass]]:
    """Turn ``fn(state, options) -> changed`` into a registered pass class."""

    def wrap(fn: Callable[[CompileState, Any], bool]) -> type[Pass]:
        def run(self: Pass, state: CompileState) -> PassResult:
            return PassResult(state, bool(fn(state, self.options)))

        cls = type(
            f"{fn.__name__}_pass",
            (Pass,),
            {
                "name": name,
                "Options": options,
                "requires": predicates(requires),
                "ensures": predicates(ensures),
                "run": run,
                "__doc__": fn.__doc__,
                "__module__": fn.__module__,
                "__qualname__": f"{fn.__qualname__}_pass",
            },
        )
        return register_pass(cls)

    return wrap


def get_pass(name: str) -> type[Pass]:
    """Look a pass up by name, importing its module if it is a built-in not yet loaded."""
    if name not in _REGISTRY and name in BUILTIN_PASSES:
        module = BUILTIN_PASSES[name]
        if module in sys.modules:  # imported, but its entry was dropped (a test restored the registry): re-run it
            importlib.reload(sys.modules[module])
        else:
            importlib.import_module(module)
    family = _family(name)
    if name not in _REGISTRY and family is not None:
        prefix = next(p for p in PASS_FAMILIES if name.startswith(p))
        importlib.import_module(family).family_pass(name[len(prefix):])
    if name not in _REGISTRY:
        known = available_passes()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"unknown pass '{name}'{hint}; known passes: {', '.join(known)}")
    return _REGISTRY[name]


def available_passes() -> list[str]:
    """Every pass a pipeline can name: registered, built-in and each family's members."""
    families = {n for module in PASS_FAMILIES.values() for n in importlib.import_module(module).family_names()}
    return sorted(set(_REGISTRY) | set(BUILTIN_PASSES) | families)


# ---------------------------------------------------------------------------------------------
# Pipelines from names


def build_pipeline(spec: str | Sequence[str | Pass]) -> list[Pass]:
    """Passes from a pipeline string or a list of strings / pass objects."""
    items: list[str | Pass] = [spec] if isinstance(spec, str) else list(spec)
    passes: list[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            passes.append(item)
            continue
        for name, opts in parse_pipeline(item):
            passes.append(get_pass(name)(**opts))
    return passes
