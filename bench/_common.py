"""Shared benchmark helpers: ONNX Runtime sessions, interleaved A/B timing, real text and images,
fidelity metrics. Benchmarks print a rich table and write JSON under ``bench/results/``."""

from __future__ import annotations

import inspect
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from potstill.targets.timing import session_options
from torch import nn

RESULTS = Path(os.environ.get("POTSTILL_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
THREADS = 2


class Flat(nn.Module):
    """``forward(*tensors)`` -> the primary output of ``module(**dict(zip(names, tensors)))``."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.module = module
        self.names = list(names)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        from potstill.inputs.data import primary_output

        if self.names:
            return primary_output(self.module(**dict(zip(self.names, xs))))
        return primary_output(self.module(*xs))


def onnx_bytes(module: nn.Module, inputs: Sequence[torch.Tensor], names: Sequence[str] = ()) -> bytes:
    """The model as ONNX bytes (TorchScript exporter; the dynamo exporter if that fails)."""
    flat = Flat(module, names).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(flat, tuple(inputs), buf, dynamo=False, opset_version=17,
                              input_names=list(names) or [f"x{i}" for i in range(len(inputs))])
        except Exception:
            buf = io.BytesIO()
            prog = torch.onnx.export(flat, tuple(inputs), dynamo=True, external_data=False)
            prog.save(buf)  # type: ignore[union-attr]
    return buf.getvalue()


class OrtModel:
    """An ONNX Runtime CPU session (2 threads, all graph optimisations) with fixed feeds."""

    def __init__(self, module: nn.Module | str | Path, inputs: Sequence[torch.Tensor], names: Sequence[str] = ()) -> None:
        """``module`` exported here (``onnx_bytes``), or the path of an ONNX file exported already."""
        import onnxruntime as ort

        opts = session_options(THREADS)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = str(module) if isinstance(module, (str, Path)) else onnx_bytes(module, inputs, names)
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.feeds = {i.name: t.numpy() for i, t in zip(self.session.get_inputs(), inputs)}

    def run(self) -> np.ndarray:
        return self.session.run(None, self.feeds)[0]


def interleaved_latency(models: dict[str, OrtModel], rounds: int = 12, per_round: int = 4,
                        warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median / p90 ms per model, timing A B C A B C ... so that machine noise hits all alike."""
    for m in models.values():
        for _ in range(warmup):
            m.run()
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            m = models[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                m.run()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median": statistics.median(v), "p90": float(np.percentile(v, 90))} for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# The command line


def cli_compile(spec: Sequence[str], out: Path, *flags: str, timeout: float | None = None
                ) -> tuple[subprocess.CompletedProcess[str], float, dict[str, Any] | None]:
    """``potstill compile SPEC... FLAGS... -o OUT`` in a child process (offline), as a user runs it.

    Returns the finished process, its wall time (s) and ``OUT/manifest.json`` (None on failure).
    """
    # COLUMNS: rich wraps what the CLI prints at 80 columns off a terminal; one message, one line
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "1000"}
    cmd = [sys.executable, "-m", "potstill.cli", "compile", *spec, *flags, "-o", str(out)]
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.time() - t0
    manifest = out / "manifest.json"
    man = json.loads(manifest.read_text()) if proc.returncode == 0 and manifest.is_file() else None
    return proc, wall, man


def student_engine(out: Path, student: dict[str, Any]) -> Path:
    """The engine a student ships (its manifest's ``files.onnx``: ``model.int8.onnx`` where INT8 was kept)."""
    return Path(out) / student["dir"] / (student.get("files") or {}).get("onnx", "model.onnx")


def first_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The first line of a failed CLI's error (its ``error:`` line when it printed one)."""
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("error"):
            return ln
    return lines[-1] if lines else f"exit {proc.returncode}, no output"


# ---------------------------------------------------------------------------------------------
# Real data


def docstring_sentences(limit: int = 2000, seed: int = 0) -> list[str]:
    """English sentences from the docstrings of installed packages (real, unlabelled text)."""
    import importlib
    import pkgutil

    roots = ["numpy", "torch.nn", "torch.optim", "sklearn", "scipy", "json", "argparse", "logging",
             "collections", "email", "http", "unittest", "pathlib", "asyncio", "rich", "yaml"]
    seen: set[str] = set()
    out: list[str] = []
    for root in roots:
        try:
            pkg = importlib.import_module(root)
        except Exception:
            continue
        mods = [pkg]
        if hasattr(pkg, "__path__"):
            for info in list(pkgutil.iter_modules(pkg.__path__, root + "."))[:40]:
                if "test" in info.name or "._" in info.name:
                    continue
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        mods.append(importlib.import_module(info.name))
                except Exception:
                    continue
        for mod in mods:
            for _, obj in inspect.getmembers(mod):
                doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
                if not doc:
                    continue
                text = " ".join(doc.split("\n\n")[0].split())
                for s in re.split(r"(?<=[.!?])\s+", text):
                    s = s.strip()
                    if 40 <= len(s) <= 300 and s not in seen and re.match(r"^[A-Z][a-z]", s) and ">>>" not in s:
                        seen.add(s)
                        out.append(s)
    random.Random(seed).shuffle(out)
    return out[:limit]


#: per-channel (mean, std) of the pixels in [0, 1]: torchvision's ImageNet statistics, or the
#: [-1, 1] scaling TensorFlow's EfficientNet-Lite checkpoints were trained with (mean 127, std 128)
NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def real_images(n: int, size: int = 224, seed: int = 0, norm: str = "imagenet") -> torch.Tensor:
    """``n`` random crops of scikit-image / scikit-learn photographs, resized, normalised (``NORMS``)."""
    import skimage.data
    from skimage.transform import resize
    from sklearn.datasets import load_sample_images

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
                 "motorcycle_left", "retina", "colorwheel"):
        fn = getattr(skimage.data, name, None)
        try:
            img = fn() if fn else None
        except Exception:
            img = None
        if img is not None and img.ndim == 3 and img.shape[2] >= 3:
            photos.append(np.asarray(img[..., :3]))
    photos += [np.asarray(i) for i in load_sample_images().images]
    rng = np.random.default_rng(seed)
    mean, std = (np.array(v) for v in NORMS[norm])
    out = []
    for i in range(n):
        img = photos[i % len(photos)].astype(np.float64) / 255.0
        h, w = img.shape[:2]
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = resize(img[y:y + side, x:x + side], (size, size), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(((crop - mean) / std).transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Fidelity


def embedding_fidelity(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """Mean cosine, nearest-neighbour agreement and Spearman rho of pairwise cosine similarities."""
    from scipy.stats import spearmanr

    s = student / np.linalg.norm(student, axis=1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    cos = float((s * t).sum(1).mean()) if s.shape == t.shape else float("nan")
    ss, tt = s @ s.T, t @ t.T
    np.fill_diagonal(ss, -np.inf)
    np.fill_diagonal(tt, -np.inf)
    nn_agree = float((ss.argmax(1) == tt.argmax(1)).mean())
    iu = np.triu_indices(len(s), 1)
    rho = float(spearmanr(ss[iu], tt[iu]).statistic)
    return {"cosine": cos, "nn_agreement": nn_agree, "spearman": rho}


def classifier_agreement(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean KL(teacher || student) of softmax outputs."""
    ls = torch.log_softmax(torch.tensor(student, dtype=torch.float64), -1)
    lt = torch.log_softmax(torch.tensor(teacher, dtype=torch.float64), -1)
    kl = float((lt.exp() * (lt - ls)).sum(-1).mean())
    top1 = float((ls.argmax(-1) == lt.argmax(-1)).double().mean())
    return {"top1_agreement": top1, "kl": kl}


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": {"threads": THREADS, "cpu": _cpu(), "python": sys.version.split()[0],
                           "torch": torch.__version__}, **payload}
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def setup(threads: int = THREADS) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def timed(label: str, fn: Callable[[], Any]) -> Any:
    from rich.console import Console

    t0 = time.perf_counter()
    out = fn()
    Console(stderr=True).print(f"[dim]{label}: {time.perf_counter() - t0:.1f}s[/]")
    return out


# ---------------------------------------------------------------------------------------------
# A latency table measured on demand (for hosts without a profile table)


class MeasuredTable:
    """Duck-typed ``LatencyTable.best_width``: times each asked one-op shape in ONNX Runtime on this
    host (cached) and picks the candidate with the most MACs per ms (ties within 3 %: the widest)."""

    TIE = 0.03

    def __init__(self, threads: int = THREADS, repeats: int = 30) -> None:
        self.threads = threads
        self.repeats = repeats
        self.cache: dict[tuple, float] = {}

    def lookup(self, op: str, **shape: Any) -> float:
        key = (op, *sorted(shape.items()))
        if key not in self.cache:
            self.cache[key] = self._measure(op, shape)
        return self.cache[key]

    def best_width(self, op: str, candidates: Sequence[int], **shape: Any) -> int:
        scored = []
        for width in sorted(set(candidates)):
            q = dict(shape)
            q["cout"] = width
            q.setdefault("cin", width)
            if q.get("groups") == "depthwise":
                q["groups"] = q["cin"] = width
            groups = int(q.get("groups", 1) or 1)
            work = q["cin"] * q["cout"] / groups
            scored.append((work / self.lookup(op, **q), width))
        best = max(t for t, _ in scored)
        return max(w for t, w in scored if t >= best * (1 - self.TIE))

    def _measure(self, op: str, s: dict[str, Any]) -> float:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        cin, cout = int(s["cin"]), int(s["cout"])
        if op == "conv2d":
            k, hw, g, st = int(s.get("kernel", 3)), int(s.get("hw", 56)), int(s.get("groups", 1)), int(s.get("stride", 1))
            w = rng.standard_normal((cout, cin // g, k, k)).astype(np.float32)
            nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k], pads=[k // 2] * 4,
                                      strides=[st, st], group=g)]
            x_shape = [1, cin, hw, hw]
        else:
            w = rng.standard_normal((cin, cout)).astype(np.float32)
            nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
            x_shape = [int(s.get("tokens", 1)), cin]
        b = rng.standard_normal(cout).astype(np.float32)
        graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), session_options(self.threads), providers=["CPUExecutionProvider"])
        feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
        for _ in range(3):
            sess.run(None, feeds)
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(times))


class BenchProfile:
    """A stand-in profile: a channel multiple and, optionally, a measured table."""

    def __init__(self, channel_multiple: int = 8, table: Any = None) -> None:
        self.channel_multiple = channel_multiple
        self.latency_table = table
        self.latency_budget_ms = None
        self.name = "bench"


def mean_embeddings(model: nn.Module, batches: list[dict[str, Any]]) -> np.ndarray:
    """Masked-mean sentence embeddings of an HF encoder over tokenized batches."""
    outs = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).float()
            outs.append(((h * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(outs)
