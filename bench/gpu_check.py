"""GPU check (stand-alone: needs only torch with CUDA): teacher vs pruned student, and AOTInductor CUDA.

1. A ResNet-18-shaped CNN (teacher) and the same network channel-pruned to 0.5 width (student),
   timed on the GPU at batch 1 and 32 (224x224) in FP32 and FP16: eager, CUDA graphs, and
   ``torch.compile`` — CUDA-event timing, warm-up then median/p90.
2. AOTInductor on CUDA: compile a package (two-layer MLP, then the student CNN), then load and run it
   in a child process so a crash (seen before: a segfault while loading) is reported with its
   signal instead of killing this script; parity against eager.

Writes ``$OUT/gpu_check.json`` (``$OUT`` or the current directory) and prints a table. Time-boxed to
stay under ~5 minutes: stages that would start after the budget are skipped and marked so.

    python bench/gpu_check.py
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "290"))
START = time.perf_counter()
OUT = Path(os.environ.get("OUT", "."))
#: GPU_CHECK_DRY=1 runs the same code on the CPU (small shapes, no CUDA graphs) to test the script
DRY = os.environ.get("GPU_CHECK_DRY") == "1" and not torch.cuda.is_available()
DEVICE = "cpu" if DRY else "cuda"
SIZE = 64 if DRY else 224


def left() -> float:
    return BUDGET_S - (time.perf_counter() - START)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, width: float = 1.0, classes: int = 1000) -> None:
        super().__init__()
        w = [int(c * width) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], w[0]
        for cout, stride in zip(w, (1, 2, 2, 2)):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def prune_half(teacher: ResNet18) -> ResNet18:
    """Keep the first half of every conv's channels (a real, physically smaller student)."""
    student = ResNet18(0.5)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for k, v in s_sd.items():
        src = t_sd[k]
        s_sd[k] = src[tuple(slice(0, n) for n in v.shape)] if src.dim() else src
    student.load_state_dict(s_sd)
    return student


def cuda_time(fn: Any, warmup: int = 10, runs: int = 50) -> dict[str, float]:
    if DRY:
        return wall_time(fn, warmup, runs)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return {"median": statistics.median(times), "p90": times[int(0.9 * (len(times) - 1))]}


def wall_time(fn: Any, warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median": statistics.median(times), "p90": times[int(0.9 * (len(times) - 1))]}


def cuda_graph(model: nn.Module, x: torch.Tensor) -> Any:
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = model(static_x)
    def replay() -> torch.Tensor:
        g.replay()
        return static_y

    return replay


def latency_section(results: dict[str, Any]) -> None:
    torch.manual_seed(0)
    teacher = ResNet18().eval()
    student = prune_half(teacher).eval()
    rows = results["latency"] = []
    for dtype in (torch.float32,) if DRY else (torch.float32, torch.float16):
        for batch in (1, 32):
            x = torch.randn(batch, 3, SIZE, SIZE, device=DEVICE, dtype=dtype)
            for role, model in (("teacher", teacher), ("student", student)):
                m = type(model)(1.0 if role == "teacher" else 0.5).eval()
                m.load_state_dict(model.state_dict())
                m = m.to(DEVICE, dtype)
                row: dict[str, Any] = {"model": role, "dtype": str(dtype).split(".")[-1], "batch": batch}
                with torch.inference_mode():
                    ref = m(x)
                    row["eager"] = cuda_time(lambda m=m, x=x: m(x))
                    try:
                        if DRY:
                            raise RuntimeError("dry run on CPU: no CUDA graphs")
                        row["cuda_graph"] = cuda_time(cuda_graph(m, x))
                    except Exception as e:
                        row["cuda_graph"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                if (dtype == torch.float16 or (DRY and batch == 1)) and left() > 100:  # compiles cost ~20-40 s each: FP16 only
                    try:
                        t0 = time.perf_counter()
                        compiled = torch.compile(m)
                        with torch.inference_mode():
                            out = compiled(x)
                            row["compile_s"] = round(time.perf_counter() - t0, 1)
                            row["torch_compile"] = cuda_time(lambda c=compiled, x=x: c(x))
                            row["compile_max_abs"] = float((out.float() - ref.float()).abs().max())
                    except Exception as e:
                        row["torch_compile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                else:
                    row["torch_compile"] = {"skipped": "time budget"}
                rows.append(row)
                print(f"  {row['model']:8s} {row['dtype']:8s} b{batch:<3d} eager {row['eager']['median']:.3f} ms",
                      flush=True)


CHILD = r"""
import sys, time, statistics, torch
pkg, inp, ref = sys.argv[1:4]
runner = torch._inductor.aoti_load_package(pkg)
x = torch.load(inp, weights_only=True).to(sys.argv[4])
with torch.inference_mode():
    out = runner(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    err = float((out.float().cpu() - torch.load(ref, weights_only=True).float()).abs().max())
    for _ in range(10): runner(x)
    sync = torch.cuda.synchronize if sys.argv[4] == "cuda" else (lambda: None)
    sync(); ts = []
    for _ in range(50):
        t0 = time.perf_counter(); runner(x); sync(); ts.append((time.perf_counter() - t0) * 1e3)
print(f"RESULT {err} {statistics.median(ts)}")
"""


def aoti_case(name: str, model: nn.Module, x: torch.Tensor, tmp: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {"case": name}
    model = model.eval().to(DEVICE)
    x = x.to(DEVICE)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref = model(x).cpu()
        ep = torch.export.export(model, (x,))
        pkg = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / f"{name}.pt2"))
        rec["compile_s"] = round(time.perf_counter() - t0, 1)
    except Exception as e:
        rec["compile"] = f"failed: {type(e).__name__}: {e}"[:500]
        return rec
    rec["compile"] = "ok"
    torch.save(x.cpu(), tmp / f"{name}.in.pt")
    torch.save(ref, tmp / f"{name}.ref.pt")
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(pkg), str(tmp / f"{name}.in.pt"),
                               str(tmp / f"{name}.ref.pt"), DEVICE], capture_output=True, text=True,
                              timeout=max(30, min(180, left())), check=False)
    except subprocess.TimeoutExpired:
        rec["load"] = "timed out in the child process"
        return rec
    rec["exit_code"] = proc.returncode
    if proc.returncode < 0:
        rec["load"] = f"crashed: {signal.Signals(-proc.returncode).name}"
        rec["stderr_tail"] = proc.stderr[-1500:]
    elif proc.returncode != 0:
        rec["load"] = "failed"
        rec["stderr_tail"] = proc.stderr[-1500:]
    else:
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
        _, err, ms = line.split()
        rec.update(load="ok", max_abs=float(err), latency_ms=float(ms))
    return rec


