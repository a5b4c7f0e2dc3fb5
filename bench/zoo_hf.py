"""The Hugging Face generality zoo as a table: 25 tiny random-weight families compiled with
``--ratio 0.5 --no-distill``, reloaded through ``potstill.load_student`` (and ``AutoModel`` where
promised) and checked against their ONNX engine on fresh inputs of another batch and sequence length.

Columns: family, coupled groups, pinned groups (with reasons in the JSON), MACs before/after,
loaders, engine max|error| and wall time. The same check runs in tests/compiler/test_zoo_hf_*.py.

    .venv/bin/python bench/zoo_hf.py [--only bert llama ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "compiler"))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from zoo_hf_families import FAMILIES, compile_and_check

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--json", default=str(HERE / "results" / "zoo_hf.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in FAMILIES:
            if args.only and name not in args.only:
                continue
            t0 = time.time()
            try:
                row = compile_and_check(name, Path(d), args.ratio)
            except Exception as e:  # tabulated: the table is the point
                row = {"family": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "notes"}, default=str)[:400], flush=True)
    table = Table(title=f"HF zoo: potstill compile --ratio {args.ratio} --no-distill")
    for col in ("family", "groups", "pinned", "MACs before", "MACs after", "cut", "reload", "engine |err|", "s"):
        table.add_column(col, justify="left" if col in ("family", "reload") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["family"], *["-"] * 6, r["error"][:40], str(r["wall_s"]))
            continue
        cut = 1 - r["macs_after"] / r["macs_before"]
        table.add_row(r["family"], str(r["groups"]), str(len(r["pinned"])), f"{r['macs_before'] / 1e6:.2f}M",
                      f"{r['macs_after'] / 1e6:.2f}M", f"{cut:.0%}", " + ".join(r["loaders"]),
                      f"{r['engine_max_abs']:.1e}", str(r["wall_s"]))
    Console(width=180).print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
