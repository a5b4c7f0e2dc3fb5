"""Re-time compiled students against their teacher's engine, interleaved, without compiling again.

For every student in each OUT folder (``potstill compile ... -o OUT``), the student's ``model.onnx``
is timed in alternating rounds with the teacher's own engine (``prune_cli.teacher_engine``: the
teacher lowered by potstill with ``--pipeline lower.onnxruntime``), on the batch the case's bench
scores speed on: MiniLM 8 sentences x 64 tokens, EfficientNet-Lite0 one photo, SmolLM2 8 x 64 tokens
of prose, digits 32 digits. Sessions are potstill's (``session_options``: pools that sleep between
runs). Use it to re-read speed-ups measured before a timing fix, or on another host.

    .venv/bin/python bench/retime.py minilm /tmp/potstill-real-teachers/minilm/out-none --tag minilm

Writes ``bench/results/retime_TAG.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import prune_cli as P


def _feeds(case: str) -> dict[str, np.ndarray]:
    if case in ("minilm", "smollm2"):
        rng = np.random.default_rng(0)
        ids = rng.integers(100, 20000, size=(8, 64))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if case == "smollm2":
            feeds["position_ids"] = np.broadcast_to(np.arange(64), ids.shape).copy()
        else:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds
    if case == "effnet":
        import prune_effnet_teacher as e

        return {"x": e.heldout_images()[:1].numpy()}
    sys.path.insert(0, str(P.ROOT / "examples"))
    import digits_cnn as d

    return {"x": d._dataset()[2][:32].numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=("minilm", "effnet", "smollm2", "digits"))
    ap.add_argument("outs", nargs="+", metavar="OUT", help="potstill output folders of that case's teacher")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    C.setup()
    from rich.console import Console
    from rich.table import Table

    feeds = _feeds(args.case)
    rows = []
    for out in map(Path, args.outs):
        manifest = json.loads((out / "manifest.json").read_text())
        for s in manifest["students"]:
            onnx = C.student_engine(out, s)
            rows.append({"out": str(out), "student": s["name"], "manifest_speedup": s.get("speedup"),
                         "macs_reduction": s.get("macs_reduction"), **P.interleaved_speedup(args.case, onnx, feeds)})
    table = Table(title=f"{args.case}: students re-timed against the teacher's engine (interleaved)")
    for col in ("OUT", "student", "speed-up", "in the manifest", "MACs ÷", "student ms", "teacher ms"):
        table.add_column(col, justify="left" if col in ("OUT", "student") else "right")
    for r in rows:
        table.add_row(r["out"], r["student"], f"{r['speedup_interleaved']:.2f}×",
                      f"{r['manifest_speedup']:.2f}×" if r["manifest_speedup"] else "—",
                      f"{r['macs_reduction']:.2f}×" if r["macs_reduction"] else "—",
                      f"{r['student_ms']:.2f}", f"{r['teacher_ms']:.2f}")
    Console().print(table)
    name = "retime" + (f"_{args.tag}" if args.tag else f"_{args.case}")
    print("wrote", C.write_json(name, {"command": " ".join(sys.argv), "case": args.case, "rows": rows}))


if __name__ == "__main__":
    main()
