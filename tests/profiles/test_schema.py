"""Profile schema: built-ins load, round trips, and errors that name the file, field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from potstill.errors import InputError
from potstill.profiles import (
    PROFILE_VERSION,
    DeviceProfile,
    list_profiles,
    load_profile,
    profile_from_dict,
    profiles_table,
    write_profile,
)

BUILTINS = {
    "cpu", "x86-avx512-ort", "arm64-cortex-a76-ort", "jetson-orin-nano-trt-fp16",
    "jetson-agx-orin-trt-int8", "h100-trt-fp16", "cuda-aoti",
}


def test_builtins_all_load_with_datasheet_figures() -> None:
    assert set(list_profiles()) >= BUILTINS
    for name in list_profiles():
        p = load_profile(name)
        assert p.name == name
        assert p.version == PROFILE_VERSION
        assert p.roofline is not None and p.peak_flops() is not None and p.peak_flops() > 0
        assert p.roofline.memory_bandwidth_gbs > 0
    cpu = load_profile("cpu")
    assert (cpu.target, cpu.precision, cpu.device, cpu.threads, cpu.channel_multiple) == (
        "onnxruntime", "fp32", "cpu", 2, 8)
    assert cpu.tolerance.max_abs <= 1e-4
    assert load_profile("jetson-agx-orin-trt-int8").precision == "int8"
    assert load_profile("cuda-aoti").target == "aoti"
    assert profiles_table().row_count == len(list_profiles())


def test_round_trip_dict_and_yaml(tmp_path: Path) -> None:
    for name in list_profiles():
        p = load_profile(name)
        assert DeviceProfile.model_validate(p.to_dict()) == p
        path = write_profile(p, tmp_path / f"{name}.yaml")
        assert load_profile(path) == p
        assert load_profile(str(path)) == p


def _write(tmp_path: Path, data: dict, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"name": "x", "target": "onnxruntime", "precision": "fp32"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tolerance": {"max_abs": -1.0, "rel": 1e-3}}, ["field 'tolerance.max_abs'", "greater than 0", "-1.0"]),
        ({"tolerance": {"max_abs": float("inf"), "rel": 1e-3}}, ["field 'tolerance.max_abs'", "finite number"]),
        ({"tolerance": {"max_abs": 1e-3, "rel": float("nan")}}, ["field 'tolerance.rel'", "finite number"]),
        ({"tolerance": {"max_abs": 1e-3, "rel": 1e-3, "atol": 1}}, ["field 'tolerance.atol'", "unknown field",
                                                                     "max_abs, rel"]),
        ({"colour": "red"}, ["field 'colour'", "unknown field", "remove it"]),
        ({"version": 2}, ["field 'version'", "newer than this potstill supports"]),
        ({"target": "tpu"}, ["field 'target'", "'onnxruntime'", "'tensorrt'"]),
        ({"precision": "int4"}, ["field 'precision'", "'int8'"]),
        ({"channel_multiple": 0}, ["field 'channel_multiple'", "greater than or equal to 1"]),
        ({"target": "tensorrt", "device": "cpu"}, ["runs on device 'cuda'"]),
        ({"device": "cuda", "target": "tensorrt", "tensorrt": {"min_batch": 4, "max_batch": 2}},
         ["field 'tensorrt'", "min_batch <= opt_batch <= max_batch"]),
        ({"roofline": {"peak_flops": {"fp32": -5}, "memory_bandwidth_gbs": 1, "memory_gb": 1}},
         ["field 'roofline.peak_flops'", "must be > 0"]),
        ({"input_shapes": [[1, 0, 4]]}, ["field 'input_shapes'", "dims >= 1"]),
    ],
)
def test_bad_profiles_name_file_field_and_fix(tmp_path: Path, change: dict, expected: list[str]) -> None:
    path = _write(tmp_path, {**BASE, **change})
    with pytest.raises(InputError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message
    for text in expected:
        assert text in message, message


def test_missing_name_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="field 'name': required"):
        profile_from_dict({"target": "onnx"}, source="inline")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="a profile is a YAML mapping"):
        load_profile(path)


def test_unknown_profile_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"built-in profiles: .*cpu"):
        load_profile("no-such-device")
    with pytest.raises(InputError, match="no such profile file"):
        load_profile(tmp_path / "absent.yaml")
