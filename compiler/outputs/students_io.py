"""Save and reload students without relying on what a Hugging Face config can express.

A student is its teacher's class with some blocks removed and some modules narrowed. We save

* ``model.safetensors``: every parameter and buffer of the student (tied tensors once; no pickle);
* ``architecture.json``: how to rebuild the module those tensors fit. The teacher's class (import
  path) and config (a Hugging Face config dict) or its factory (``file.py:FACTORY``), the blocks
  removed from each container (by the teacher's indices), every tensor's shape and dtype, the module
  attributes that differ from a freshly built teacher (``in_features``, ``out_channels``,
  ``groups``, ``num_heads``, ``num_key_value_heads``, ``head_dim``, ``all_head_size``, ...), the
  per-layer attention head counts, the student's config and the loaders the student supports.

Nothing in a student folder executes. The record names the teacher's class, but ``load_student``
resolves it only from an allow-list: a ``transformers.PreTrainedModel`` subclass found by name in
the ``transformers`` namespace, an ``nn.Module`` class of a module the caller has already imported,
or the ``model_class`` the caller passes; no module is imported because a record names it. A
factory teacher (``file.py:FACTORY``) is rebuilt only by the ``factory`` the caller passes; the
recorded spec is information, never imported. Every tensor's shape and dtype in
``model.safetensors`` is checked against the record (from the file's header) before any module
is built.

``load_student(dir)`` replays the record the way Model Optimizer's ``mto.restore`` replays its
``modelopt_state`` on a freshly built model: build the teacher's class from its config (or call the
caller's factory), drop the recorded blocks, set the recorded attributes, then give every tensor its saved
shape and values. ``hf/`` (``save_pretrained``) is written next to it only when plain
``AutoModel.from_pretrained`` rebuilds exactly these tensors, so the manifest's ``loaders`` list
is a checked promise, not a hope.

    >>> record = save_student(student, "out/students/r0.5", teacher={"spec": "hf:./bert", "hf": hf})
    >>> record["loaders"]
    ['potstill.load_student', 'transformers.AutoModel']
    >>> model = load_student("out/students/r0.5")
    >>> cnn = load_student("out/students/w50", factory=my_module.teacher)  # a file.py:FACTORY teacher
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.ir.surgery import BLOCK_ORIGIN_ATTR, attention_counts, drop_children
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


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


# ---------------------------------------------------------------------------------------------
# Teacher description


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
    transformers class or one of an already-imported module (see :func:`_resolve_class`)."""
    import contextlib

    if meta:
        import warnings

        try:
            # a factory that loads its checkpoint warns that loading into meta tensors is a no-op:
            # here only the structure and attributes are wanted
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return build_teacher(record, factory=factory, model_class=model_class)
        except InputError:
            raise
        except Exception:  # a factory that needs real tensors (e.g. loads a checkpoint): build on CPU
            return build_teacher(record, factory=factory, model_class=model_class)
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


# ---------------------------------------------------------------------------------------------
# Save


def head_counts(module: nn.Module) -> dict[str, dict[str, int]]:
    """Per attention module: the head counts and sizes it carries (as each family names them)."""
    out = {}
    for name, mod in module.named_modules():
        counts = attention_counts(mod)
        if counts:
            out[name] = counts
    return out


