"""Measure a latency table on this machine and write it into a profile (``potstill profile``).

Each grid shape becomes a one-op model timed in the profile's runtime at its threads: a one-node
ONNX graph (``Conv`` or ``MatMul``+``Add``) in ONNX Runtime, or the PyTorch op for ``aoti`` profiles
(the closest runtime that runs here). Time per shape: warm-up, then the median of runs within a
small time box. Rows already in the output file are kept, not re-measured: a second run reads the
written table and measures only what is missing.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from potstill.errors import InputError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .loader import load_profile, write_profile
from .schema import DeviceProfile
from .table import LatencyEntry, LatencyTable

Shape = dict[str, Any]
_MEASURED = "; latency table measured on "


def default_grid(quick: bool = False) -> list[Shape]:
    """The shapes that matter for pruning decisions: widths around common channel counts.

    Full grid (well under a minute on 2 cores): dense 3×3 and 1×1 convs (square, and with a fixed
    input width and varying output width, as a pruned layer sees), depthwise 3×3 convs and linears at
    transformer token counts, with widths on and off multiples of 8. ``quick`` is a few seconds.
    """
    def conv(widths: Sequence[int], hw: int, kernel: int = 3, depthwise: bool = False) -> list[Shape]:
        return [
            {"op": "conv2d", "cin": w, "cout": w, "kernel": kernel, "hw": hw,
             "groups": w if depthwise else 1, "stride": 1}
            for w in widths
        ]

    def linear(widths: Sequence[int], tokens: int, cin: int | None = None) -> list[Shape]:
        return [{"op": "linear", "cin": cin or w, "cout": w, "tokens": tokens} for w in widths]

    if quick:
        return conv([16, 24, 32, 48], 14) + conv([16, 32], 14, depthwise=True) + linear([64, 96, 128], 16)
    def conv_out(cin: int, couts: Sequence[int], hw: int) -> list[Shape]:
        return [{"op": "conv2d", "cin": cin, "cout": c, "kernel": 3, "hw": hw, "groups": 1, "stride": 1}
                for c in couts if c != cin]

    return (
        conv([16, 24, 32, 40, 44, 48, 56, 64, 96, 128], 28)
        + conv_out(64, [32, 40, 44, 48, 56], 28)
        + conv_out(128, [64, 80, 88, 96, 112], 14)
        + conv([64, 96, 128, 160, 192, 256], 14)
        + conv([16, 24, 32, 48, 64, 96, 128], 28, kernel=1)
        + conv([16, 32, 48, 64, 96, 128], 28, depthwise=True)
        + linear([64, 128, 192, 256, 320, 384, 512, 768], 128, cin=384)
        + linear([256, 512, 1024, 1536], 1)
    )


def host_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, {platform.system()}"


def missing_shapes(table: LatencyTable | None, shapes: Sequence[Shape]) -> list[Shape]:
    """The grid shapes ``table`` does not have yet."""
    if table is None:
        return list(shapes)
    return [s for s in shapes if not table.has(s["op"], **{k: v for k, v in s.items() if k != "op"})]


def measure_table(
    profile: DeviceProfile,
    shapes: Sequence[Shape] | None = None,
    *,
    quick: bool = False,
    existing: LatencyTable | None = None,
    budget_s: float = 0.3,
    console: Console | None = None,
) -> LatencyTable:
    """Measure ``shapes`` (default: ``default_grid(quick)``) on this machine for ``profile``.

    Rows of ``existing`` are kept; only shapes it lacks are measured.
    """
    shapes = list(shapes) if shapes is not None else default_grid(quick)
    runtime = "torch" if profile.target == "aoti" else "onnxruntime"
    table = existing or LatencyTable(
        runtime=runtime, precision="fp32", threads=profile.threads, batch=1, measured_on=host_description()
    )
    todo = missing_shapes(table, shapes)
    timer = _torch_timer(profile) if runtime == "torch" else _ort_timer(profile)
    rows: list[LatencyEntry] = []
    with Progress(
        TextColumn("[bold]measuring[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console or Console(stderr=True), transient=True,
    ) as progress:
        task = progress.add_task(runtime, total=len(todo))
        for shape in todo:
            progress.update(task, description=_describe(shape))
            ms = timer(shape, budget_s)
            rows.append(LatencyEntry(ms=ms, **shape))
            progress.advance(task)
    return table.merged(rows)


def _describe(shape: Shape) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _ort_timer(profile: DeviceProfile) -> Callable[[Shape, float], float]:
    import onnxruntime as ort
    from potstill.targets.timing import session_options, time_callable

    def run(shape: Shape, budget_s: float) -> float:
        model, feeds = _one_op_onnx(shape)
        sess = ort.InferenceSession(model.SerializeToString(), session_options(profile.threads), providers=["CPUExecutionProvider"])
        return time_callable(lambda: sess.run(None, feeds), budget_s=budget_s)["median"]

    return run


def _torch_timer(profile: DeviceProfile) -> Callable[[Shape, float], float]:
    import torch
    from potstill.targets.timing import time_callable

    def run(shape: Shape, budget_s: float) -> float:
        previous = torch.get_num_threads()
        if profile.threads:
            torch.set_num_threads(profile.threads)
        try:
            if shape["op"] == "conv2d":
                layer: torch.nn.Module = torch.nn.Conv2d(
                    shape["cin"], shape["cout"], shape["kernel"], shape["stride"], shape["kernel"] // 2,
                    groups=shape["groups"],
                )
                x = torch.randn(1, shape["cin"], shape["hw"], shape["hw"])
            else:
                layer = torch.nn.Linear(shape["cin"], shape["cout"])
                x = torch.randn(shape["tokens"], shape["cin"])
            with torch.inference_mode():
                return time_callable(lambda: layer(x), budget_s=budget_s)["median"]
        finally:
            torch.set_num_threads(previous)

    return run


def _one_op_onnx(shape: Shape) -> tuple[Any, dict[str, np.ndarray]]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cin, cout = shape["cin"], shape["cout"]
    if shape["op"] == "conv2d":
        k, hw, groups, stride = shape["kernel"], shape["hw"], shape["groups"], shape["stride"]
        w = np.asarray(rng.standard_normal((cout, cin // groups, k, k)), dtype=np.float32)
        b = np.asarray(rng.standard_normal(cout), dtype=np.float32)
        node = helper.make_node(
            "Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2, group=groups
        )
        nodes, inits = [node], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        x_shape = [1, cin, hw, hw]
        y_shape = [1, cout, (hw - 1) // stride + 1, (hw - 1) // stride + 1]
    elif shape["op"] == "linear":
        w = np.asarray(rng.standard_normal((cin, cout)), dtype=np.float32)
        b = np.asarray(rng.standard_normal(cout), dtype=np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        x_shape = [shape["tokens"], cin]
        y_shape = [shape["tokens"], cout]
    else:
        raise InputError(f"cannot measure op '{shape['op']}' alone; measurable ops: conv2d, linear")
    graph = helper.make_graph(
        nodes, "one_op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model, {"x": np.asarray(rng.standard_normal(x_shape), dtype=np.float32)}


def profile_command(base: str, output: str, quick: bool = False) -> Path:
    """``potstill profile [--profile BASE] -o OUTPUT``: measure this machine, write a profile.

    The written profile is ``base`` with a latency table and the output's name. If ``output``
    already holds a profile with a table, its rows are read and kept and only missing shapes are
    measured.
    """
    out = Path(output)
    profile = load_profile(base)
    existing = profile.latency_table
    if out.is_file():
        previous = load_profile(out)
        existing = previous.latency_table or existing
    runtime = "torch" if profile.target == "aoti" else "onnxruntime"
    if existing is not None and (existing.runtime != runtime or existing.threads != profile.threads):
        existing = None  # measured under other settings: not comparable
    table = measure_table(profile, quick=quick, existing=existing)
    name = out.stem
    measured = profile.model_copy(
        update={
            "name": name,
            "description": f"{profile.description.split(_MEASURED)[0]}{_MEASURED}{table.measured_on}".lstrip("; "),
            "latency_table": table,
        }
    )
    header = (
        f"# potstill device profile '{name}', based on '{profile.name}'.\n"
        f"# Latency table: {len(table.entries)} rows measured with {table.runtime} ({table.precision}, "
        f"{table.threads or 'all'} threads) on {table.measured_on}.\n"
    )
    return write_profile(measured, out, header=header)
