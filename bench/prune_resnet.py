"""ResNet-18 at 224, batch 1, ONNX Runtime CPU (2 threads): potstill vs Torch-Pruning.

For each ratio both prune the same ResNet-18 (L2 magnitude importance, same ratio); we report
MACs reduction, measured speed-up (interleaved timing) and their quotient (1.0 = as fast as the
MACs promise). potstill aligns kept widths to the profile's channel multiple.

    .venv/bin/python bench/prune_resnet.py [--ratios 0.3 0.5 0.7] [--profile cpu] [--rounds 12]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from resnet18 import ResNet18


def make_resnet() -> ResNet18:
    torch.manual_seed(0)
    model = ResNet18().eval()
    for m in model.modules():  # give the weights some spread, like a trained net
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    from potstill.ir.capture import analyze

    return int(analyze(model, (x,)).cost.macs)


def potstill_prune(model: nn.Module, x: torch.Tensor, ratio: float, profile: str) -> tuple[nn.Module, dict]:
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState

    def load_profile(name: str) -> object:
        from potstill.profiles import load_profile as load

        return load(name)

    if profile == "none":
        prof: object = None
    elif profile == "measured":
        prof = C.BenchProfile(8, C.MeasuredTable())
    else:
        prof = load_profile(profile)
    state = CompileState(model, (x,), profile=prof)
    PassManager(build_pipeline(f"importance.magnitude,prune.width{{ratio={ratio}}}")).run(state)
    s = state.working()
    return s.module, s.metrics["arch"]


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    return model


def first_width(model: nn.Module) -> str:
    return f"{model.conv1.out_channels}/{model.layer1[0].conv1.out_channels}"  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--also-measured", action="store_true", help="add potstill students with --profile measured")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--profile", default="cpu", help="profile name; none (channel multiple 8); measured (widths from a latency table measured "
                    "here for the model's layer shapes)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (e.g. the host)")
    args = ap.parse_args()
    C.setup()
    x = torch.randn(1, 3, 224, 224)
    teacher = make_resnet()
    base_macs = macs_of(teacher, x)
    models: dict[str, nn.Module] = {"teacher": teacher}
    info: dict[str, dict] = {}
    for r in args.ratios:
        student, arch = C.timed(f"potstill {r}", lambda r=r: potstill_prune(teacher, x, r, args.profile))
        models[f"potstill@{r}"] = student
        info[f"potstill@{r}"] = {"macs": arch["macs"]}
        if args.also_measured:
            student, arch = C.timed(f"potstill+table {r}", lambda r=r: potstill_prune(teacher, x, r, "measured"))
            models[f"potstill+table@{r}"] = student
            info[f"potstill+table@{r}"] = {"macs": arch["macs"]}
        tps = C.timed(f"torch-pruning {r}", lambda r=r: tp_prune(teacher, x, r))
        models[f"torch-pruning@{r}"] = tps
        info[f"torch-pruning@{r}"] = {"macs": macs_of(tps, x)}
    sessions = {k: C.timed(f"onnx {k}", lambda m=m: C.OrtModel(m, [x])) for k, m in models.items()}
    lat = C.interleaved_latency(sessions, rounds=args.rounds)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ResNet-18 224x224 b1, ONNX Runtime CPU {C.THREADS} threads (profile {args.profile})")
    for col in ("method", "ratio", "widths stem/l1", "GMACs", "MACs ↓", "ms (median)", "speed-up", "speed-up / MACs ↓"):
        table.add_column(col, justify="right")
    rows = []
    t_ms = lat["teacher"]["median"]
    table.add_row("teacher", "-", first_width(teacher), f"{base_macs / 1e9:.2f}", "1.00×", f"{t_ms:.1f}", "1.00×", "-")
    for name, m in models.items():
        if name == "teacher":
            continue
        method, ratio = name.split("@")
        red = base_macs / info[name]["macs"]
        sp = t_ms / lat[name]["median"]
        rows.append({"method": method, "ratio": float(ratio), "widths": first_width(m), "macs": info[name]["macs"],
                     "macs_reduction": red, "latency_ms": lat[name], "speedup": sp, "quotient": sp / red})
        table.add_row(method, ratio, first_width(m), f"{info[name]['macs'] / 1e9:.2f}", f"{red:.2f}×",
                      f"{lat[name]['median']:.1f}", f"{sp:.2f}×", f"{sp / red:.2f}")
    Console().print(table)
    path = C.write_json("prune_resnet" + (f"_{args.tag}" if args.tag else ""), {"command": " ".join(sys.argv), "profile": args.profile,
                                          "teacher": {"macs": base_macs, "latency_ms": lat["teacher"]}, "rows": rows})
    Console().print(f"wrote {path}")


if __name__ == "__main__":
    main()
