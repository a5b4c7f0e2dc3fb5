"""What a compilation leaves behind: ``OUT/manifest.json`` and each student's files.

The manifest is built from what the passes recorded (``build_manifest``) and is enough to rebuild
the run and to pick a student without opening anything else::

    {"manifest_version": 1, "potstill": "0.1.0", "created": "...",
     "teacher":  {"spec", "label", "macs", "params", "peak_activation_bytes", "latency_ms", "metric",
                  "architecture", "hf", "parity", "target", "precision"},
     "students": [{"name", "dir", "plan", "cache_key", "sha256": {file: hash}, "macs", "params",
                   "peak_activation_bytes", "memory_bytes",
                   "latency_ms": {"median", "p90", "source": "engine"|"pytorch"},
                   "parity": {"max_abs", "rel", "ok"}, "speedup", "macs_reduction", "metric",
                   "fidelity": {"task", "score", "measures", "n"}, "budgets": {...: {"budget",
                   "measured", "ok"}}, "robust", "target", "precision",
                   "architecture": {"widths": {group: units}, "blocks": [...]},
                   "pipeline": [...], "history": [...], "files": {...}, "notes": [...]}],
     "inputs":   {"teacher": {"spec", "sha256", "weights_sha256"}, "sources": {file: hash},
                  "input_shapes", "calib", "data", "recipe", "plugins", "seed", "pipelines",
                  "cache_key"},
     "profile":  {... the DeviceProfile as a dict ...}, "target",
     "host":     {"cpu", "cpu_count", "torch_threads", "platform", "cuda"},
     "timings":  {"prepare_s", "total_s", "passes": {plan: [[pass, seconds, changed], ...]}},
     "versions": {"python", "potstill", "torch", ...}}

Each student's folder ``OUT/students/<name>/`` holds the engines the target wrote, ``student.pt2``
(``torch.export.save``, batch dimension dynamic unless the profile fixes the batch) and, for
Hugging Face teachers, ``hf/`` (``save_pretrained`` with the tokenizer).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import inspect
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from potstill.inputs.data import Batch
from potstill.outputs.atomic import atomic_write_json
from torch import nn

MANIFEST_VERSION = 1
VERSIONED_PACKAGES = ("potstill", "torch", "numpy", "onnx", "onnxruntime", "onnxscript", "transformers",
                      "optimum-onnx", "nncf", "tensorrt")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Hashes and versions


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | Path]) -> dict[str, str]:
    """``{file name: sha256}`` of existing files (directories are skipped)."""
    return {Path(p).name: sha256_file(p) for p in paths if Path(p).is_file()}


def weights_sha256(module: nn.Module) -> str:
    """A hash of the state dict (names, dtypes, shapes and values), whatever file it came from."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def to_jsonable(obj: Any) -> Any:
    """Pydantic models, dataclasses, paths, numpy and torch scalars -> plain JSON values."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return str(obj)


def field_of(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for mappings, ``obj.key`` otherwise."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


# ---------------------------------------------------------------------------------------------
# Architecture and cost of one model


def group_name(group: Any) -> str:
    """A stable readable name for a coupled group: its producer module (or first member)."""
    producer = field_of(group, "producer")
    if producer:
        return str(producer)
    members = list(field_of(group, "members", ()) or ())
    for role in ("out", "norm", "in"):
        for m in members:
            if field_of(m, "role") == role:
                name = field_of(m, "module") or field_of(m, "param")
                return f"{name}" if role == "out" else f"{name}[{role}]"
    return f"group{field_of(group, 'id')}"


def architecture(analysis: Any) -> dict[str, Any]:
    """Widths (units) per coupled group, the pinned groups with their reasons, and the blocks."""
    widths: dict[str, int] = {}
    pinned: dict[str, str] = {}
    groups = field_of(analysis, "groups", ()) or ()
    for g in groups:
        name = group_name(g)
        while name in widths:  # two groups led by one module (e.g. heads and channels)
            name += "'"
        widths[name] = int(field_of(g, "n_units", 0))
        reason = field_of(g, "pinned", None)
        if reason:
            pinned[name] = str(reason)
    blocks = [str(field_of(b, "name")) for b in field_of(analysis, "blocks", ()) or ()]
    return {"widths": widths, "groups": len(groups), "pinned": pinned, "blocks": blocks}


def cost(analysis: Any) -> dict[str, Any]:
    c = field_of(analysis, "cost")
    return {
        "macs": int(field_of(c, "macs", 0) or 0),
        "params": int(field_of(c, "params", 0) or 0),
        "peak_activation_bytes": int(field_of(c, "peak_activation_bytes", 0) or 0),
    }


def parity_dict(value: Any) -> dict[str, Any] | None:
    if not value or field_of(value, "max_abs") is None:
        return None
    record: dict[str, Any] = {
        "max_abs": float(field_of(value, "max_abs", float("nan"))),
        "rel": float(field_of(value, "rel", float("nan"))),
        "ok": bool(field_of(value, "ok", False)),
    }
    positions = field_of(value, "positions")
    if positions:  # compared/masked positions of a mask-aware check
        record["positions"] = {k: int(v) for k, v in dict(positions).items()}
    return record


def host_info() -> dict[str, Any]:
    """The machine latency was measured on: CPU model, cores, the threads torch uses, OS."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ---------------------------------------------------------------------------------------------
