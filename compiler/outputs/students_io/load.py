"""``load_student``: rebuild a student from its folder, executing nothing that the folder names.

The record is read and checked first (format, version, fields), then the weights' safetensors
header against the record's shapes and dtypes, before any module is built; the teacher is built
again (``teacher.build_teacher``), the recorded blocks dropped, the recorded attributes set, and
every tensor given its saved shape and values. Sparse mixture-of-experts blocks get the dense
dispatch the compile gave them (``potstill.inputs.moe``: same outputs, capturable by ``torch.export``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.ir.surgery import drop_children
from torch import nn

from .codec import (
    RECORD_FILE,
    RECORD_FORMAT,
    RECORD_VERSION,
    WEIGHTS_FILE,
    _decode,
    _encode,
    canonical_tensors,
)
from .teacher import _read_config_json, build_teacher


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


def _check_experts(model: nn.Module, recorded: Any, record_path: Path) -> None:
    """Each mixture-of-experts block of the rebuilt model holds the experts the record counts
    (``experts``: block -> count; the kept ones are named in ``removed_blocks``)."""
    from potstill.inputs.moe import expert_counts

    if not recorded:
        return
    if not isinstance(recorded, Mapping):
        raise InputError(f"{record_path}: 'experts' must be an object of block -> expert count")
    counts = expert_counts(model)
    for name, n in recorded.items():
        if counts.get(str(name)) != n:
            raise InputError(f"{record_path}: block '{name}' should hold {n} experts, the rebuilt model has "
                             f"{counts.get(str(name))}; the folder was altered after potstill wrote it")


def _add_linear_biases(model: nn.Module, extra: Mapping[str, torch.Tensor]) -> None:
    """Give a Linear the bias a pass added to it (FLAP's bias compensation on Llama's bias-free
    projections): ``NAME.bias`` saved, ``NAME`` an ``nn.Linear`` without one, shape ``[out_features]``."""
    for key, value in extra.items():
        owner, _, leaf = key.rpartition(".")
        if leaf != "bias":
            continue
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear) and mod.bias is None and tuple(value.shape) == (mod.weight.shape[0],):
            mod.bias = nn.Parameter(torch.empty_like(value), requires_grad=mod.weight.requires_grad)


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
    >>> cnn = load_student("out/students/macs50", factory=my_module.teacher)  # a file.py:FACTORY teacher
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
    _add_linear_biases(model, {k: v for k, v in saved.items() if k not in tensors})
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
    from potstill.inputs.moe import export_friendly_moe

    _check_experts(model, record.get("experts"), record_path)
    export_friendly_moe(model)  # as the compile ran it: a reloaded MoE student exports again
    return model.eval()
