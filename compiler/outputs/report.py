"""Human-readable results: the console table, ``report.md`` and the Pareto plot ``pareto.png``.

All three read the manifest dict (see ``potstill.outputs.manifest``), so a report can be rebuilt from a
finished ``OUT/manifest.json`` alone. Manifest fields read besides cost, latency and parity:

* a student's ``fidelity`` (``potstill.fidelity.Fidelity.to_dict()``; also found under
  ``metrics.fidelity``) and ``fidelity_before_distill`` when it was measured before distillation;
* ``min_fidelity`` (or the profile's): the floor a student's fidelity score must reach (default
  ``potstill.fidelity.DEFAULT_MIN_FIDELITY``); a student below it, or with a NaN score, is flagged;
* ``inputs.calib.random`` (or ``calibration.random``): True when no calibration data existed;
  ``warnings``: extra lines to show loudly.

The plot is fidelity (and the user's metric, when measured) against the *measured* latency of each
engine; the front drawn is the set of models no other model beats on both axes (lower latency,
higher fidelity), and the latency budget and the fidelity floor are drawn as lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from potstill.outputs.atomic import atomic_write_text

Row = Mapping[str, Any]

#: short labels of fidelity measures for tables
MEASURE_LABELS = {
    "top1_agreement": "top-1 agr.", "kl": "KL", "teacher_accuracy": "teacher acc.", "student_accuracy": "acc.",
    "cosine": "cosine", "nn_agreement": "NN agr.", "next_token_agreement": "next-token agr.",
    "ppl_ratio": "ppl ratio", "rel_error": "rel. error", "max_abs": "max abs", "nonfinite": "non-finite",
}  # fmt: skip


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


# ---------------------------------------------------------------------------------------------
# Fidelity fields


def fidelity_of(entry: Row, key: str = "fidelity") -> Mapping[str, Any] | None:
    """A student's fidelity record (``key``, or ``metrics[key]``), or None when not measured."""
    value = entry.get(key)
    if value is None:
        value = (entry.get("metrics") or {}).get(key)
    return value if isinstance(value, Mapping) else None


def floor_of(manifest: Mapping[str, Any]) -> float:
    """The fidelity floor of this run (``min_fidelity``, else the default)."""
    from potstill.fidelity import DEFAULT_MIN_FIDELITY

    value = manifest.get("min_fidelity")
    if value is None:
        value = (manifest.get("profile") or {}).get("min_fidelity")
    return DEFAULT_MIN_FIDELITY if value is None else float(value)


def _score(fid: Mapping[str, Any] | None) -> float | None:
    """The score, NaN for a failed measurement, None when not measured."""
    if fid is None:
        return None
    score = fid.get("score")
    return math.nan if score is None or fid.get("failed") else float(score)


def below_floor(entry: Row, floor: float) -> bool:
    """True when the student's fidelity was measured and is NaN or below ``floor``."""
    score = _score(fidelity_of(entry))
    return score is not None and (math.isnan(score) or score < floor)


def _fid_cell(fid: Mapping[str, Any] | None, floor: float | None = None) -> str:
    score = _score(fid)
    if score is None:
        return "—"
    if math.isnan(score):
        return "NaN ✗"
    flag = " ✗" if floor is not None and score < floor else ""
    return f"{score:.3f}{flag}"


def measures_text(fid: Mapping[str, Any] | None, *, secondary: bool = False) -> str:
    """``'top-1 agr. 0.969, KL 0.042'``: every measure of the record, or only those besides the
    score (``secondary``), prefixed by the score's measure name."""
    if fid is None:
        return "—"
    from potstill.fidelity import PRIMARY

    primary = PRIMARY.get(str(fid.get("task")))
    parts = [f"({MEASURE_LABELS.get(primary, primary)})"] if secondary and primary in MEASURE_LABELS else []
    for k, v in (fid.get("measures") or {}).items():
        if not (secondary and k == primary):
            parts.append(f"{MEASURE_LABELS.get(k, k)} {'NaN' if v is None else f'{v:.3g}'}")
    return ", ".join(parts).replace("), ", ") ") or "—"