# Entries and the manifest, from what the passes recorded


def student_entry(state: Any, student: Any, plan: Any, out: Path) -> dict[str, Any]:
    """The manifest record of one student, read from what its passes recorded (``record`` last)."""
    record = student.artifacts.get("record")
    if record is None:
        raise RuntimeError(f"student '{student.name}' has no record: its plan did not end with the record pass")
    analysis = state.analysis(student)
    teacher_cost = cost(state.teacher_analysis())
    entry = {
        "name": student.name,
        "dir": f"students/{student.name}",
        **cost(analysis),
        "latency_ms": record["latency_ms"],
        "parity": parity_dict(student.metrics.get("parity")),
        "target": record["target"],
        "precision": record["precision"],
        "metric": student.metrics.get("metric"),
        "fidelity": student.metrics.get("fidelity"),
        "budgets": student.metrics.get("budgets", {}),
        "memory_bytes": record["memory_bytes"],
        "architecture": architecture(analysis),
        "pipeline": [p.spec() for p in plan.passes],
        "history": list(student.history),
        "files": record["files"],
        "dynamic_batch": record["dynamic_batch"],
        "loaders": list(record.get("loaders", [])),
        "metrics": to_jsonable({k: v for k, v in student.metrics.items()
                                if k not in ("metric", "fidelity", "budgets")}),
        "notes": list(record["notes"]),
    }  # fmt: skip
    robust = (student.metrics.get("distill") or {}).get("robust")
    if robust is not None:
        entry["robust"] = to_jsonable(robust)
    entry["macs_reduction"] = teacher_cost["macs"] / entry["macs"] if entry["macs"] else None
    return entry


def build_manifest(
    teacher: Mapping[str, Any],
    students: list[dict[str, Any]],
    inputs: Mapping[str, Any],
    profile: Any,
    target: str,
    timings: Mapping[str, Any],
    *,
    prepare_s: float = 0.0,
    total_s: float = 0.0,
) -> dict[str, Any]:
    """The manifest: teacher, students (speed-ups against the teacher's engine), inputs, timings, host."""
    t_lat = (teacher.get("latency_ms") or {}).get("median")
    for entry in students:
        s_lat = (entry.get("latency_ms") or {}).get("median")
        entry["speedup"] = t_lat / s_lat if t_lat and s_lat and s_lat > 0 else None
        if teacher.get("macs") and entry.get("macs"):
            entry["macs_reduction"] = teacher["macs"] / entry["macs"]
    from potstill._version import __version__

    return to_jsonable({
        "manifest_version": MANIFEST_VERSION,
        "potstill": __version__,
        "created": now_iso(),
        "teacher": dict(teacher),
        "students": students,
        "inputs": dict(inputs),
        "profile": profile,
        "target": target,
        "host": host_info(),
        "timings": {
            "prepare_s": round(prepare_s, 3), "total_s": round(total_s, 3),
            "passes": {name: [[n, round(sec, 3), c] for n, sec, c in t.times] for name, t in timings.items()},
        },
        "versions": versions(),
    })  # fmt: skip


