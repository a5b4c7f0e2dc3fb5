"""Load, list and write device profiles (built-in YAML files or user files).

``load_profile("cpu")`` reads the built-in ``profiles/cpu.yaml``; ``load_profile("my.yaml")`` reads a
file. Validation errors become ``InputError`` messages naming the file, the field path and the fix,
e.g. ``my.yaml: field 'tolerance.max_abs': Input should be greater than 0 (got -1)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from potstill.errors import InputError
from potstill.outputs.atomic import atomic_write_text
from pydantic import ValidationError

from .schema import DeviceProfile

BUILTIN_DIR = Path(__file__).resolve().parent
DEFAULT_PROFILE = "cpu"


def list_profiles() -> list[str]:
    """Names of the built-in profiles (the YAML files shipped with the package)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or os.sep in text or path.exists():
        if not path.is_file():
            raise InputError(f"{path}: no such profile file; built-in profiles: {', '.join(list_profiles())}")
        return path
    builtin = BUILTIN_DIR / f"{text}.yaml"
    if not builtin.is_file():
        raise InputError(
            f"unknown profile '{text}'; built-in profiles: {', '.join(list_profiles())} "
            "(or give a path to a .yaml file)"
        )
    return builtin


def load_profile(name_or_path: str | os.PathLike[str] | DeviceProfile = DEFAULT_PROFILE) -> DeviceProfile:
    """A built-in profile by name, or a profile YAML file by path, validated."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    path = _resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: a profile is a YAML mapping (name: ..., target: ...), got {type(data).__name__}")
    return profile_from_dict(data, source=str(path))


def profile_from_dict(data: dict[str, Any], source: str = "<dict>") -> DeviceProfile:
    """Validate a dict into a ``DeviceProfile``; errors name ``source`` and the field path."""
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise InputError(format_validation_error(e, source)) from e


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = DeviceProfile
            fix = f"remove it (known fields: {', '.join(_known_fields(parent, err['loc'][:-1]))})"
            lines.append(f"{source}: field '{loc}': unknown field; {fix}")
            continue
        if kind == "missing":
            lines.append(f"{source}: field '{loc}': required; add it")
            continue
        got = err.get("input")
        got_text = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: field '{loc}': {msg}{got_text}")
    return "invalid profile:\n  " + "\n  ".join(lines)


def _known_fields(model: type, loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        args = getattr(annotation, "__args__", ())
        current = next((a for a in (annotation, *args) if hasattr(a, "model_fields")), None)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def profile_to_yaml(profile: DeviceProfile, header: str = "") -> str:
    body = yaml.safe_dump(profile.to_dict(), sort_keys=False, default_flow_style=None, width=100)
    return (header + body) if header else body


def write_profile(profile: DeviceProfile, path: str | os.PathLike[str], header: str = "") -> Path:
    """Write ``profile`` as YAML atomically; ``load_profile(path)`` reads it back unchanged."""
    return atomic_write_text(path, profile_to_yaml(profile, header))
