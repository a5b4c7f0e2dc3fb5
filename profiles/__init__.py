"""Device profiles: a versioned schema, built-in YAML profiles, measured latency tables.

>>> from potstill.profiles import load_profile
>>> p = load_profile("cpu")
>>> p.target, p.precision
('onnxruntime', 'fp32')
"""

from .display import profiles_table
from .latency import estimate_ms, op_latency_ms
from .loader import DEFAULT_PROFILE, list_profiles, load_profile, profile_from_dict, write_profile
from .measure import measure_table, profile_command
from .schema import (
    PROFILE_VERSION,
    DeviceProfile,
    Int8Options,
    OrtOptions,
    Roofline,
    TensorRTOptions,
    Tolerance,
)
from .table import LatencyEntry, LatencyTable

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILE_VERSION",
    "DeviceProfile",
    "Int8Options",
    "LatencyEntry",
    "LatencyTable",
    "OrtOptions",
    "Roofline",
    "TensorRTOptions",
    "Tolerance",
    "estimate_ms",
    "list_profiles",
    "load_profile",
    "measure_table",
    "op_latency_ms",
    "profile_command",
    "profile_from_dict",
    "profiles_table",
    "write_profile",
]
