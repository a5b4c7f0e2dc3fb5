"""Lower every student of a compile state (shared by the ``lower.*`` and ``quantize.int8`` passes).

Each student goes to ``state.out_dir / "students" / student.name`` (TensorRT bundles to its
``tensorrt/`` subfolder); the artifact is stored in ``student.artifacts[target]`` and its parity
and latency in ``student.metrics`` (``parity``, ``latency_ms`` for the latest lowering, and
``targets[target]``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from potstill.errors import PreconditionError
from potstill.profiles import DeviceProfile, load_profile

from .artifact import Artifact


def state_profile(state: Any, changes: dict[str, Any] | None = None) -> DeviceProfile:
    profile = load_profile(state.profile) if state.profile is not None else load_profile()
    for key, value in (changes or {}).items():
        if isinstance(value, dict):
            value = getattr(profile, key).model_copy(update=value)
        profile = profile.model_copy(update={key: value})
    return profile


def _student_hf(state: Any, student: Any, student_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """A saved HF directory of the student for Optimum, and a temporary dir to remove afterwards."""
    if not state.hf:
        return None, None
    task = state.hf.get("task")
    saved = student_dir / "hf"
    if (saved / "config.json").is_file():
        return {"dir": str(saved), "task": task}, None
    if hasattr(student.module, "save_pretrained"):
        tmp = Path(tempfile.mkdtemp(prefix="potstill-hf-"))
        student.module.save_pretrained(str(tmp))
        return {"dir": str(tmp), "task": task}, tmp
    return None, None


def lower_students(state: Any, target: str, profile_changes: dict[str, Any] | None = None) -> list[Artifact]:
    from .lower import lower

    if state.out_dir is None:
        raise PreconditionError(f"lowering to {target} needs state.out_dir (where engines are written)")
    profile = state_profile(state, profile_changes)
    students = state.students or [state.working()]
    done = []
    for student in students:
        student_dir = Path(state.out_dir) / "students" / student.name
        out = student_dir / "tensorrt" if target == "tensorrt" else student_dir
        hf, tmp = _student_hf(state, student, student_dir)
        try:
            art = lower(student.module, state.example_inputs, profile, out, target=target,
                        example_kwargs=state.example_kwargs, dynamic_batch=state.dynamic_batch,
                        calib=state.calib_data, hf=hf)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        student.artifacts[target] = art
        student.metrics["parity"] = dict(art.parity)
        student.metrics["latency_ms"] = dict(art.latency_ms)
        student.metrics.setdefault("targets", {})[target] = {
            "precision": art.precision, "parity": dict(art.parity), "latency_ms": dict(art.latency_ms),
        }
        student.history.append(f"lowered to {target} ({art.precision})")
        done.append(art)
    state.facts.add("lowered")
    return done