def save_student(
    module: nn.Module,
    directory: str | Path,
    *,
    teacher: Mapping[str, Any],
    example: tuple[tuple[Any, ...], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``model.safetensors`` + ``architecture.json`` (and ``hf/`` where a config states the
    shapes) into ``directory``; returns the record.

    ``teacher``: ``{"spec": "hf:PATH" | "file.py:FACTORY", "hf": {"path", "auto_class", ...} | None}``
    and optionally ``"config"`` (the teacher's HF config dict; default: ``PATH/config.json``).
    ``example`` (args, kwargs): when given, the rebuilt student (and ``hf/``) must compute what
    ``module`` computes on it, or the loader is not listed.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    teacher_rec = _teacher_record(module, teacher)
    factory = _caller_factory(teacher)
    fresh = build_teacher(teacher_rec, meta=True, factory=factory, model_class=type(module))
    origin: dict[str, list[int]] = dict(getattr(module, BLOCK_ORIGIN_ATTR, {}) or {})
    removed = _apply_removals(fresh, origin)
    fresh_mods = dict(fresh.named_modules())
    changed: dict[str, dict[str, Any]] = {}
    for name, mod in module.named_modules():
        ref = fresh_mods.get(name)
        if ref is None or _plain_type(ref) is not _plain_type(mod):
            raise InputError(f"save_student: module '{name}' ({type(mod).__name__}) is not in the teacher's "
                             f"architecture; potstill records narrowed modules and removed blocks only")
        mine, theirs = _module_attrs(mod), _module_attrs(ref)
        diff = {k: v for k, v in mine.items() if theirs.get(k, ...) != v}
        if diff:
            changed[name] = diff
    tensors, aliases = canonical_tensors(module)
    config = getattr(module, "config", None)
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "teacher": teacher_rec,
        "removed_blocks": removed,
        "modules": changed,
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for n, t in tensors.items()},
        "tied": aliases,
        "heads": head_counts(module),
        "student_config": config.to_dict() if config is not None and hasattr(config, "to_dict") else None,
        "weights": WEIGHTS_FILE,
        "loaders": [LOADER_POTSTILL],
        "notes": [],
    }
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})
    _write_json(directory / RECORD_FILE, record)
    again = load_student(directory, factory=factory, model_class=type(module))
    _check_same(module, again, example, "potstill.load_student")
    if teacher_rec["kind"] == "hf":
        hf = dict(teacher.get("hf") or {})
        loader, note = save_hf_where_describable(module, directory / "hf", hf, example)
        if loader:
            record["loaders"].append(loader)
        if note:
            record["notes"].append(note)
        _write_json(directory / RECORD_FILE, record)
    return record


def _caller_factory(teacher: Mapping[str, Any]) -> Callable[[], nn.Module] | None:
    """The factory of a ``file.py:FACTORY`` teacher the caller gave ``save_student`` (the user's own
    spec, e.g. from the command line; never a spec read out of a record)."""
    spec = str(teacher.get("spec") or "")
    if teacher.get("hf") or spec.startswith("hf:") or teacher.get("config") is not None:
        return None
    from potstill.inputs.data import load_callable

    fn: Callable[[], nn.Module] = load_callable(spec)
    return fn


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _check_same(
    module: nn.Module, again: nn.Module, example: tuple[tuple[Any, ...], Mapping[str, Any]] | None, loader: str
) -> None:
    """The reloaded module holds the same tensors (and computes the same outputs on ``example``)."""
    from potstill.inputs.data import primary_output

    mine, _ = canonical_tensors(module)
    theirs, _ = canonical_tensors(again)
    if loader != LOADER_POTSTILL:  # other loaders rebuild non-persistent buffers from their config
        persistent = set(module.state_dict())
        mine = {k: v for k, v in mine.items() if k in persistent}
    for name, t in mine.items():
        other = theirs.get(name)
        if other is None or other.shape != t.shape or not torch.equal(other.detach().cpu(), t.detach().cpu()):
            raise RuntimeError(f"{loader} does not rebuild tensor '{name}' of the student")
    if example is not None:
        args, kwargs = example
        with torch.no_grad():
            a = primary_output(module(*args, **kwargs))
            b = primary_output(again.eval()(*args, **kwargs))
        if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
            raise RuntimeError(f"{loader} rebuilds a module that computes something else than the student")


def _plain_type(mod: nn.Module) -> type:
    """The module's class; for a parametrized one (weight norm: a class made per instance), the
    class it was made from."""
    from torch.nn.utils import parametrize

    return type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)


def save_hf_where_describable(
    module: nn.Module, directory: Path, hf: Mapping[str, Any], example: tuple[tuple[Any, ...], Mapping[str, Any]] | None
) -> tuple[str | None, str | None]:
    """``save_pretrained`` into ``directory`` (with the teacher's tokenizer) and keep it only when
    the teacher's Auto class reloads exactly this student; returns (loader name, note)."""
    import shutil

    import transformers
    from potstill.inputs.teacher import load_tokenizer

    auto_name = str(hf.get("auto_class") or "AutoModel")
    config = getattr(module, "config", None)
    nonuniform = getattr(config, "potstill_nonuniform", None)
    if nonuniform:
        return None, (f"hf/ not written: the layers differ in {', '.join(map(str, nonuniform))}, which a "
                      f"{type(config).__name__} cannot state per layer; load with {LOADER_POTSTILL}")
    shutil.rmtree(directory, ignore_errors=True)
    module.save_pretrained(str(directory))  # type: ignore[operator]
    try:
        again = getattr(transformers, auto_name).from_pretrained(str(directory), trust_remote_code=False)
        _check_same(module, again, example, f"{auto_name}.from_pretrained")
    except Exception as e:  # the config cannot state these shapes: potstill's loader holds the student
        shutil.rmtree(directory, ignore_errors=True)
        first = (str(e).strip().splitlines() or [""])[-1][:200]
        return None, (f"hf/ not written: {auto_name}.from_pretrained cannot rebuild this student from its config "
                      f"({type(e).__name__}: {first}); load with {LOADER_POTSTILL}")
    tokenizer = load_tokenizer(hf["path"]) if hf.get("path") else None
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return f"transformers.{auto_name}", None


