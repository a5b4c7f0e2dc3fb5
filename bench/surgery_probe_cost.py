"""What the trial surgery (``potstill.ir.surgery_probe``) adds to ``analyze``.

``analyze`` removes one head from every head group of a copy-on-write copy and runs it once on the
example inputs (per attention class again only when that fails). This times the probe alone and
``analyze`` with and without it (interleaved, median of ``--repeat``) on SmolLM2-135M
(``/work/models/smollm2``, 30 attention layers) and on the tiny WavLM the registry sweep builds,
where the probe fails and pins every head group.

    .venv/bin/python bench/surgery_probe_cost.py [--repeat 3]

Writes ``bench/results/surgery_probe_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "compiler"))
SMOLLM2 = Path("/work/models/smollm2")


def _teachers() -> list[tuple[str, Any]]:
    from potstill.inputs.teacher import load_hf_teacher
    from zoo_sweep_lib import build_tiny

    out = []
    if SMOLLM2.is_dir():
        out.append(("SmolLM2-135M", load_hf_teacher(str(SMOLLM2))))
    tiny = Path(tempfile.mkdtemp()) / "wavlm"
    build_tiny("wavlm", "WavLMForSequenceClassification").save_pretrained(tiny)
    out.append(("WavLM (tiny)", load_hf_teacher(str(tiny))))
    return out


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import potstill.ir.surgery_probe as probe
    from potstill.ir.capture import analyze
    from rich.console import Console
    from rich.table import Table

    real = probe.pin_unfollowable_heads
    rows = []
    for name, t in _teachers():
        times: dict[str, list[float]] = {"with": [], "without": [], "probe": []}
        pinned = 0
        for _ in range(args.repeat):
            for label in ("with", "without"):
                probe.pin_unfollowable_heads = real if label == "with" else (lambda *a, **k: [])
                t0 = time.perf_counter()
                a = analyze(t.module, (), t.example_kwargs)
                times[label].append(time.perf_counter() - t0)
            probe.pin_unfollowable_heads = real
            for g in a.groups:
                if g.pinned and "forward fails once a head is removed" in g.pinned:
                    g.pinned = None  # the analysis without the probe must not count as pinned
            t0 = time.perf_counter()
            pinned = len(real(t.module, a, (), t.example_kwargs))
            times["probe"].append(time.perf_counter() - t0)
        heads = sum(g.kind in probe.HEAD_KINDS for g in a.groups)
        rows.append({"model": name, "head_groups": heads, "pinned_by_probe": pinned,
                     **{f"{k}_s": statistics.median(v) for k, v in times.items()}})
    table = Table(title="analyze with and without the trial surgery (median seconds)")
    for col in ("model", "head groups", "pinned by probe", "analyze", "analyze, no probe", "probe alone"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], str(r["head_groups"]), str(r["pinned_by_probe"]), f"{r['with_s']:.2f}",
                      f"{r['without_s']:.2f}", f"{r['probe_s']:.2f}")
    Console(width=120).print(table)
    out = HERE / "results" / "surgery_probe_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"repeat": args.repeat, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
