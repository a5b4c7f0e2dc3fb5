"""One model timed against itself: what spinning ONNX Runtime pools do to interleaved speed-ups.

potstill measures every speed-up by timing two sessions in one process, interleaved
(``potstill.targets.timing.time_rounds``). By default an ONNX Runtime intra-op pool spins on its
cores after each run, and the other session then competes with it. This times two sessions of one
and the same model against each other, with spinning pools (ONNX Runtime's default) and with the
pools potstill makes (``potstill.targets.onnxruntime.session_options``: they sleep), ``--trials``
times each. The true speed-up is 1.00x.

    .venv/bin/python bench/timing_spin.py [--trials 8] [--width 8192]

Writes ``bench/results/timing_spin.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def _pair(onnx: bytes, spinning: bool) -> dict[str, Any]:
    import onnxruntime as ort
    from potstill.targets.timing import session_options

    def make() -> Any:
        opts = session_options(C.THREADS)
        if spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "1")
        return ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])

    return {"a": make(), "b": make()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--width", type=int, default=8192, help="hidden width of the 1024 -> width -> 10 MLP")
    args = ap.parse_args()
    C.setup()
    from potstill.targets.timing import time_rounds
    from rich.console import Console
    from rich.table import Table

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 10))
    x = torch.randn(1, 1024)
    onnx = C.onnx_bytes(model.eval(), [x])
    feeds = {"x0": x.numpy()}  # C.onnx_bytes names the inputs x0, x1, ...
    rows = []
    for spinning in (True, False):
        sessions = _pair(onnx, spinning)
        fns = {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
        speedups = []
        for _ in range(args.trials):
            t = time_rounds(fns, rounds=6, per_round=5, warmup=2)
            speedups.append(statistics.median(a / b for a, b in zip(t["a"], t["b"])))
        rows.append({"pools": "spinning (ONNX Runtime default)" if spinning else "sleeping (potstill)",
                     "speedups": speedups, "min": min(speedups), "max": max(speedups),
                     "median": statistics.median(speedups)})
    table = Table(title=f"one model against itself, {args.trials} interleaved readings (true speed-up 1.00x)")
    for col in ("pools", "min", "median", "max"):
        table.add_column(col, justify="left" if col == "pools" else "right")
    for r in rows:
        table.add_row(r["pools"], *(f"{r[k]:.2f}x" for k in ("min", "median", "max")))
    Console().print(table)
    print("wrote", C.write_json("timing_spin", {"width": args.width, "trials": args.trials, "rows": rows}))


if __name__ == "__main__":
    main()