# ---------------------------------------------------------------------------------------------
# Load


def _apply_removals(model: nn.Module, origin: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """Drop from each container the children whose teacher index is not kept; returns the removed."""
    removed: dict[str, list[int]] = {}
    for cname, kept in origin.items():
        container = model.get_submodule(cname)
        n = len(list(container.children()))
        drop = sorted(set(range(n)) - {int(i) for i in kept})
        if drop:
            drop_children(model, {cname: set(drop)})
            removed[cname] = drop
    return removed


def read_record(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        raise InputError(f"{path}: no such file; load_student takes a student folder written by potstill")
    record = _read_config_json(path)
    if record.get("format") != RECORD_FORMAT:
        raise InputError(f"{path}: 'format' is {record.get('format')!r}, expected {RECORD_FORMAT!r}")
    if int(record.get("version", 0)) > RECORD_VERSION:
        raise InputError(f"{path}: record version {record.get('version')} is newer than this potstill reads "
                         f"({RECORD_VERSION}); upgrade potstill")
    for key in ("teacher", "tensors", "modules", "removed_blocks"):
        if key not in record:
            raise InputError(f"{path}: missing field '{key}'")
    return record


#: torch dtype name (as the record writes it) -> the safetensors header's dtype
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}  # fmt: skip


def check_weights_header(weights: Path, tensors: Mapping[str, Any], record_path: Path) -> None:
    """Every tensor in ``weights`` has the shape and dtype the record states, and the two name the
    same tensors; read from the safetensors header only (no tensor is loaded)."""
    from safetensors import safe_open

    if not isinstance(tensors, Mapping):
        raise InputError(f"{record_path}: 'tensors' must be an object of name -> {{shape, dtype}}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            names: list[str] = list(f.keys())
            slices = {name: f.get_slice(name) for name in names}
            header = {name: (list(sl.get_shape()), str(sl.get_dtype())) for name, sl in slices.items()}
    except Exception as e:  # truncated or not a safetensors file
        raise InputError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    missing = sorted(set(tensors) - set(header))
    if missing:
        raise InputError(f"{weights}: tensors {missing[:5]} named in {record_path.name} are missing")
    extra = sorted(set(header) - set(tensors))
    if extra:
        raise InputError(f"{weights}: tensors {extra[:5]} are not named in {record_path.name}; the folder was "
                         "altered after potstill wrote it")
    for name, (shape, dtype) in header.items():
        entry = tensors[name]
        want_shape = entry.get("shape") if isinstance(entry, Mapping) else None
        want_dtype = _SAFETENSORS_DTYPES.get(str(entry.get("dtype"))) if isinstance(entry, Mapping) else None
        if not isinstance(want_shape, list) or want_dtype is None:
            raise InputError(f"{record_path}: tensors.{name} must be {{shape: [ints], dtype: "
                             f"{'|'.join(_SAFETENSORS_DTYPES)}}}, found {entry!r}")
        if shape != want_shape or dtype != want_dtype:
            raise InputError(f"{weights}: tensor '{name}' is {dtype}{shape} but {record_path.name} records "
                             f"{want_dtype}{want_shape}; the folder was altered after potstill wrote it")


def _set_recorded_attrs(mod: nn.Module, name: str, attrs: Any, record_path: Path) -> None:
    """Set the recorded attributes of one module: public names and simple JSON values only."""
    if not isinstance(attrs, Mapping):
        raise InputError(f"{record_path}: modules.{name} must be an object of attribute -> value")
    for key, value in attrs.items():
        value = _decode(value)
        if not str(key).isidentifier() or str(key).startswith("_") or _encode(value) is ...:
            raise InputError(f"{record_path}: modules.{name}.{key}: only public attributes with simple values "
                             "(numbers, strings, lists of them) are recorded")
        setattr(mod, key, value)


def load_student(
    directory: str | Path,
    *,
    factory: Callable[[], nn.Module] | None = None,
    model_class: type | None = None,
) -> nn.Module:
    """Rebuild a student saved by :func:`save_student` (eval mode, CPU).

    Nothing in the folder executes: the teacher's class comes from the allow-list of
    :func:`_resolve_class` (or ``model_class``), a factory teacher is built by the caller's
    ``factory`` (the recorded spec is never imported), and the weights' shapes and dtypes are
    checked against the record before any module is built.

    >>> model = load_student("out/students/r0.5")
    >>> cnn = load_student("out/students/w50", factory=my_module.teacher)  # a file.py:FACTORY teacher
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    record_path = directory / RECORD_FILE
    record = read_record(directory)
    weights = directory / str(record.get("weights") or WEIGHTS_FILE)
    if weights.parent != directory or not weights.is_file():
        raise InputError(f"{weights}: no such file in {directory} (the student's weights)")
    check_weights_header(weights, record["tensors"], record_path)
    teacher = record["teacher"]
    if not isinstance(teacher, Mapping):
        raise InputError(f"{record_path}: 'teacher' must be an object")
    try:
        model = build_teacher(teacher, factory=factory, model_class=model_class)
    except InputError as e:  # name the folder, not only the file
        if str(e).startswith(f"{RECORD_FILE}:"):
            raise InputError(f"{directory}{'/'}{e}") from e
        raise
    removed = {str(k): [int(i) for i in v] for k, v in dict(record["removed_blocks"]).items()}
    if removed:
        drop_children(model, {k: set(v) for k, v in removed.items()})
    mods = dict(model.named_modules())
    for name, attrs in dict(record["modules"]).items():
        mod = mods.get(name)
        if mod is None:
            raise InputError(f"{record_path}: module '{name}' is not in the rebuilt teacher")
        _set_recorded_attrs(mod, name, attrs, record_path)
    saved = load_file(str(weights))
    tensors, _ = canonical_tensors(model)
    unknown = sorted(set(saved) - set(tensors))
    if unknown:
        raise InputError(f"{weights}: tensors {unknown[:5]} do not exist in the rebuilt {teacher['class']}")
    for name, t in tensors.items():
        value = saved.get(name)
        if value is None:
            raise InputError(f"{weights}: no tensor '{name}' for the rebuilt {teacher['class']}")
        with torch.no_grad():
            t.data = value.to(t.device)
    student_config = record.get("student_config")
    config = getattr(model, "config", None)
    if student_config and config is not None:
        for key, value in student_config.items():
            if key not in ("transformers_version", "architectures") and getattr(config, key, None) != value:
                try:
                    setattr(config, key, value)
                except (AttributeError, TypeError, ValueError):
                    continue  # derived properties (e.g. use_return_dict) follow their sources
    return model.eval()


# ---------------------------------------------------------------------------------------------
# A student.pt2 for decoders whose mask code torch.export.save cannot serialize


class PlainCausalMask(nn.Module):
    """``forward(input_ids, attention_mask)`` of a Hugging Face decoder with the 4-D causal mask
    built from plain tensor ops.

    transformers (>= 4.53) builds decoder masks through ``flat_apply``, a higher-order op that
    ``torch.export.save`` cannot serialize. Given a 4-D float mask, the models skip that code
    (``mask[b, 0, q, k] = 0`` where key ``k <= q`` is not padding, else the dtype's minimum, as their
    eager mask is), so the exported program holds only aten ops.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        n = input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(keep.shape, dtype=dtype, device=input_ids.device)
        mask = mask.masked_fill(~keep, torch.finfo(dtype).min)
        return self.model(input_ids=input_ids, attention_mask=mask)


def plain_mask_module(module: nn.Module, kwargs: Mapping[str, Any]) -> nn.Module | None:
    """``PlainCausalMask(module)`` when it computes what ``module`` computes on ``kwargs`` (a causal
    decoder with unpadded and padded rows checked), else None (encoders, sliding windows, ...)."""
    from potstill.inputs.data import primary_output

    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or set(kwargs) - {"input_ids", "attention_mask"}:
        return None
    mask = torch.ones_like(ids) if not isinstance(mask, torch.Tensor) else mask
    wrapped = PlainCausalMask(module).eval()
    padded = mask.clone()
    padded[:, -max(1, ids.shape[1] // 4):] = 0  # right padding: the valid rows must agree too
    try:
        with torch.no_grad():
            for m in (mask, padded):
                a = primary_output(module(input_ids=ids, attention_mask=m))
                b = primary_output(wrapped(ids, m))
                valid = m.bool()
                if a.shape != b.shape or not torch.allclose(a[valid], b[valid], atol=1e-5, rtol=1e-4):
                    return None
    except Exception:  # a model that does not take a 4-D mask: no wrapper
        return None
    return wrapped
