"""The teacher part of a reload record, and a fresh teacher built from it.

``teacher_record`` describes how to rebuild the teacher: an HF class and config, or a
``file.py:FACTORY`` spec (information only). ``build_teacher`` builds it again, resolving the class
from an allow-list only (``_resolve_class``): nothing is imported because a record names it, and a
factory teacher is built by the caller's own ``factory``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from torch import nn

from .codec import RECORD_FILE


def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


_FIX = "pass model_class= (the class itself) or factory= (a function that builds the teacher)"


def _resolve_class(path: str, model_class: type | None = None) -> type:
    """The ``nn.Module`` class the record names, from the allow-list only (nothing is imported
    because a record says so): ``model_class`` when the caller gives it; a
    ``transformers.PreTrainedModel`` subclass resolved by name as ``getattr(transformers, NAME)``
    when the path is under ``transformers.``; else a class of a module already in ``sys.modules``."""
    where = f"{RECORD_FILE}: teacher.class '{path}'"
    if model_class is not None:
        if not isinstance(model_class, type) or _class_path(model_class) != path:
            raise InputError(f"{where} does not match the model_class passed ({model_class!r}); pass the class "
                             "the student was saved from")
        return model_class
    module_name, _, name = path.rpartition(".")
    cls: Any = None
    if module_name.startswith("transformers."):
        import transformers

        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazy import that fails: not resolvable by name
            cls = None
        base = getattr(transformers, "PreTrainedModel", None)
        if not (isinstance(cls, type) and base is not None and issubclass(cls, base) and _class_path(cls) == path):
            raise InputError(f"{where} is not a transformers model class (a PreTrainedModel subclass that "
                             f"transformers exports by name); {_FIX}")
        return cls
    owner = _imported_owner(path)
    if owner is not None:
        cls = owner[0]
        for part in owner[1].split("."):
            cls = getattr(cls, part, None)
    if owner is None or cls is None:
        raise InputError(f"{where}: its module is not imported, and a student folder never imports code; "
                         f"import it yourself first or {_FIX}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and _class_path(cls) == path):
        raise InputError(f"{where} is not an nn.Module class; a student folder may name only model classes; {_FIX}")
    return cls


def _imported_owner(path: str) -> tuple[Any, str] | None:
    """(the already-imported module, the qualified name inside it) for a dotted class path, or None;
    ``sys.modules`` is only read, never extended."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = sys.modules.get(".".join(parts[:i]))
        if mod is not None:
            return mod, ".".join(parts[i:])
    return None


def _teacher_record(module: nn.Module, teacher: Mapping[str, Any]) -> dict[str, Any]:
    """``{"kind": "hf", "class", "config", "attn_implementation"}`` or ``{"kind": "factory", "spec", "class"}``."""
    spec = str(teacher.get("spec") or "")
    hf = teacher.get("hf")
    config = teacher.get("config")
    if hf or spec.startswith("hf:") or config is not None:
        if config is None:
            src = Path(str((hf or {}).get("path") or spec[3:])) / "config.json"
            config = _read_config_json(src)
        attn = getattr(getattr(module, "config", None), "_attn_implementation", None)
        return {"kind": "hf", "class": _class_path(module), "config": dict(config), "attn_implementation": attn}
    path_text, sep, factory = spec.rpartition(":")
    if not sep or not path_text.endswith(".py"):
        raise InputError(f"save_student: teacher spec '{spec}' is neither hf:PATH nor path/to/file.py:FACTORY")
    return {"kind": "factory", "spec": f"{Path(path_text).resolve()}:{factory}", "class": _class_path(module)}


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file; the teacher's config is needed to rebuild the student") from e
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _no_init() -> Any:
    """transformers' context that skips random initialisation (the saved weights replace it)."""
    import contextlib

    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # moved or gone in another release: initialise, only slower
        return contextlib.nullcontext()
    return no_init_weights()