# ---------------------------------------------------------------------------------------------
# Loud lines


def warnings(manifest: Mapping[str, Any]) -> list[str]:
    """What the console must say loudly (and report.md repeats): failures and things not done."""
    floor = floor_of(manifest)
    lines: list[str] = []
    for s in manifest.get("students", []):
        fid = fidelity_of(s)
        score = _score(fid)
        if score is None:
            lines.append(f"student {s['name']}: fidelity to the teacher was not measured")
        elif math.isnan(score):
            lines.append(f"student {s['name']}: its outputs contain NaN/inf; it does not compute what the teacher does")
        elif score < floor:
            assert fid is not None
            lines.append(
                f"student {s['name']}: fidelity {score:.3f} ({fid.get('task')}: {measures_text(fid)}) is below the "
                f"floor {floor:g}; it no longer does the teacher's job (distil it, prune less, or lower the floor "
                "with --min-fidelity)"
            )
    undistilled = [s["name"] for s in manifest.get("students", []) if not _distilled(s)]
    if undistilled:
        lines.append(
            f"not distilled: {', '.join(undistilled)} (no training step ran; give --data FILE.py:FN or a .txt corpus "
            "to distil, unless --no-distill was meant). Their fidelity shows what pruning alone did."
        )
    shortfalls = {}
    for s in manifest.get("students", []):
        el = (s.get("metrics") or {}).get("elastic") or {}
        if el.get("shortfall"):
            shortfalls[el.get("profile")] = el["shortfall"]
    for profile, short in shortfalls.items():
        lines.append(f"elastic search on {profile}: {short['emitted']} of the {short['requested']} students asked for "
                     f"(--students) were emitted: {short['why']}")  # fmt: skip
    noisy = [f"{s['name']} ({speedup_text(t)})" for s in manifest.get("students", [])
             if (t := ((s.get("metrics") or {}).get("elastic") or {}).get("speedup_timing")) and not t.get("decided")]
    if noisy:
        lines.append("the host was too noisy to decide the speed-up budget of " + ", ".join(noisy) + ": the spread "
                     "of the interleaved rounds straddles the budget, so the verdict fell to the median; re-run on a "
                     "quieter host to confirm")
    calib = manifest.get("calibration") or (manifest.get("inputs") or {}).get("calib") or {}
    if calib.get("random"):
        int8 = [s["name"] for s in manifest.get("students", []) if s.get("precision") == "int8"]
        what = f"INT8 students ({', '.join(int8)}) were calibrated" if int8 else "importance and statistics were computed"
        lines.append(f"{what} on random inputs, not real data, and fidelity was measured on random inputs: "
                     "give --calib.")  # fmt: skip
    lines += [str(w) for w in manifest.get("warnings", [])]
    return lines


def speedup_text(t: Mapping[str, Any]) -> str:
    """``2.31x (IQR 2.20-2.40, 7 rounds): 0.118 ms vs the teacher's 0.272 ms`` from a speed-up reading."""
    lo, hi = t["speedup_iqr"]
    return (f"{t['speedup']:.2f}x (IQR {lo:.2f}-{hi:.2f}, {t['rounds']} rounds interleaved with the teacher): "
            f"{t['ms']:.3g} ms vs the teacher's {t['teacher_ms']:.3g} ms")


def _distilled(entry: Row) -> bool:
    """A training step ran: ``distill`` or ``elastic.train`` (the sandwich-rule KD), unless ``epochs=0``."""
    for step in map(str, entry.get("pipeline", [])):
        name, _, options = step.partition("{")
        if name in ("distill", "elastic.train") and "epochs=0}" not in options and "epochs=0," not in options:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The table


