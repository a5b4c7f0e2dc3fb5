"""``save_student``: write a student's weights and reload record (and ``hf/`` where a config states it).

The record is checked by reloading it: ``potstill.load_student`` must rebuild the same tensors
(and, given an example, the same outputs), and ``hf/`` is kept only when the teacher's Auto class
reloads exactly this student, so the ``loaders`` the record lists are checked promises.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.inputs.moe import expert_counts
from potstill.ir.surgery import BLOCK_ORIGIN_ATTR, attention_counts
from torch import nn

from .codec import (
    LOADER_POTSTILL,
    RECORD_FILE,
    RECORD_FORMAT,
    RECORD_VERSION,
    WEIGHTS_FILE,
    _module_attrs,
    canonical_tensors,
)
from .load import _apply_removals, load_student
from .teacher import _teacher_record, build_teacher


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
        "experts": expert_counts(module),
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


def _plain_type(mod: nn.Module) -> type:
    """The module's class; for a parametrized one (weight norm: a class made per instance), the
    class it was made from."""
    from torch.nn.utils import parametrize

    return type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)
