"""The console table, report.md and pareto.png from a manifest: fidelity shown, failures flagged."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
from potstill.outputs.report import (
    below_floor,
    markdown,
    pareto_front,
    pareto_plot,
    print_results,
    table_rows,
    warnings,
    write_report,
)


def _fid(score: float | None, task: str = "classification") -> dict[str, Any]:
    if score is None:
        return {"task": task, "score": None, "failed": True, "measures": {"nonfinite": 3.0}, "n": 16}
    return {"task": task, "score": score, "failed": False, "measures": {"top1_agreement": score, "kl": 0.1}, "n": 16}


def manifest(**extra: Any) -> dict[str, Any]:
    teacher = {"label": "net.py:teacher", "macs": 4e6, "params": 1e5, "metric": 0.99,
               "latency_ms": {"median": 2.0, "p90": 2.2}, "parity": {"ok": True, "max_abs": 1e-6}}  # fmt: skip

    def student(name: str, lat: float, fid: dict[str, Any] | None, pipeline: list[str], **kw: Any) -> dict[str, Any]:
        s = {"name": name, "macs": 1e6, "params": 3e4, "latency_ms": {"median": lat, "p90": lat * 1.1},
             "parity": {"ok": True, "max_abs": 1e-6}, "speedup": 2.0 / lat, "macs_reduction": 4.0,
             "metric": 0.9, "pipeline": pipeline, "dir": f"students/{name}", **kw}  # fmt: skip
        if fid is not None:
            s["metrics"] = {"fidelity": fid}
        return s

    students = [
        student("good", 1.0, _fid(0.95), ["importance.obs", "prune.width{ratio=0.3}", "distill{epochs=3}"],
                fidelity_before_distill=_fid(0.7)),
        student("bad", 0.5, _fid(0.42), ["prune.width{ratio=0.7}"]),
        student("nan", 0.8, _fid(None), ["prune.width{ratio=0.5}"]),
        student("slow", 1.5, _fid(0.9), ["prune.width{ratio=0.1}", "distill"]),
    ]
    return {"teacher": teacher, "students": students, "profile": {"name": "cpu", "latency_budget_ms": 1.2},
            "min_fidelity": 0.8, **extra}  # fmt: skip


def test_table_shows_fidelity_before_and_after_distillation_and_flags():
    m = manifest()
    header, rows = table_rows(m)
    assert header[9:13] == ["fidelity", "pre-KD", "KD min", "measures"]
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_name["good"]["fidelity"] == "0.950" and by_name["good"]["pre-KD"] == "0.700"
    assert by_name["good"]["KD min"] == "—"  # no distillation record
    m["students"][0]["metrics"]["distill"] = {"method": "kd", "steps": 40, "minutes_used": 2.34,
                                              "budget_minutes": 2.0, "stopped_by_budget": True}  # fmt: skip
    m["students"][3]["metrics"]["distill"] = {"method": "kd", "steps": 9, "minutes_used": 0.5, "stopped_by_budget": False}
    header, rows = table_rows(m)
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_name["good"]["KD min"] == "2.3 ⏱" and by_name["slow"]["KD min"] == "0.5"
    assert by_name["good"]["measures"] == "(top-1 agr.) KL 0.1"  # the score is the fidelity column
    assert by_name["bad"]["fidelity"] == "0.420 ✗"
    assert by_name["nan"]["fidelity"] == "NaN ✗"
    assert by_name["teacher"]["fidelity"] == "1 (ref)"
    flags = {s["name"]: below_floor(s, 0.8) for s in m["students"]}
    assert flags == {"good": False, "bad": True, "nan": True, "slow": False}


def test_no_before_column_without_a_measurement_before_distillation():
    m = manifest()
    del m["students"][0]["fidelity_before_distill"]
    header, _ = table_rows(m)
    assert "pre-KD" not in header


def test_loud_lines_name_what_failed_and_what_was_not_done():
    m = manifest(calibration={"source": "random", "random": True}, warnings=["something else"])
    m["students"][3]["precision"] = "int8"
    lines = warnings(m)
    text = "\n".join(lines)
    assert "student bad: fidelity 0.420" in text and "below the floor 0.8" in text
    assert "student nan" in text and "NaN" in text
    assert "not distilled: bad, nan" in text
    assert "INT8 students (slow) were calibrated on random inputs" in text and "--calib" in text
    assert lines[-1] == "something else"
    assert not any("student good" in line or "student slow" in line for line in lines)


def test_floor_defaults_and_not_measured_is_said():
    m = manifest()
    del m["min_fidelity"]
    m["students"][0].pop("metrics")
    text = "\n".join(warnings(m))
    assert "student good: fidelity to the teacher was not measured" in text
    assert "student bad" in text  # the default floor (0.8) applies


def test_console_prints_flagged_rows_in_red_and_the_warnings():
    from rich.console import Console

    out_buf, err_buf = io.StringIO(), io.StringIO()
    out = Console(file=out_buf, width=250, force_terminal=True, color_system="truecolor")
    err = Console(file=err_buf, width=250, force_terminal=True, color_system="truecolor")
    print_results(manifest(), out, err)
    table = out_buf.getvalue()
    bad_line = next(line for line in table.splitlines() if "0.420" in line)
    good_line = next(line for line in table.splitlines() if "0.950" in line)
    assert "\x1b[1;31m" in bad_line and "\x1b[1;31m" not in good_line  # bold red
    assert "below the floor" in err_buf.getvalue() and "warning:" in err_buf.getvalue()


def test_markdown_has_fidelity_sections_loud_lines_and_the_right_caption():
    md = markdown(manifest())
    assert "> **⚠ student bad: fidelity 0.420" in md
    assert "| **bad** |" in md and "**0.420 ✗**" in md
    assert "- fidelity (classification, n=16): 0.950; top-1 agr. 0.95, KL 0.1" in md
    assert "- fidelity before distillation: 0.700" in md
    assert "**FAILED: NaN/inf in the outputs**" in md
    assert "![fidelity against measured latency](pareto.png)" in md
    assert "latency vs cost" not in md


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.2)], [3, 0, 1]),
        ([(1.0, 0.9), (1.0, 0.5)], [0]),  # same latency: the better fidelity dominates
        ([(1.0, math.nan), (2.0, 0.5)], [1]),  # NaN never on the front
        ([(2.0, 1.0), (1.0, 1.0)], [1]),  # same fidelity: the faster dominates
    ],
)
def test_pareto_front_is_the_non_dominated_set(points: list[tuple[float, float]], front: list[int]):
    assert pareto_front(points) == front
    for i in front:  # brute force: nothing dominates a front point
        xi, yi = points[i]
        assert not any((x <= xi and y >= yi and (x < xi or y > yi)) for x, y in points if not math.isnan(y))


def test_plot_and_report_are_written(tmp_path: Path):
    written = write_report(manifest(), tmp_path)
    assert {p.name for p in written} == {"pareto.png", "report.md"}
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = manifest()
    for p in (m["teacher"], *m["students"]):
        p["latency_ms"] = None  # not timed: x falls back to MACs, and the axis says so
    macs_png = pareto_plot(m, tmp_path / "macs.png")
    assert macs_png == tmp_path / "macs.png" and macs_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the MACs axis is another picture than the latency one of the same models
    assert macs_png.read_bytes() != (tmp_path / "pareto.png").read_bytes()
    again = pareto_plot(manifest(), tmp_path / "again.png")  # the same models and latencies: the same picture
    assert again is not None and again.read_bytes() == (tmp_path / "pareto.png").read_bytes()


def _ratio_student(m: dict[str, Any], asked: str) -> dict[str, Any]:
    s = m["students"][2]  # nan: macs_reduction 4.0, speedup 2.5
    s.setdefault("metrics", {})["prune"] = {"budget": {"asked": asked}}
    return s


def test_ratio_lines_put_the_achieved_reductions_next_to_the_asked_ratio() -> None:
    from potstill.outputs.report import ratio_lines

    m = manifest()
    _ratio_student(m, "ratio 0.5 of the MACs")
    (line,) = ratio_lines(m)
    assert line == ("nan: --ratio 0.5 asked to remove 50% of the MACs; achieved 75% less MACs (4.00×) and "
                    "60% less measured latency (2.50×)")  # fmt: skip
    header, rows = table_rows(m)
    assert [dict(zip(header, r))["asked"] for r in rows] == ["", "—", "—", "-50% MACs", "—"]
    assert "- " + line in markdown(m)


def test_ratio_lines_say_when_the_latency_table_drove_the_allocation() -> None:
    from potstill.outputs.report import ratio_lines

    m = manifest()
    s = _ratio_student(m, "ratio 0.3 of the latency (table)")
    s["speedup"] = 0.8  # slower than the teacher: said, not hidden
    (line,) = ratio_lines(m)
    assert "asked to remove 30% of the predicted latency" in line and "25% more measured latency (0.80×)" in line
    assert "profile 'cpu' has a latency table, which drove the allocation" in line
    assert dict(zip(*table_rows(m)[:1], table_rows(m)[1][3]))["asked"] == "-30% lat."