def build_teacher(
    record: Mapping[str, Any],
    *,
    meta: bool = False,
    factory: Callable[[], nn.Module] | None = None,
    model_class: type | None = None,
) -> nn.Module:
    """A freshly built teacher (uninitialised weights) from the ``teacher`` part of a record;
    ``meta``: on the meta device (structure and attributes only, no memory).

    ``factory``: the caller's function that builds a ``kind: factory`` teacher (the recorded spec
    is never imported); ``model_class``: the class of a ``kind: hf`` teacher when it is not a
    transformers class or one of an already-imported module (see :func:`_resolve_class`).

    A factory may hand out one shared instance (``functools.lru_cache``): the module it returns is
    copied (structure only when ``meta``), because the rebuilt teacher is narrowed in place and the
    caller's teacher must stay as it was."""
    built = _build_teacher(record, meta=meta, factory=factory, model_class=model_class)
    return own_copy(built, meta=meta) if record.get("kind") == "factory" else built


def own_copy(module: nn.Module, *, meta: bool = False) -> nn.Module:
    """A deep copy of ``module`` that shares no tensor with it; ``meta``: its parameters and buffers
    become meta tensors (no memory), ties between them kept.

    >>> net = nn.Linear(2, 2)
    >>> twin = own_copy(net, meta=True)
    >>> twin.weight.is_meta, net.weight.is_meta
    (True, False)
    """
    import copy
    import itertools

    memo: dict[int, Any] = {}
    if meta:
        for t in itertools.chain(module.parameters(), module.buffers()):
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def _build_teacher(
    record: Mapping[str, Any],
    *,
    meta: bool,
    factory: Callable[[], nn.Module] | None,
    model_class: type | None,
) -> nn.Module:
    import contextlib

    if meta:
        import warnings

        try:
            # a factory that loads its checkpoint warns that loading into meta tensors is a no-op:
            # here only the structure and attributes are wanted
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return _build_teacher(record, meta=False, factory=factory, model_class=model_class)
        except InputError:
            raise
        except Exception:  # a factory that needs real tensors (e.g. loads a checkpoint): build on CPU
            return _build_teacher(record, meta=False, factory=factory, model_class=model_class)
    kind = record.get("kind")
    if kind == "hf":
        cls = _resolve_class(str(record.get("class")), model_class)
        from transformers import AutoConfig

        config_dict = dict(record["config"])
        model_type = config_dict.get("model_type")
        if not model_type:
            raise InputError(f"{RECORD_FILE}: teacher.config has no 'model_type'")
        try:
            config = AutoConfig.for_model(**config_dict)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{RECORD_FILE}: teacher.config (model_type '{model_type}') is not a config this "
                             f"transformers knows: {e}") from e
        from_config = getattr(cls, "_from_config", None)
        attn = record.get("attn_implementation")
        with _no_init() if not meta else contextlib.nullcontext():
            model = from_config(config, attn_implementation=attn) if callable(from_config) and attn else cls(config)
        tie = getattr(model, "tie_weights", None)
        if callable(tie):
            tie()  # skipped with the initialisation: tied tensors must be one tensor again
        return model
    if kind == "factory":
        if factory is None:
            raise InputError(f"{RECORD_FILE}: teacher.kind is 'factory' and the record names spec "
                             f"'{record.get('spec')}'; for safety a student folder never imports code: pass the "
                             "factory yourself, e.g. load_student(dir, factory=my_module.teacher)")
        built: Any = factory()
        if not isinstance(built, nn.Module):
            raise InputError(f"load_student: factory= returned a {type(built).__name__}, not an nn.Module")
        if _class_path(built) != record.get("class"):
            raise InputError(f"{RECORD_FILE}: teacher.class is '{record.get('class')}' but factory= built a "
                             f"{_class_path(built)}; pass the factory the student was saved from")
        return built
    raise InputError(f"{RECORD_FILE}: teacher.kind must be 'hf' or 'factory', found {kind!r}")
