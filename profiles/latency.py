"""Latency estimates: the measured table where a profile has one, else the roofline.

Roofline (Williams et al. 2009): a layer takes at least ``max(2·MACs / peak_FLOPs,
bytes / bandwidth)`` — compute-bound or memory-bound, whichever is slower — at the profile's
precision. It is a lower bound from datasheet figures; a measured table is preferred, and
``op_latency_ms`` says which of the two answered.
"""

from __future__ import annotations

from typing import Any

from potstill.errors import InputError

from .schema import DeviceProfile

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def estimate_ms(macs: float, bytes_moved: float, profile: DeviceProfile) -> float:
    """Roofline latency in ms of work with ``macs`` multiply-adds moving ``bytes_moved`` bytes."""
    flops = profile.peak_flops()
    if profile.roofline is None or flops is None:
        raise InputError(
            f"profile '{profile.name}' has neither a latency table nor roofline figures; add "
            "'roofline: {peak_flops: {fp32: ...}, memory_bandwidth_gbs: ..., memory_gb: ...}' or "
            "measure a table with `potstill profile`"
        )
    compute_s = 2.0 * macs / flops
    memory_s = bytes_moved / (profile.roofline.memory_bandwidth_gbs * 1e9)
    return 1e3 * max(compute_s, memory_s)


def op_cost(op: str, precision: str = "fp32", **shape: Any) -> tuple[float, float]:
    """(MACs, bytes moved) of one ``conv2d`` or ``linear`` at batch 1."""
    elem = BYTES_PER_ELEMENT.get(precision, 4)
    cin, cout = int(shape["cin"]), int(shape["cout"])
    if op == "conv2d":
        k, hw = int(shape.get("kernel", 3)), int(shape.get("hw", 56))
        groups, stride = int(shape.get("groups", 1)), int(shape.get("stride", 1))
        out_hw = max(1, hw // stride)
        weights = cin // groups * cout * k * k
        macs = weights * out_hw * out_hw
        moved = elem * (cin * hw * hw + cout * out_hw * out_hw + weights)
        return float(macs), float(moved)
    if op == "linear":
        tokens = int(shape.get("tokens", 1))
        return float(tokens * cin * cout), float(elem * (tokens * (cin + cout) + cin * cout))
    raise InputError(f"no cost formula for op '{op}'; ops: conv2d, linear")


def op_latency_ms(profile: DeviceProfile, op: str, **shape: Any) -> tuple[float, str]:
    """Latency of one op on the profile's device and where it came from: ``"table"`` or ``"roofline"``."""
    table = profile.latency_table
    if table is not None and op in table.ops():
        return table.lookup(op, **shape), "table"
    macs, moved = op_cost(op, profile.precision, **shape)
    return estimate_ms(macs, moved, profile), "roofline"