def aoti_mlp_section(results: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        results.setdefault("aoti", []).append(aoti_case("mlp2", mlp, torch.randn(8, 64), Path(d)))
        print(f"  aoti mlp2: {results['aoti'][-1]}", flush=True)


def aoti_section(results: dict[str, Any]) -> None:
    cases = results.setdefault("aoti", [])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if left() > 90:
            torch.manual_seed(0)
            cases.append(aoti_case("student_cnn", prune_half(ResNet18()), torch.randn(1, 3, SIZE, SIZE), tmp))
            print(f"  aoti student_cnn: {cases[-1]}", flush=True)
        else:
            cases.append({"case": "student_cnn", "skipped": "time budget"})


def print_table(results: dict[str, Any]) -> None:
    print("\nmodel    dtype    batch  eager ms  cudagraph ms  compile ms  speed-up(eager, student vs teacher)")
    rows = results.get("latency", [])
    for r in rows:
        def ms(key: str, r: dict[str, Any] = r) -> str:
            v = r.get(key, {})
            return f"{v['median']:.3f}" if "median" in v else "-"
        partner = next((t for t in rows if t["model"] == "teacher" and t["dtype"] == r["dtype"]
                        and t["batch"] == r["batch"]), None)
        sp = f"{partner['eager']['median'] / r['eager']['median']:.2f}x" if partner and r["model"] == "student" else ""
        print(f"{r['model']:8s} {r['dtype']:8s} {r['batch']:5d}  {ms('eager'):>8s}  {ms('cuda_graph'):>12s}  "
              f"{ms('torch_compile'):>10s}  {sp}")
    for c in results.get("aoti", []):
        print(f"AOTInductor CUDA {c.get('case')}: compile={c.get('compile', c.get('skipped'))} "
              f"load={c.get('load', '-')} max_abs={c.get('max_abs', '-')} latency_ms={c.get('latency_ms', '-')}")


def main() -> None:
    results: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available() and not DRY:
        results["error"] = "no CUDA device visible"
    else:
        results["device"] = "cpu (dry run)" if DRY else torch.cuda.get_device_name(0)
        results["cuda"] = torch.version.cuda
        print(f"device: {results['device']}  torch {torch.__version__}  CUDA {torch.version.cuda}", flush=True)
        for name, section in (("aoti_mlp", aoti_mlp_section), ("latency", latency_section),
                              ("aoti", aoti_section)):
            try:
                section(results)
            except Exception:
                results[f"{name}_error"] = traceback.format_exc()[-2000:]
            (OUT / "gpu_check.json").parent.mkdir(parents=True, exist_ok=True)
            (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2))
    results["seconds"] = round(time.perf_counter() - START, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {OUT / 'gpu_check.json'} in {results['seconds']} s")


if __name__ == "__main__":
    main()
