"""Distillation step throughput: potstill's DistillTrainer vs a hand-written PyTorch loop.

Both run the same step on the same models — a MiniLM-sized BERT classifier teacher (6 layers,
hidden 384, 12 heads, FFN 1536, random weights: nothing to download) and a 3-layer student —
``T² KL(softmax(z_t/T) || softmax(z_s/T))``, AdamW, cosine schedule, gradient clipping at 1.0,
bf16 autocast on CUDA (fp32 on CPU), batches moved to the device every step. Reported: steps/s
of each and their ratio (target ≥ 0.8). Runs on CPU, and on CUDA when present; well under 2
minutes; needs only torch, transformers (and numpy) besides this repository, which it imports
from source when potstill is not installed.

    .venv/bin/python bench/distill_throughput.py [--steps 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def ensure_potstill() -> None:
    """Import potstill from the source tree when it is not installed (e.g. on a bare GPU box)."""
    try:
        import potstill.passes.distill  # noqa: F401

        return
    except ImportError:
        pass
    for name, folder in (("potstill", "compiler"), ("potstill.passes", "passes"),
                         ("potstill.passes.distill", "passes/distill")):
        path = ROOT / folder
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def models(device: torch.device) -> tuple[nn.Module, nn.Module]:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, num_labels=8,
                     attn_implementation="sdpa")
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(cfg).to(device).eval()
    student_cfg = BertConfig(**(cfg.to_dict() | {"num_hidden_layers": 3}))
    torch.manual_seed(1)
    student = BertForSequenceClassification(student_cfg).to(device)
    return teacher, student


def make_batches(n: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 30522, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)} for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hand_loop(teacher: nn.Module, student: nn.Module, data: list[dict[str, torch.Tensor]], device: torch.device,
              temperature: float = 2.0) -> float:
    """The loop one writes by hand; returns seconds for len(data) steps."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    total = len(data)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    use_amp = device.type == "cuda"
    student.train()
    sync(device)
    t0 = time.perf_counter()
    for raw in data:
        batch = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            with torch.no_grad():
                z_t = teacher(**batch).logits
            z_s = student(**batch).logits
            log_p = F.log_softmax(z_t.float() / temperature, -1)
            log_q = F.log_softmax(z_s.float() / temperature, -1)
            loss = temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
    sync(device)
    return time.perf_counter() - t0


def trainer_loop(teacher: nn.Module, student: nn.Module, data: list[dict[str, torch.Tensor]],
                 device: torch.device) -> float:
    from potstill.passes.distill import DistillTrainer, TrainConfig

    cfg = TrainConfig(epochs=1, lr=1e-4, grad_clip=1.0, precision="bf16" if device.type == "cuda" else "fp32",
                      device=str(device), progress=False, log_every=10**9)
    trainer = DistillTrainer(student, teacher, "kd", cfg, temperature=2.0)
    sync(device)
    t0 = time.perf_counter()
    trainer.fit(data)
    sync(device)
    return time.perf_counter() - t0


def run(device: torch.device, steps: int, batch: int, seq: int, rounds: int) -> dict[str, Any]:
    teacher, student = models(device)
    data = make_batches(steps, batch, seq)
    warm = make_batches(3, batch, seq)
    hand_loop(teacher, student, warm, device)
    trainer_loop(teacher, student, warm, device)
    hand_s, trainer_s = [], []
    for _ in range(rounds):  # interleaved so drift and load hit both alike
        hand_s.append(hand_loop(teacher, student, data, device))
        trainer_s.append(trainer_loop(teacher, student, data, device))
    hand, ours = min(hand_s), min(trainer_s)
    return {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "steps": steps, "batch": batch, "seq": seq, "rounds": rounds,
            "hand_steps_per_s": steps / hand, "trainer_steps_per_s": steps / ours, "ratio": hand / ours,
            "hand_seconds": hand_s, "trainer_seconds": trainer_s}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--steps", type=int, default=0, help="steps per timing (default: 8 CPU, 100 CUDA)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "distill_throughput.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ensure_potstill()
    devices = []
    if args.device in {"cpu", "all"}:
        devices.append(torch.device("cpu"))
    if args.device in {"cuda", "all"} and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for dev in devices:
        if dev.type == "cuda":
            rows.append(run(dev, args.steps or 100, batch=64, seq=128, rounds=args.rounds))
        else:
            rows.append(run(dev, args.steps or 8, batch=8, seq=32, rounds=args.rounds))
    _print(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "distill_throughput", "torch": torch.__version__, "rows": rows},
                                   indent=2) + "\n")
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in rows:
            print(f"{r['name']}: hand {r['hand_steps_per_s']:.2f} steps/s, trainer {r['trainer_steps_per_s']:.2f} "
                  f"steps/s, ratio {r['ratio']:.2f}")
        return
    table = Table(title="distillation step throughput (MiniLM-sized BERT teacher, 3-layer student)")
    for col in ("device", "batch×seq", "hand loop steps/s", "DistillTrainer steps/s", "ratio"):
        table.add_column(col, justify="left" if col == "device" else "right")
    for r in rows:
        table.add_row(r["name"], f"{r['batch']}×{r['seq']}", f"{r['hand_steps_per_s']:.2f}",
                      f"{r['trainer_steps_per_s']:.2f}", f"{r['ratio']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
