"""Console rendering of profiles: ``potstill profiles`` prints ``profiles_table()``."""

from __future__ import annotations

from rich.table import Table

from .loader import list_profiles, load_profile


def _flops(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e12:.3g}"


def profiles_table() -> Table:
    """A rich table of the built-in profiles: runtime, precision, device, budgets, roofline."""
    table = Table(title="device profiles (built-in)")
    for col in ("name", "target", "precision", "device", "threads", "batch", "channel ×",
                "peak TFLOP/s", "GB/s", "table", "description"):
        table.add_column(col, justify="right" if col in {"threads", "batch", "channel ×", "peak TFLOP/s", "GB/s"} else "left")
    for name in list_profiles():
        p = load_profile(name)
        roof = p.roofline
        table.add_row(
            p.name, p.target, p.precision, p.device,
            str(p.threads or "all"), str(p.batch or "dynamic"), str(p.channel_multiple),
            _flops(p.peak_flops()), "—" if roof is None else f"{roof.memory_bandwidth_gbs:g}",
            f"{len(p.latency_table.entries)} rows" if p.latency_table else "roofline",
            p.description,
        )
    return table
