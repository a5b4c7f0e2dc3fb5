"""Elastic supernet on the digits CNN: one training, many students, against one-by-one distillation.

The bundled digits teacher (``examples/digits_cnn.py``: residual CNN with BN and squeeze-excite) is
nested (L2-magnitude channel order, Block-Importance block order) and trained as a supernet with the
sandwich rule (largest + smallest + 2 random subnets per batch, in-place KD, balancing, progressive
unlocking). Then:

1. **Extracted vs one-by-one**: for a few target architectures, the extracted subnet (BN
   recalibrated, no retraining) against the *same* architecture cut from the same nested teacher and
   distilled alone from the teacher; the baselines share the supernet's budget (subnet forward/
   backward passes) equally. Accuracy on the held-out split.
2. **Extraction time** per subnet.
3. **Search** (NSGA-II, profile ``cpu``, ONNX Runtime): candidates scored per second, and how far
   the latency predictor (roofline per layer, calibrated on two measured anchors) is from the
   measured latency of each finalist.

    nice -n 10 .venv/bin/python bench/elastic_digits.py            # a few CPU-minutes
    nice -n 10 .venv/bin/python bench/elastic_digits.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "examples"))
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def targets(space: Any) -> dict[str, Any]:
    """Three architectures along the space: smallest, a quarter of the way, half way."""
    dims = space.dims()
    out = {"smallest": space.smallest()}
    for name, frac in (("quarter", 0.25), ("half", 0.5)):
        out[name] = space.config([round(frac * (len(d.choices) - 1)) for d in dims])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = 1 if args.quick else args.epochs

    import digits_cnn
    from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
    from potstill.passes.elastic import extract, make_supernet, recalibrate_bn
    from potstill.passes.elastic.search import SearchSettings, search
    from potstill.passes.elastic.train import train_supernet
    from potstill.profiles import load_profile

    teacher = digits_cnn.teacher()
    x_tr, y_tr, x_te, y_te = digits_cnn._dataset()
    calib = [x_tr[i:i + 64] for i in range(0, 512, 64)]
    teacher_acc = accuracy(teacher, x_te, y_te)
    log(f"teacher accuracy {teacher_acc:.4f}")

    def nested() -> Any:
        return make_supernet(copy.deepcopy(teacher), (x_tr[:1],), batches=calib[:2])

    # -- the supernet ------------------------------------------------------------------------------
    net = nested()
    log(f"space: {len(net.space.width_dims)} width/expansion dims, {len(net.space.depth_dims)} depth dims, "
        f"{net.space.size()} subnets")
    random_subnets = 2
    data = TensorBatches(x_tr, y_tr, batch_size=64, seed=0)
    t = time.perf_counter()
    result = train_supernet(net, teacher, data, TrainConfig(epochs=epochs, lr=1e-3, progress=False, seed=0),
                            loss="kd", random_subnets=random_subnets, temperature=2.0)
    train_s = time.perf_counter() - t
    subnet_steps = result.steps * (2 + random_subnets)
    log(f"supernet: {result.steps} steps x {2 + random_subnets} subnets in {train_s:.0f}s")

    # -- extracted vs one-by-one -------------------------------------------------------------------
    goals = targets(net.space)
    per_student_steps = subnet_steps // len(goals)
    rows = []
    extraction_s = []
    for name, cfg in goals.items():
        recalibrate_bn(net, cfg, calib)
        ex = extract(net, cfg)
        extraction_s.append(ex.seconds)
        acc_elastic = accuracy(ex.module, x_te, y_te)
        params = sum(p.numel() for p in ex.module.parameters())
        # the baseline: the same architecture cut from an untrained nesting of the teacher, BN
        # recalibrated, then distilled alone with its share of the budget
        base_net = nested()
        recalibrate_bn(base_net, cfg, calib)
        base = extract(base_net, cfg).module.requires_grad_(True)
        zero_shot = accuracy(base, x_te, y_te)
        t = time.perf_counter()
        cfg_train = TrainConfig(epochs=10**6, max_steps=per_student_steps, lr=1e-3, progress=False, seed=0)
        DistillTrainer(base, teacher, "kd", cfg_train, temperature=2.0).fit(data)
        base_s = time.perf_counter() - t
        acc_base = accuracy(base, x_te, y_te)
        rows.append({"target": name, "config": cfg.to_dict(), "params": params, "elastic_acc": acc_elastic,
                     "one_by_one_acc": acc_base, "pruned_no_training_acc": zero_shot,
                     "one_by_one_steps": per_student_steps, "one_by_one_s": base_s, "extract_s": ex.seconds})
        log(f"{name}: {params} params, elastic {acc_elastic:.4f} vs one-by-one {acc_base:.4f} "
            f"(pruned, untrained {zero_shot:.4f})")

    # -- search -----------------------------------------------------------------------------------
    profile = load_profile("cpu")
    settings = SearchSettings(students=3, population=8 if args.quick else args.population,
                              generations=2 if args.quick else args.generations)
    heldout = [x_te[i:i + 120] for i in range(0, len(y_te), 120)]
    t = time.perf_counter()
    found = search(net, teacher, profile, (x_tr[:1],), {}, heldout, calib, settings,
                   work_dir=None)
    search_s = time.perf_counter() - t
    finalists = []
    for f in found.finalists:
        err = abs(f.predicted_latency_ms - f.measured_latency_ms) / f.measured_latency_ms
        finalists.append(f.to_dict() | {"latency_error": err, "test_acc": accuracy(f.module, x_te, y_te)})
    errors = [f["latency_error"] for f in finalists]
    log(f"search: {found.evaluated} candidates, {found.candidates_per_s:.1f}/s, front {len(found.front)}, "
        f"median latency error {statistics.median(errors) if errors else float('nan'):.1%}")

    report = {
        "bench": "elastic_digits", "command": " ".join(sys.argv), "machine": platform.platform(), "threads": args.threads, "quick": args.quick,
        "teacher_acc": teacher_acc, "epochs": epochs, "supernet_steps": result.steps,
        "subnet_steps": subnet_steps, "supernet_train_s": train_s, "space": net.space.to_dict(),
        "targets": rows, "extract_s_max": max(extraction_s),
        "search": {"seconds": search_s, "evaluated": found.evaluated, "candidates_per_s": found.candidates_per_s,
                   "latency_source": found.latency_source, "front_size": len(found.front),
                   "finalists": finalists, "rejected": found.rejected},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("elastic_digits_quick.json" if args.quick else "elastic_digits.json")
    out.write_text(json.dumps(report, indent=2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"digits CNN elastic (teacher {teacher_acc:.4f}, supernet {result.steps} steps x "
                        f"{2 + random_subnets} subnets, {train_s:.0f}s)")
    for col in ("target", "params", "elastic (extracted)", "one-by-one KD", "pruned, no training", "extract s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["target"], str(r["params"]), f"{r['elastic_acc']:.4f}", f"{r['one_by_one_acc']:.4f}",
                      f"{r['pruned_no_training_acc']:.4f}", f"{r['extract_s']:.3f}")
    Console().print(table)
    st = Table(title=f"search on profile cpu ({found.latency_source}): {found.evaluated} candidates, "
                     f"{found.candidates_per_s:.1f}/s")
    for col in ("front idx", "fidelity", "test acc", "pred ms", "measured ms", "error", "pred MB", "measured MB"):
        st.add_column(col)
    for f in finalists:
        st.add_row(str(f["front_index"]), f"{f['accuracy']:.3f}", f"{f['test_acc']:.4f}",
                   f"{f['predicted_latency_ms']:.4f}", f"{f['measured_latency_ms']:.4f}", f"{f['latency_error']:.1%}",
                   f"{f['predicted_memory_mb']:.3f}", f"{f['measured_memory_mb']:.3f}")
    Console().print(st)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
