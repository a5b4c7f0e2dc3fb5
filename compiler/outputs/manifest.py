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
Hugging Face teachers, ``hf/`` (``save_pretrained`` with the tokenizer); ``potstill.outputs.students_io``
writes and reads those.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
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
        "speedup_timing": record.get("speedup_timing"),
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
    """The manifest: teacher, students (speed-ups against the teacher's engine), inputs, timings, host.

    A student's ``speedup`` is its engine timed interleaved with the teacher's (``speedup_timing``,
    ``potstill.targets.speedup``) where both ran in this process; else the ratio of the two medians,
    timed apart (``speedup_method`` says which)."""
    t_lat = (teacher.get("latency_ms") or {}).get("median")
    for entry in students:
        s_lat = (entry.get("latency_ms") or {}).get("median")
        timing = entry.get("speedup_timing")
        if timing:
            entry["speedup"], entry["speedup_method"] = timing["speedup"], "interleaved"
        else:
            entry["speedup"] = t_lat / s_lat if t_lat and s_lat and s_lat > 0 else None
            entry["speedup_method"] = "separate medians" if entry["speedup"] is not None else None
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


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> Path:
    return atomic_write_json(out_dir / "manifest.json", to_jsonable(manifest))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