# ---------------------------------------------------------------------------------------------
# student.pt2 and hf/


def example_batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    return Batch(tuple(args), dict(kwargs)).size


def rebatch(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat the example along the batch dim to ``batch`` rows (a batch of 1 cannot be dynamic)."""
    size = example_batch_size(args, kwargs)

    def grow(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size and size != batch:
            reps = -(-batch // size)
            return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]
        return x

    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _dynamic_shapes(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    params = inspect.signature(module.forward).parameters
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        else:
            shapes[name] = spec(value)
    return shapes


def _plain(value: Any) -> Any:
    """Outputs with only built-in containers: a Hugging Face ``ModelOutput`` becomes a dict."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value) if type(value) in (tuple, list) else tuple(_plain(v) for v in value)
    return value


def _needs_plain(value: Any) -> bool:
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (int, float, bool)):
        return False
    if type(value) in (tuple, list):
        return any(_needs_plain(v) for v in value)
    if type(value) is dict:
        return any(_needs_plain(v) for v in value.values())
    return True


class PlainOutputs(nn.Module):
    """Wraps a model whose outputs are classes ``torch.export.load`` cannot rebuild (HF ``ModelOutput``).

    ``forward`` takes the wrapped model's signature, so dynamic shapes are named as for the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

        def forward(*args: Any, **kwargs: Any) -> Any:
            return _plain(self.model(*args, **kwargs))

        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward


def save_program(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    path: Path,
    fixed_batch: int | None = None,
) -> dict[str, Any]:
    """``torch.export`` the module to ``path`` (a ``.pt2``); batch dynamic unless ``fixed_batch``.

    Returns ``{"file", "dynamic_batch", "note"}``; a model whose batch cannot be made dynamic is
    saved with a static batch and the note says why.
    """
    from potstill.outputs.students_io import PlainCausalMask, plain_mask_module

    module = module.eval()
    if not args and not isinstance(module, PlainCausalMask) and (wrapped := plain_mask_module(module, kwargs)) is not None:
        # decoders: one export that saves, rather than one that torch.export.save refuses and a second
        saved = save_program(wrapped, (), kwargs, path, fixed_batch)
        if saved["file"]:
            why = ("the causal mask is built from attention_mask with plain tensor ops (transformers' mask "
                   "code uses higher-order ops such as flat_apply, which torch.export.save cannot always serialize)")
            saved["note"] = f"{saved['note']}; {why}" if saved["note"] else why
            return saved
    note = ""
    dynamic = fixed_batch is None
    args, kw = rebatch(args, kwargs, fixed_batch or 2)
    with torch.no_grad():
        if _needs_plain(module(*args, **kw)):
            module = PlainOutputs(module)
            note = "outputs saved as a dict of tensors (the model returns a class torch.export.load cannot rebuild)"
    program = None
    if dynamic:
        try:
            program = torch.export.export(module, args, kw, dynamic_shapes=_dynamic_shapes(module, args, kw), strict=False)
        except Exception as e:  # export names the guard that fixed the batch; keep it for the manifest
            dynamic = False
            reason = f"batch could not be made dynamic ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            note = f"{note}; {reason}" if note else reason
    if program is None:
        program = torch.export.export(module, args, kw, strict=False)
    try:
        torch.export.save(program, str(path))
    except Exception as e:  # e.g. higher-order ops (flat_apply in HF mask code) torch cannot serialize yet
        path.unlink(missing_ok=True)
        reason = (f"not written: torch.export cannot serialize this program ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160]}); load the student with potstill.load_student")
        return {"file": None, "dynamic_batch": dynamic, "note": f"{note}; {reason}" if note else reason}
    return {"file": path.name, "dynamic_batch": dynamic, "note": note}


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> Path:
    return atomic_write_json(out_dir / "manifest.json", to_jsonable(manifest))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
