"""Torch-Pruning's own test models through potstill's default command line (a peer suite).

For every model of ``bench/peer_models.py`` (those of Torch-Pruning's ``tests/`` folder that need no
torchvision), runs ``potstill compile peer_models.py:FACTORY --input-shape ... --ratio 0.5
--no-distill -o OUT`` in a child process and checks: the exit code; the MACs removed (the
manifest's teacher and student ``macs``); that the reloaded student (``potstill.load_student``)
gives outputs of the teacher's shapes, every output; and that the ONNX engine matches the PyTorch
student (the compile's recorded ``parity``, and here again on fresh inputs).

Status per model: ``pass`` (parity, >= 20 % fewer MACs), ``low-cut`` (parity, fewer MACs but
< 20 %), ``nothing-prunable`` (the CLI's exit-2 message), ``failed`` (with the error's first line).
Prints a rich table and writes ``bench/results/peer_suite.json``.

    .venv/bin/python bench/peer_suite.py [--only NAME ...] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402
import peer_models  # noqa: E402

MIN_CUT = 0.20
#: the messages the CLI exits 2 with when a model has nothing to prune
NOTHING_PRUNABLE = ("no prunable groups", "removes no unit")


def _outputs(y: Any) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    return [t for item in y for t in _outputs(item)]


def _shape(shape: Any) -> str:
    return "x".join(map(str, shape))


def _spec(name: str) -> str:
    return f"{HERE / 'peer_models.py'}:{peer_models.PEERS[name].factory}"


def _student_checks(name: str, folder: Path) -> dict[str, Any]:
    """Output shapes of teacher, reloaded student and its ONNX engine on fresh inputs, and the
    engine's largest difference from the PyTorch student."""
    import onnxruntime as ort
    from potstill import load_student
    from potstill.inputs.data import load_callable

    peer = peer_models.PEERS[name]
    factory = load_callable(_spec(name))  # the module the CLI imported the teacher from
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(*s, generator=gen) for s in peer.shapes]
    with torch.no_grad():
        teacher = _outputs(factory()(*xs))
        student = _outputs(load_student(folder, factory=factory)(*xs))
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    engine = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})
    same = len(engine) == len(student) and all(e.shape == tuple(s.shape) for e, s in zip(engine, student))
    diff = max(float(np.abs(e - s.numpy()).max()) for e, s in zip(engine, student)) if same else float("inf")
    return {
        "teacher_shapes": [_shape(t.shape) for t in teacher],
        "student_shapes": [_shape(s.shape) for s in student],
        "engine_shapes": [_shape(e.shape) for e in engine],
        "engine_max_abs": diff,
    }


def run_peer(name: str, out: Path, ratio: float = 0.5, timeout: float | None = None) -> dict[str, Any]:
    """Compile one peer model through the CLI into ``out`` and check what came out (one row)."""
    peer = peer_models.PEERS[name]
    shapes = [arg for s in peer.shapes for arg in ("--input-shape", _shape(s))]
    spec = [_spec(name), *shapes]
    proc, wall, man = C.cli_compile(spec, out, "--ratio", str(ratio), "--no-distill", timeout=timeout)
    row: dict[str, Any] = {"model": name, "source": peer.source, "exit": proc.returncode, "wall_s": round(wall, 1)}
    if man is None:
        msg = C.first_error_line(proc)
        status = "nothing-prunable" if proc.returncode == 2 and any(m in msg for m in NOTHING_PRUNABLE) else "failed"
        return {**row, "status": status, "reason": msg}
    s = man["students"][0]
    before, after = man["teacher"]["macs"], s["macs"]
    row.update(macs_before=before, macs_after=after, macs_cut=1 - after / before,
               parity_ok=bool(s["parity"]["ok"]), parity_max_abs=s["parity"]["max_abs"],
               groups=man["teacher"]["architecture"]["groups"],
               pinned=sorted(set(man["teacher"]["architecture"]["pinned"].values())))
    try:
        row.update(_student_checks(name, out / s["dir"]))
    except Exception as e:  # a student that does not reload or run is a failure of the compile
        return {**row, "status": "failed", "reason": f"student check: {type(e).__name__}: {str(e).splitlines()[0]}"}
    problems = []
    if row["student_shapes"] != row["teacher_shapes"] or row["engine_shapes"] != row["teacher_shapes"]:
        problems.append(f"output shapes {row['student_shapes']} / engine {row['engine_shapes']}, "
                        f"teacher {row['teacher_shapes']}")
    tol = man["profile"]["tolerance"]["max_abs"]
    if not row["parity_ok"] or not row["engine_max_abs"] <= tol * 10:
        problems.append(f"engine parity: recorded ok={row['parity_ok']} max|d| {row['parity_max_abs']:.1e}, "
                        f"here {row['engine_max_abs']:.1e}")
    if problems:
        return {**row, "status": "failed", "reason": "; ".join(problems)}
    if row["macs_cut"] >= MIN_CUT:
        return {**row, "status": "pass", "reason": ""}
    note = s["metrics"].get("prune", {}).get("budget", {}).get("note") or ""
    return {**row, "status": "low-cut", "reason": note.split("(")[0].strip() or f"{row['macs_cut']:.0%} cut"}


