"""The target registry: one decorator per backend, filled where the backend lives.

A backend is one module with one function decorated with ``@target``::

    @target("mytarget", devices=("cpu",))
    def lower_mytarget(module, args, profile, out_dir, *, kwargs, dynamic_batch) -> Artifact:
        ...

The function lowers ``module`` for ``profile`` into ``out_dir`` and returns an ``Artifact``
(engine files, parity against PyTorch, measured latency). It may also take ``calib=`` (the
calibration batches) and ``hf=`` (a saved HF folder for Optimum); it is given them only when its
signature names them. Registering makes the target valid everywhere a target is named: ``lower()``,
``--target``, a profile's ``target:``, a recipe's ``target:`` and the pass ``lower.<name>``.

Built-in backends are listed in ``BUILTIN_TARGETS`` by module and imported on first use, so naming
the targets never imports ONNX Runtime or TensorRT; a plugin (``--plugin file.py``) needs nothing
but the decorator. A name is registered once: a plugin cannot silently replace a built-in.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from potstill.errors import InputError

#: Built-in targets: name -> the module that registers it. Imported on first use.
BUILTIN_TARGETS: dict[str, str] = {
    "onnx": "potstill.targets.onnx_targets",
    "onnxruntime": "potstill.targets.onnx_targets",
    "tensorrt": "potstill.targets.tensorrt",
    "aoti": "potstill.targets.aoti",
}

#: the keywords a lowering function may take beyond the required ones; given only when named
OPTIONAL_INPUTS = ("calib", "hf")

LowerFn = Callable[..., Any]
F = TypeVar("F", bound=LowerFn)


@dataclass(frozen=True)
class TargetSpec:
    """A registered backend: its name, its lowering function and what it needs."""

    name: str
    lower: LowerFn
    #: devices the target runs on (a profile with another ``device:`` is refused); None: any
    devices: tuple[str, ...] | None = None
    #: a sub-folder of the student's folder the engine is written into (None: the folder itself)
    subdir: str | None = None

    @property
    def summary(self) -> str:
        doc = (self.lower.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    def takes(self) -> frozenset[str]:
        """The optional inputs (``calib``, ``hf``) the lowering function names."""
        params = inspect.signature(self.lower).parameters
        return frozenset(name for name in OPTIONAL_INPUTS if name in params)


TARGETS: dict[str, TargetSpec] = {}


def _origin(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def target(name: str, *, devices: tuple[str, ...] | None = None, subdir: str | None = None) -> Callable[[F], F]:
    """Function decorator: register ``fn`` as the lowering of the target ``name`` (see the module
    docstring). A taken name (or a built-in name from another module) is an ``InputError``."""

    def wrap(fn: F) -> F:
        if not name or not name.replace("_", "").isalnum():
            raise TypeError(f"target name {name!r}: use letters, digits and '_'")
        builtin = BUILTIN_TARGETS.get(name)
        if builtin is not None and fn.__module__ != builtin:
            raise InputError(f"target name '{name}' is a built-in target ({builtin}); {_origin(fn)} must use another name")
        old = TARGETS.get(name)
        if old is not None and _origin(old.lower) != _origin(fn):
            raise InputError(f"target name '{name}' is taken by {_origin(old.lower)}; {_origin(fn)} must use another name")
        TARGETS[name] = TargetSpec(name, fn, devices=devices, subdir=subdir)
        return fn

    return wrap


def target_names() -> list[str]:
    """Every target that can be named: the built-ins (not imported) and the registered plugins."""
    return [*BUILTIN_TARGETS, *(n for n in TARGETS if n not in BUILTIN_TARGETS)]


def get_target(name: str) -> TargetSpec:
    """The target ``name``, importing its module if it is a built-in not yet loaded; an unknown
    name is an ``InputError`` listing the targets."""
    if name not in TARGETS and name in BUILTIN_TARGETS:
        module = BUILTIN_TARGETS[name]
        if module in sys.modules:  # imported, but its entry was dropped (a test restored the registry)
            importlib.reload(sys.modules[module])
        else:
            importlib.import_module(module)
    if name not in TARGETS:
        close = difflib.get_close_matches(str(name), target_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"unknown target '{name}'{hint}; targets: {', '.join(target_names())}")
    return TARGETS[name]


def check_target(name: str, where: str = "target") -> str:
    """``name`` if it is a target (a plugin's included); else an ``InputError`` naming ``where``."""
    if name not in BUILTIN_TARGETS and name not in TARGETS:
        close = difflib.get_close_matches(str(name), target_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"{where} '{name}'{hint}: expected one of {', '.join(target_names())}")
    return name
