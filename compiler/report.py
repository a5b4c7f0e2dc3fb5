"""Human-readable results: the console table, ``report.md`` and the Pareto plot ``pareto.png``.

All three read the manifest dict (see ``potstill.manifest``), so a report can be rebuilt from a
finished ``OUT/manifest.json`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

Row = Mapping[str, Any]


def _num(value: Any, fmt: str = "{:.3g}") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "—"
    return fmt.format(value)


def human(n: Any) -> str:
    """12_345_678 -> '12.3M'."""
    if n is None:
        return "—"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _latency(row: Row, key: str) -> str:
    """The engine's latency; ``*`` marks PyTorch's (the engine was not timed here), ``!`` a miss
    of the profile's latency budget."""
    lat = row.get("latency_ms")
    if not lat or lat.get(key) is None:
        return "—"
    mark = "*" if lat.get("source") == "pytorch" else ""
    budget = (row.get("budgets") or {}).get("latency_ms")
    if key == "median" and budget and not budget.get("ok"):
        mark += "!"
    return f"{lat[key]:.3f}{mark}"


def _parity(row: Row) -> str:
    par = row.get("parity")
    if not par:
        return "—"
    return f"{'ok' if par['ok'] else 'FAIL'} {par['max_abs']:.0e}"


def table_rows(manifest: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the console table and report.md (teacher first).

    Latency is the engine's on the profile's target (median and 90th percentile); speed-up and
    ``MACs ÷`` are the teacher's value divided by the student's; parity is ok/FAIL against the
    profile's tolerance with the max absolute error.
    """
    header = ["model", "MACs", "params", "p50 ms", "p90 ms", "speed-up", "MACs ÷", "parity", "metric"]
    teacher = manifest["teacher"]
    rows = [[
        "teacher", human(teacher.get("macs")), human(teacher.get("params")), _latency(teacher, "median"),
        _latency(teacher, "p90"), "1.00×", "1.00×", _parity(teacher), _num(teacher.get("metric"), "{:.3f}"),
    ]]  # fmt: skip
    for s in manifest.get("students", []):
        rows.append([
            s["name"], human(s.get("macs")), human(s.get("params")), _latency(s, "median"), _latency(s, "p90"),
            _num(s.get("speedup"), "{:.2f}×"), _num(s.get("macs_reduction"), "{:.2f}×"), _parity(s),
            _num(s.get("metric"), "{:.3f}"),
        ])  # fmt: skip
    robust = [_robust(s.get("robust")) for s in manifest.get("students", [])]
    if any(r != "—" for r in robust):  # robust accuracy, whenever it was measured
        header.append("robust acc")
        rows[0].append("—")
        for row, r in zip(rows[1:], robust):
            row.append(r)
    return header, rows


def _robust(value: Any) -> str:
    """Robust accuracy under PGD: a number, or the first number of its record."""
    if isinstance(value, (int, float)):
        return _num(float(value), "{:.3f}")
    if isinstance(value, Mapping):
        for key in ("robust_accuracy", "accuracy", "robust"):
            if isinstance(value.get(key), (int, float)):
                return _num(float(value[key]), "{:.3f}")
    return "—"


def results_table(manifest: Mapping[str, Any]) -> Any:
    """A rich Table of the teacher and every student."""
    from rich import box
    from rich.table import Table

    profile = manifest.get("profile") or {}
    title = f"potstill: {manifest['teacher'].get('label', 'teacher')} on profile '{profile.get('name', '?')}'"
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    header, rows = table_rows(manifest)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    return t


def _host_line(host: Mapping[str, Any]) -> str:
    if not host:
        return "Host: not recorded."
    return (f"Latency measured on {host.get('cpu', '?')} ({host.get('cpu_count', '?')} CPUs, "
            f"{host.get('torch_threads', '?')} torch threads; {host.get('platform', '?')}"
            + (f"; GPU {host['cuda']}" if host.get("cuda") else "") + ").")


def markdown(manifest: Mapping[str, Any], plot: str | None = "pareto.png") -> str:
    header, rows = table_rows(manifest)
    profile = manifest.get("profile") or {}
    teacher = manifest["teacher"]
    lines = [
        f"# potstill report: {teacher.get('label', 'teacher')}",
        "",
        f"Profile `{profile.get('name', '?')}` (target {profile.get('target', '?')}, precision "
        f"{profile.get('precision', '?')}, threads {profile.get('threads') or 'default'}). "
        f"Created {manifest.get('created', '?')} by potstill {manifest.get('potstill', '?')}. "
        "Latency is the engine's (median, 90th percentile); speed-up and MACs ÷ are teacher ÷ student; "
        "parity is against the profile's tolerance (max absolute error); `*` marks a latency PyTorch "
        "measured (the engine was not timed here), `!` a miss of the profile's latency budget.",
        "",
        _host_line(manifest.get("host") or {}),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    teacher_widths = (teacher.get("architecture") or {}).get("widths", {})
    for s in manifest.get("students", []):
        lines += [f"## {s['name']}", "", f"- folder: `{s.get('dir', '')}`"]
        lines.append(f"- pipeline: `{','.join(s.get('pipeline', []))}`")
        widths = (s.get("architecture") or {}).get("widths", {})
        changed = [f"{k} {teacher_widths[k]}→{v}" for k, v in widths.items() if k in teacher_widths and teacher_widths[k] != v]
        if changed:
            lines.append("- widths: " + ", ".join(changed[:24]) + (" …" if len(changed) > 24 else ""))
        blocks_t = (teacher.get("architecture") or {}).get("blocks", [])
        blocks_s = (s.get("architecture") or {}).get("blocks", [])
        removed = [b for b in blocks_t if b not in blocks_s]
        if removed and blocks_s:
            lines.append("- blocks removed: " + ", ".join(removed))
        files = s.get("files") or {}
        if files:
            lines.append("- files: " + ", ".join(f"`{v}`" for v in files.values()))
        robust = s.get("robust")
        if robust is not None:
            lines.append(f"- robust accuracy (PGD): {robust}")
        for note in s.get("notes", []):
            lines.append(f"- note: {note}")
        lines.append("")
    if plot:
        lines += ["## Pareto front", "", f"![latency vs cost]({plot})", ""]
    return "\n".join(lines)


def write_report(manifest: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``report.md`` and ``pareto.png`` into ``out_dir``; returns the files written."""
    written = []
    png = pareto_plot(manifest, out_dir / "pareto.png")
    if png is not None:
        written.append(png)
    written.append(atomic_write_text(out_dir / "report.md", markdown(manifest, "pareto.png" if png else None)))
    return written


def _points(manifest: Mapping[str, Any]) -> list[tuple[str, bool, Mapping[str, Any]]]:
    pts: list[tuple[str, bool, Mapping[str, Any]]] = [("teacher", True, manifest["teacher"])]
    pts += [(s["name"], False, s) for s in manifest.get("students", [])]
    return pts


def pareto_plot(manifest: Mapping[str, Any], path: Path) -> Path | None:
    """Latency against MACs, params and the metric (where measured); the teacher is a star.

    Without latencies (a TensorRT bundle built elsewhere) the x axis is MACs instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _points(manifest)
    have_latency = all((p.get("latency_ms") or {}).get("median") is not None for _, _, p in pts)
    have_metric = all(p.get("metric") is not None for _, _, p in pts)

    def x_of(p: Mapping[str, Any]) -> float:
        return float(p["latency_ms"]["median"]) if have_latency else float(p.get("macs") or 0) / 1e6

    panels: list[tuple[str, str]] = []
    if have_latency:
        panels.append(("macs", "MACs (M)"))
    panels.append(("params", "parameters (M)"))
    if have_metric:
        panels.append(("metric", "metric"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        scale = 1.0 if key == "metric" else 1e6
        xs: Sequence[float] = [x_of(p) for _, _, p in pts]
        ys: Sequence[float] = [float(p.get(key) or 0) / scale for _, _, p in pts]
        for (name, is_teacher, _), x, y in zip(pts, xs, ys):
            ax.scatter([x], [y], marker="*" if is_teacher else "o", s=160 if is_teacher else 50,
                       color="tab:red" if is_teacher else "tab:blue", zorder=3)  # fmt: skip
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("latency, median (ms)" if have_latency else "MACs (M)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    profile = (manifest.get("profile") or {}).get("name", "?")
    fig.suptitle(f"{manifest['teacher'].get('label', 'teacher')} — profile {profile} (★ teacher)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