def torch_pruning_row(name: str, ratio: float = 0.5) -> dict[str, Any]:
    """The peer itself on the same model: Torch-Pruning's ``MagnitudePruner`` (L2, ``pruning_ratio``
    ``ratio``, one step, no ignored layers, as its own tests call it); MACs cut by its own counter,
    and whether every output kept its shape."""
    import torch_pruning as tp

    peer = peer_models.PEERS[name]
    model = getattr(peer_models, peer.factory)()
    xs = tuple(torch.randn(*s) for s in peer.shapes)
    example = xs[0] if len(xs) == 1 else xs
    try:
        with torch.no_grad():
            before = [_shape(t.shape) for t in _outputs(model(*xs))]
        macs0, _ = tp.utils.count_ops_and_params(model, example)
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio)
        pruner.step()
        macs1, _ = tp.utils.count_ops_and_params(model, example)
        with torch.no_grad():
            after = [_shape(t.shape) for t in _outputs(model(*xs))]
    except Exception as e:
        return {"tp_status": "failed", "tp_reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    cut = 1 - macs1 / macs0
    status = "changed-outputs" if after != before else "pass" if cut >= MIN_CUT else "low-cut" if cut > 0 else "nothing"
    return {"tp_status": status, "tp_macs_cut": cut, "tp_shapes": after,
            "tp_reason": f"outputs {' '.join(before)} -> {' '.join(after)}" if after != before else ""}


def _tp_version() -> str:
    import torch_pruning as tp

    return str(tp.__version__)


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--no-torch-pruning", action="store_true", help="skip Torch-Pruning's column")
    args = ap.parse_args()
    C.setup()
    console = Console(width=170)
    names = [n for n in peer_models.PEERS if not args.only or n in args.only]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            row = run_peer(name, Path(d) / name, args.ratio)
            if not args.no_torch_pruning:
                row.update(torch_pruning_row(name, args.ratio))
            console.print(f"[bold]{name}[/]: {row['status']} ({row['wall_s']} s) {row['reason']}")
            rows.append(row)
    table = Table(title=f"Torch-Pruning's test models: potstill compile --ratio {args.ratio} --no-distill")
    for col in ("model", "Torch-Pruning test", "status", "MACs before", "MACs cut", "parity max|d|", "shapes", "reason",
                "TP status", "TP MACs cut"):
        table.add_column(col, justify="right" if col.startswith(("MACs", "parity")) else "left",
                         overflow="fold", max_width=60 if col == "reason" else None)
    style = {"pass": "green", "low-cut": "yellow", "nothing-prunable": "yellow", "failed": "red"}
    for r in rows:
        has = "macs_before" in r
        table.add_row(
            r["model"], r["source"], f"[{style[r['status']]}]{r['status']}[/]",
            f"{r['macs_before']:,}" if has else "-", f"{r['macs_cut']:.0%}" if has else "-",
            f"{r['parity_max_abs']:.1e}" if has else "-",
            " ".join(r.get("student_shapes", [])) or "-", r["reason"], r.get("tp_status", "-"),
            f"{r['tp_macs_cut']:.0%}" if "tp_macs_cut" in r else "-",
        )
    console.print(table)
    counts = {k: sum(r["status"] == k for r in rows) for k in style}
    console.print(f"pruned with parity (>= {MIN_CUT:.0%} fewer MACs): {counts['pass']}/{len(rows)}; "
                  f"pruned < {MIN_CUT:.0%}: {counts['low-cut']}; nothing prunable: {counts['nothing-prunable']}; "
                  f"failed: {counts['failed']}")
    tp_counts = {k: sum(r.get("tp_status") == k for r in rows)
                 for k in ("pass", "low-cut", "nothing", "changed-outputs", "failed")}
    if not args.no_torch_pruning:
        console.print(f"Torch-Pruning (MagnitudePruner, no ignored layers): {tp_counts['pass']}/{len(rows)} pruned >= "
                      f"{MIN_CUT:.0%} with every output's shape kept; changed an output's shape: "
                      f"{tp_counts['changed-outputs']}; failed: {tp_counts['failed']}")
    path = C.write_json("peer_suite", {
        "command": f"potstill compile peer_models.py:FACTORY --input-shape ... --ratio {args.ratio} --no-distill",
        "peer": "VainF/Torch-Pruning v1.6.1 tests/ (models without torchvision)",
        "min_cut": MIN_CUT, "counts": counts, "rows": rows,
        "torch_pruning": None if args.no_torch_pruning else {
            "version": _tp_version(), "call": f"MagnitudePruner(MagnitudeImportance(p=2), pruning_ratio={args.ratio})",
            "counts": tp_counts},
    })
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