def table_rows(manifest: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the console table and report.md (teacher first; a student whose
    engine is INT8 is named with `` int8``).

    ``asked`` is what ``--ratio`` asked to remove (``-50% MACs``, or ``-50% lat.`` where the
    profile's latency table made it a fraction of the predicted latency; see ``ratio_lines``).
    Latency is the engine's on the profile's target (median and 90th percentile); speed-up is the
    student's engine timed in rounds interleaved with the teacher's (``speedup_method``; else the
    ratio of the two medians) and ``MACs ÷`` the teacher's MACs divided by the student's; parity is ok/FAIL against the
    profile's tolerance with the max absolute error; fidelity is the score against the teacher on
    held-out data (✗: below the floor or NaN), ``pre-KD`` the same before distillation and ``KD min``
    the minutes distillation trained (``⏱``: its ``--train-minutes`` budget stopped it).
    """
    floor = floor_of(manifest)
    students = manifest.get("students", [])
    before = any(fidelity_of(s, "fidelity_before_distill") for s in students)
    header = ["model", "asked", "MACs", "params", "p50 ms", "p90 ms", "speed-up", "MACs ÷", "parity", "fidelity"]
    header += ["pre-KD", "KD min"] if before else []
    header += ["measures", "metric"]
    teacher = manifest["teacher"]
    rows = [[
        "teacher", "", human(teacher.get("macs")), human(teacher.get("params")), _latency(teacher, "median"),
        _latency(teacher, "p90"), "1.00×", "1.00×", _parity(teacher), "1 (ref)", *(["", ""] if before else []), "",
        _num(teacher.get("metric"), "{:.3f}"),
    ]]  # fmt: skip
    for s in students:
        fid = fidelity_of(s)
        name = s["name"] + (" int8" if s.get("precision") == "int8" else "")
        rows.append([
            name, _asked_cell(s), human(s.get("macs")), human(s.get("params")), _latency(s, "median"), _latency(s, "p90"),
            _num(s.get("speedup"), "{:.2f}×"), _num(s.get("macs_reduction"), "{:.2f}×"), _parity(s),
            _fid_cell(fid, floor), *([_fid_cell(fidelity_of(s, "fidelity_before_distill")), _train_minutes(s)] if before else []),
            measures_text(fid, secondary=True), _num(s.get("metric"), "{:.3f}"),
        ])  # fmt: skip
    robust = [_robust(s.get("robust")) for s in manifest.get("students", [])]
    if any(r != "—" for r in robust):  # robust accuracy, whenever it was measured
        header.append("robust acc")
        rows[0].append("—")
        for row, r in zip(rows[1:], robust):
            row.append(r)
    return header, rows


def _distill_record(s: Row) -> Mapping[str, Any]:
    record = (s.get("metrics") or {}).get("distill")
    return record if isinstance(record, Mapping) else {}


def _train_minutes(s: Row) -> str:
    """Minutes the student's distillation trained, ``⏱`` when its time budget stopped it."""
    d = _distill_record(s)
    used = d.get("minutes_used")
    if not isinstance(used, (int, float)):
        return "—"
    return f"{used:.1f}" + (" ⏱" if d.get("stopped_by_budget") else "")


def asked_ratio(s: Row) -> tuple[float, str] | None:
    """(ratio, "MACs", "latency" or "sublayers") that ``prune.width{ratio=R}`` was asked for, from its record."""
    budget = ((s.get("metrics") or {}).get("prune") or {}).get("budget") or {}
    # "of the MACs", "of the latency" (a profile's table), "of the sublayers' latency" (the host-timed search)
    m = re.fullmatch(r"ratio ([0-9.eE+-]+) of the (MACs|latency|sublayers' latency).*", str(budget.get("asked", "")))
    return (float(m.group(1)), m.group(2).split()[0].rstrip("'")) if m else None


def _asked_cell(s: Row) -> str:
    asked = asked_ratio(s)
    if asked is None:
        return "—"
    return f"-{asked[0]:.0%} {'MACs' if asked[1] == 'MACs' else 'lat.'}"


def _change(factor: Any, what: str) -> str:
    """A teacher ÷ student factor as the fraction removed: 2.0 -> "50 % fewer MACs"."""
    if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        return f"{what}: not measured"
    cut = 1 - 1 / factor
    return f"{abs(cut):.0%} {'less' if cut >= 0 else 'more'} {what} ({factor:.2f}×)"


def ratio_lines(manifest: Mapping[str, Any]) -> list[str]:
    """One line per student built from ``--ratio``: the ratio asked next to the achieved MACs and
    measured latency reductions, and a note where the profile's latency table drove the allocation
    (its ratio is a fraction of the *predicted latency*, so the MACs cut differs from it)."""
    lines = []
    for s in manifest.get("students", []):
        asked = asked_ratio(s)
        if asked is None:
            continue
        ratio, of = asked
        of_text = {"MACs": "MACs", "latency": "predicted latency"}.get(of, "sublayers' latency measured on this host")
        line = (f"{s['name']}: --ratio {ratio:g} asked to remove {ratio:.0%} of the {of_text}; achieved "
                f"{_change(s.get('macs_reduction'), 'MACs')} and {_change(s.get('speedup'), 'measured latency')}")
        if of == "latency":
            line += (f"; profile '{(manifest.get('profile') or {}).get('name', '?')}' has a latency table, which "
                     "drove the allocation, so the MACs removed differ from the ratio")
        if of == "sublayers":
            line += ("; heads and neurons were allocated by Kwon et al.'s latency search on sublayer latencies "
                     "timed on this host, so the MACs removed differ from the ratio")
        lines.append(line)
    return lines


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
    """A rich Table of the teacher and every student; a student below the fidelity floor in red.

    The measures behind each fidelity score are listed under the table (the caption); the 90th
    percentile latency and the parity error are in report.md. The table fits 80 columns.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    profile = manifest.get("profile") or {}
    floor = floor_of(manifest)
    title = f"potstill: {manifest['teacher'].get('label', 'teacher')} on profile '{profile.get('name', '?')}'"
    header, rows = table_rows(manifest)
    keep = [i for i, h in enumerate(header) if h not in ("measures", "p90 ms")]  # both are in report.md
    students = manifest.get("students", [])
    flagged = [False] + [below_floor(s, floor) for s in students]
    caption = Text(f"fidelity to the teacher on held-out data (floor {floor:g}, ✗ below):", justify="left")
    for s, bad in zip(students, flagged[1:]):
        fid = fidelity_of(s)
        task = f"{fid.get('task')}, " if fid else ""
        caption.append(f"\n  {s['name']}: {task}{measures_text(fid)}", style="bold red" if bad else None)
    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
              padding=0)  # fmt: skip
    for i in keep:
        t.add_column(header[i], justify="left" if i == 0 else "right", no_wrap=True, min_width=len(header[i]))
    for row, bad in zip(rows, flagged):
        cells = [row[i].split(" ")[0] if header[i] == "parity" else row[i] for i in keep]  # ok / FAIL
        t.add_row(*cells, style="bold red" if bad else None)
    return t


def _host_line(host: Mapping[str, Any]) -> str:
    if not host:
        return "Host: not recorded."
    return (f"Latency measured on {host.get('cpu', '?')} ({host.get('cpu_count', '?')} CPUs, "
            f"{host.get('torch_threads', '?')} torch threads; {host.get('platform', '?')}"
            + (f"; GPU {host['cuda']}" if host.get("cuda") else "") + ").")


def print_results(manifest: Mapping[str, Any], out: Any, err: Any) -> None:
    """Print the table on ``out`` and the loud lines on ``err`` (rich consoles), as the CLI does."""
    out.print(results_table(manifest))
    for line in ratio_lines(manifest):
        out.print(_escape(line), soft_wrap=True, highlight=False)
    for line in warnings(manifest):
        err.print(f"[bold red]warning:[/] {_escape(line)}", soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ---------------------------------------------------------------------------------------------
# report.md


def markdown(manifest: Mapping[str, Any], plot: str | None = "pareto.png") -> str:
    header, rows = table_rows(manifest)
    profile = manifest.get("profile") or {}
    teacher = manifest["teacher"]
    floor = floor_of(manifest)
    lines = [
        f"# potstill report: {teacher.get('label', 'teacher')}",
        "",
        f"Profile `{profile.get('name', '?')}` (target {profile.get('target', '?')}, precision "
        f"{profile.get('precision', '?')}, threads {profile.get('threads') or 'default'}). "
        f"Created {manifest.get('created', '?')} by potstill {manifest.get('potstill', '?')}. "
        "Latency is the engine's (median, 90th percentile); speed-up is teacher ÷ student, each student's "
        "engine timed in rounds interleaved with the teacher's where both run in this process (else the two "
        "medians, timed apart); MACs ÷ is teacher ÷ student; "
        "parity is against the profile's tolerance (max absolute error); `*` marks a latency PyTorch "
        "measured (the engine was not timed here), `!` a miss of the profile's latency budget. Fidelity is "
        "each student's score against the teacher on held-out calibration data (1 = identical); the floor "
        f"is {floor:g} and ✗ marks a student below it.",
        "",
        _host_line(manifest.get("host") or {}),
        "",
    ]
    loud = warnings(manifest)
    if loud:
        lines += [f"> **⚠ {line}**" + ("  " if i < len(loud) - 1 else "") for i, line in enumerate(loud)]
        lines.append("")
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:" if h != "measures" else "---" for h in header[1:]]) + "|",
    ]
    flagged = [False] + [below_floor(s, floor) for s in manifest.get("students", [])]
    for r, bad in zip(rows, flagged):
        cells = [f"**{c}**" if bad and c and c != "—" else c for c in r]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    ratios = ratio_lines(manifest)
    if ratios:
        lines += [f"- {line}" for line in ratios] + [""]
    teacher_widths = (teacher.get("architecture") or {}).get("widths", {})
    for s in manifest.get("students", []):
        lines += [f"## {s['name']}", "", f"- folder: `{s.get('dir', '')}`"]
        lines.append(f"- pipeline: `{','.join(s.get('pipeline', []))}`")
        lines += _fidelity_lines(s, floor)
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
        timing = ((s.get("metrics") or {}).get("elastic") or {}).get("speedup_timing")
        if timing:
            verdict = "met" if timing["speedup"] >= (timing["threshold"] or 0) else "missed"
            lines.append(f"- speed-up over the teacher: {speedup_text(timing)}; budget {timing['threshold']:.3g}x "
                         f"(after tolerance) {verdict}" + ("" if timing["decided"] else ", too noisy to decide"))
        robust = s.get("robust")
        if robust is not None:
            lines.append(f"- robust accuracy (PGD): {robust}")
        for note in s.get("notes", []):
            lines.append(f"- note: {note}")
        lines.append("")
    if plot:
        lines += [
            "## Fidelity against measured latency",
            "",
            "Each engine's median latency on the profile's target (x) against its fidelity to the teacher "
            "(and the metric, when one was given); the line joins the models no other model beats on both; "
            "dashed lines are the latency budget and the fidelity floor.",
            "",
            f"![fidelity against measured latency]({plot})",
            "",
        ]
    return "\n".join(lines)


def _fidelity_lines(s: Row, floor: float) -> list[str]:
    fid = fidelity_of(s)
    if fid is None:
        return ["- fidelity: **not measured**"]
    score = _score(fid)
    verdict = ("**FAILED: NaN/inf in the outputs**" if score is None or math.isnan(score)
               else f"**{score:.3f}, below the floor {floor:g}**" if score < floor else f"{score:.3f}")  # fmt: skip
    out = [f"- fidelity ({fid.get('task')}, n={fid.get('n')}): {verdict}; {measures_text(fid)}"]
    before = fidelity_of(s, "fidelity_before_distill")
    if before is not None:
        out.append(f"- fidelity before distillation: {_fid_cell(before)}; {measures_text(before)}")
    d = _distill_record(s)
    if d.get("steps") is not None:
        budget = d.get("budget_minutes")
        why = (f"stopped by its {budget:g}-minute budget" if d.get("stopped_by_budget") else
               f"within its {budget:g}-minute budget" if budget else "no time budget")  # fmt: skip
        out.append(f"- distillation: {d.get('method')}, {d['steps']} steps in {float(d.get('minutes_used') or 0):.1f} min "
                   f"({why}); augmented images: {'yes' if d.get('augment') else 'no'}")  # fmt: skip
    return out


def write_report(manifest: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``report.md`` and ``pareto.png`` into ``out_dir``; returns the files written."""
    written = []
    png = pareto_plot(manifest, out_dir / "pareto.png")
    if png is not None:
        written.append(png)
    written.append(atomic_write_text(out_dir / "report.md", markdown(manifest, "pareto.png" if png else None)))
    return written


# ---------------------------------------------------------------------------------------------
# The Pareto plot


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, by increasing x, for minimising x and maximising y.

    A point is dominated when another has x <= and y >= with one of them strict. NaN points are
    never on the front.

    >>> pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.2), (2.0, 0.9)])
    [3, 0, 1]
    """
    order = sorted((i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))),
                   key=lambda i: (points[i][0], -points[i][1]))  # fmt: skip
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _points(manifest: Mapping[str, Any]) -> list[tuple[str, bool, Mapping[str, Any]]]:
    pts: list[tuple[str, bool, Mapping[str, Any]]] = [("teacher", True, manifest["teacher"])]
    pts += [(s["name"], False, s) for s in manifest.get("students", [])]
    return pts


def pareto_plot(manifest: Mapping[str, Any], path: Path) -> Path | None:
    """Fidelity (and the metric, when every model has one) against measured latency; the teacher is a star.

    Without latencies (a TensorRT bundle built elsewhere) the x axis is MACs, and the axis says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _points(manifest)
    floor = floor_of(manifest)
    have_latency = all((p.get("latency_ms") or {}).get("median") is not None for _, _, p in pts)
    have_metric = all(p.get("metric") is not None for _, _, p in pts)
    budget = (manifest.get("profile") or {}).get("latency_budget_ms") if have_latency else None

    def x_of(p: Mapping[str, Any]) -> float:
        return float(p["latency_ms"]["median"]) if have_latency else float(p.get("macs") or 0) / 1e6

    def fidelity_y(p: Mapping[str, Any], is_teacher: bool) -> float:
        if is_teacher:
            return 1.0
        score = _score(fidelity_of(p))
        return math.nan if score is None else score

    panels: list[tuple[str, str, float | None]] = [("fidelity", "fidelity to the teacher (held-out)", floor)]
    if have_metric:
        panels.append(("metric", "metric", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    xs = [x_of(p) for _, _, p in pts]
    for ax, (key, label, hline) in zip(axes[0], panels):
        ys = [fidelity_y(p, t) if key == "fidelity" else float(p["metric"]) for _, t, p in pts]
        bottom = min([y for y in ys if not math.isnan(y)] + ([hline] if hline is not None else []), default=0.0)
        for (name, is_teacher, _), x, y in zip(pts, xs, ys):
            failed = math.isnan(y)
            below = key == "fidelity" and not is_teacher and (failed or y < floor)
            y_plot = bottom if failed else y
            ax.scatter([x], [y_plot], marker="*" if is_teacher else ("x" if failed else "o"),
                       s=170 if is_teacher else 55, zorder=3,
                       color="tab:orange" if is_teacher else ("tab:red" if below else "tab:blue"))  # fmt: skip
            ax.annotate(name + (" (NaN)" if failed else ""), (x, y_plot), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)  # fmt: skip
        front = pareto_front(list(zip(xs, ys)))
        if len(front) > 1:
            fx, fy = [xs[i] for i in front], [ys[i] for i in front]
            ax.step(fx, fy, where="post", color="tab:green", alpha=0.7, zorder=2, label="non-dominated front")
        if hline is not None:
            ax.axhline(hline, color="tab:red", linestyle="--", linewidth=1, label=f"fidelity floor {hline:g}")
        if budget is not None:
            ax.axvline(float(budget), color="tab:purple", linestyle="--", linewidth=1,
                       label=f"latency budget {float(budget):g} ms")  # fmt: skip
        ax.set_xlabel("measured latency, median (ms)" if have_latency else "MACs (M) — latency not measured")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    profile = (manifest.get("profile") or {}).get("name", "?")
    what = "fidelity" + (" and metric" if have_metric else "")
    x_what = "measured latency" if have_latency else "MACs"
    fig.suptitle(f"{manifest['teacher'].get('label', 'teacher')}: {what} vs {x_what}, profile {profile} (★ teacher)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
