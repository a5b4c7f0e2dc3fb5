"""BatchNorm re-estimation on the digits CNN: width-pruned students with and without ``bn.recalibrate``.

For each ratio and estimator the teacher (examples/digits_cnn.py) is pruned by
``importance.<est>,prune.width{ratio=R}`` and, in a second student, followed by ``bn.recalibrate``
on the calibration split of the teacher file's ``calib_data`` (8 batches of 32 training digits; the
held-out quarter is never seen). Reported: test accuracy (360 held-out digits), and fidelity to the
teacher (top-1 agreement, KL) on the held-out calibration batches. No training anywhere.

    nice -n 10 .venv/bin/python bench/fidelity_bn.py [--ratios 0.3 0.5] [--importance magnitude obs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_cnn as D

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def student(ratio: float, importance: str, bn: bool, calib: object) -> torch.nn.Module:
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState

    teacher = D.teacher()
    state = CompileState(teacher=teacher, example_inputs=D.example_inputs(), calib_data=calib)  # type: ignore[arg-type]
    spec = f"importance.{importance},prune.width{{ratio={ratio:g}}}" + (",bn.recalibrate" if bn else "")
    state = PassManager(build_pipeline(spec)).run(state).state
    return state.working().module


def main() -> None:
    from potstill.fidelity import measure_fidelity, split_source
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--importance", nargs="+", default=["magnitude"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    calib, heldout = split_source(D.calib_data)
    teacher = D.teacher()
    rows = [{"student": "teacher", "accuracy": D.metric(teacher)}]
    for ratio in args.ratios:
        for imp in args.importance:
            for bn in (False, True):
                t0 = time.perf_counter()
                s = student(ratio, imp, bn, calib)
                fid = measure_fidelity(teacher, s, heldout)
                rows.append({
                    "student": f"macs{round(ratio * 100)} {imp}" + (" + bn.recalibrate" if bn else ""),
                    "ratio": ratio, "importance": imp, "bn_recalibrate": bn, "accuracy": D.metric(s),
                    "fidelity": fid.to_dict(), "seconds": round(time.perf_counter() - t0, 2),
                })  # fmt: skip
    table = Table(title="digits CNN: width pruning with / without BatchNorm re-estimation (no training)")
    for col in ("student", "test accuracy", "top-1 agreement", "KL", "seconds"):
        table.add_column(col, justify="left" if col == "student" else "right")
    for r in rows:
        f = r.get("fidelity") or {"measures": {}}
        m = f["measures"]
        table.add_row(
            str(r["student"]), f"{r['accuracy']:.3f}", f"{m['top1_agreement']:.3f}" if m else "—",
            f"{m['kl']:.3f}" if m else "—", str(r.get("seconds", "—")),
        )  # fmt: skip
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fidelity_bn.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
