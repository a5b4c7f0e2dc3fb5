"""Measure a latency table on this machine and write it into a profile (``potstill profile``).

Each grid shape becomes a one-op model timed in the profile's runtime at its threads: a one-node
ONNX graph (``Conv`` or ``MatMul``+``Add``) in ONNX Runtime, or the PyTorch op for ``aoti`` profiles
(the closest runtime that runs here). Time per shape: warm-up, then the median of runs within a
small time box. Rows already in the output file are kept, not re-measured: a second run reads the
written table and measures only what is missing.

The full grid also times output widths one channel apart (``alignment_grid``), from which
``measured_channel_multiple`` reads the lane width the runtime computes channels in: where every
width between two multiples of ``M`` costs what the wider multiple costs, pruning to it saves MACs
but no time, so kept widths are aligned to ``M``. The written profile's ``channel_multiple`` is that
measurement (1 where no width step shows), not an assumption about the vector unit.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
#: lane widths ``measured_channel_multiple`` tests, narrowest first
LANES = (2, 4, 8, 16)
#: a series whose fitted time grows less than this fraction over its widths shows no width cost
_FLAT = 0.05


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

    return alignment_grid() + (
        conv([16, 24, 32, 40, 44, 48, 56, 64, 96, 128], 28)
        + conv_out(64, [32, 40, 44, 48, 56], 28)
        + conv_out(128, [64, 80, 88, 96, 112], 14)
        + conv([64, 96, 128, 160, 192, 256], 14)
        + conv([16, 24, 32, 48, 64, 96, 128], 28, kernel=1)
        + conv([16, 32, 48, 64, 96, 128], 28, depthwise=True)
        + linear([64, 128, 192, 256, 320, 384, 512, 768], 128, cin=384)
        + linear([256, 512, 1024, 1536], 1)
    )


def alignment_grid() -> list[Shape]:
    """Output widths one channel apart, 32 to 64 (convs) and 224 to 256 (a linear at 256 tokens).

    A pruned layer keeps its input width and loses output channels, so each series fixes ``cin``.
    """
    def series(op: str, couts: range, **shape: Any) -> list[Shape]:
        return [{"op": op, **shape, "cout": c} for c in couts]

    dense = {"hw": 28, "groups": 1, "stride": 1}
    return (
        series("conv2d", range(32, 65), cin=64, kernel=3, **dense)
        + series("conv2d", range(32, 65), cin=96, kernel=1, **dense)
        + series("linear", range(224, 257), cin=768, tokens=256)
    )


@dataclass(frozen=True)
class LaneReading:
    """What ``measured_channel_multiple`` read off a table: the multiple and, per series, its lane."""

    multiple: int | None  # None: the table has no series that shows a width cost
    series: dict[str, int | None]  # series label -> its lane (1: smooth), None where flat or too short

    def describe(self) -> str:
        parts = [f"{k}: {'flat' if v is None else v}" for k, v in self.series.items()]
        return "; ".join(parts) or "no width series measured"


def _lane(widths: np.ndarray, ms: np.ndarray) -> int | None:
    """The lane ``M`` (1 or one of ``LANES``) whose cost model fits the measured widths best.

    Lane ``M`` predicts ``t = a + b * up(w)``, ``up(w)`` the multiple of ``M`` at or above ``w``:
    every width between two multiples costs the wider one. ``M = 1`` is time that follows the
    channel count. Each model is a least-squares line in ``up(w)``, so all have two parameters; a
    wider lane replaces a narrower one only when it at least halves the squared residual, so noise
    on a smooth series does not read as a lane. None where the series is too short or its time does
    not grow with width.
    """
    if len(widths) < 2 * max(LANES):
        return None
    slope, _ = np.polyfit(widths, ms, 1)
    if slope * (widths.max() - widths.min()) < _FLAT * float(np.median(ms)):
        return None
    best, best_ssr = 1, math.inf
    for m in (1, *LANES):
        up = np.ceil(widths / m) * m
        (b, _), ssr, *_ = np.polyfit(up, ms, 1, full=True)
        err = float(ssr[0]) if len(ssr) else 0.0
        if b > 0 and (best_ssr == math.inf or err < 0.5 * best_ssr):
            best, best_ssr = m, err
    return best


def _longest_run(rows: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The longest stretch of ``(width, ms)`` rows, sorted by width, whose widths run one apart."""
    best: list[tuple[int, float]] = []
    run: list[tuple[int, float]] = []
    for row in rows:
        run = [*run, row] if run and row[0] == run[-1][0] + 1 else [row]
        best = run if len(run) > len(best) else best
    return best


def measured_channel_multiple(table: LatencyTable) -> LaneReading:
    """The channel multiple the measured runtime rewards: the widest lane any width series shows.

    A series is the rows of one op and input shape whose output widths run one channel apart
    (``alignment_grid``). A lane shown by one kind of layer is worth aligning every layer to: a
    misaligned width there wastes up to ``M - 1`` channels of time, an aligned one elsewhere costs
    only allocation granularity.
    """
    groups: dict[str, list[tuple[int, float]]] = {}
    for e in table.entries:
        if e.op == "model" or e.cout is None:
            continue
        if e.op == "conv2d":
            label = f"conv{e.kernel}x{e.kernel} {e.cin}->cout @{e.hw}px" + (f" g{e.groups}" if e.groups != 1 else "")
        else:
            label = f"linear {e.cin}->cout x{e.tokens}"
        groups.setdefault(label, []).append((e.cout, e.ms))
    series: dict[str, int | None] = {}
    for label, rows in groups.items():
        run = _longest_run(sorted(rows))  # only consecutive widths show a lane
        if len(run) >= 2 * max(LANES):
            series[label] = _lane(np.array([w for w, _ in run], dtype=float), np.array([t for _, t in run]))
    lanes = [v for v in series.values() if v is not None]
    return LaneReading(max(lanes) if lanes else None, series)


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
    rounds: int = 3,
    console: Console | None = None,
) -> LatencyTable:
    """Measure ``shapes`` (default: ``default_grid(quick)``) on this machine for ``profile``.

    Rows of ``existing`` are kept; only shapes it lacks are measured. Each shape gets ``budget_s``
    in all, spread over ``rounds`` interleaved passes over every shape (in a shuffled order each
    pass), and its row is the median of the passes' medians: drift in the machine's load then
    falls on every width alike instead of on the widths measured during it.
    """
    shapes = list(shapes) if shapes is not None else default_grid(quick)
    runtime = "torch" if profile.target == "aoti" else "onnxruntime"
    table = existing or LatencyTable(
        runtime=runtime, precision="fp32", threads=profile.threads, batch=1, measured_on=host_description()
    )
    from potstill.targets.timing import time_callable

    todo = missing_shapes(table, shapes)
    prepare = _torch_op if runtime == "torch" else _ort_op(profile)
    order = np.random.default_rng(0)
    samples: list[list[float]] = [[] for _ in todo]
    with Progress(
        TextColumn("[bold]measuring[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console or Console(stderr=True), transient=True,
    ) as progress:
        task = progress.add_task(runtime, total=len(todo) * (rounds + 1))
        calls = []
        for shape in todo:
            progress.update(task, description=f"preparing {_describe(shape)}")
            calls.append(prepare(shape))
            progress.advance(task)
        with _threads(profile.threads if runtime == "torch" else None):
            for r in range(rounds):
                for i in order.permutation(len(todo)):
                    progress.update(task, description=f"round {r + 1}/{rounds} {_describe(todo[i])}")
                    samples[i].append(time_callable(calls[i], budget_s=budget_s / rounds)["median"])
                    progress.advance(task)
    rows = [LatencyEntry(ms=float(np.median(ms)), **shape) for shape, ms in zip(todo, samples, strict=True)]
    return table.merged(rows)


def _describe(shape: Shape) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _ort_op(profile: DeviceProfile) -> Callable[[Shape], Callable[[], Any]]:
    """A builder of one-op ONNX Runtime sessions at the profile's threads."""
    import onnxruntime as ort
    from potstill.targets.timing import session_options

    def prepare(shape: Shape) -> Callable[[], Any]:
        model, feeds = _one_op_onnx(shape)
        sess = ort.InferenceSession(model.SerializeToString(), session_options(profile.threads), providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, feeds)

    return prepare


def _torch_op(shape: Shape) -> Callable[[], Any]:
    """The PyTorch op of ``shape`` on a random input, run under inference mode."""
    import torch

    if shape["op"] == "conv2d":
        layer: torch.nn.Module = torch.nn.Conv2d(
            shape["cin"], shape["cout"], shape["kernel"], shape["stride"], shape["kernel"] // 2, groups=shape["groups"],
        )
        x = torch.randn(1, shape["cin"], shape["hw"], shape["hw"])
    else:
        layer = torch.nn.Linear(shape["cin"], shape["cout"])
        x = torch.randn(shape["tokens"], shape["cin"])

    def run() -> Any:
        with torch.inference_mode():
            return layer(x)

    return run


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``n`` (if given) for the block, then restored."""
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def profile_command(base: str, output: str, quick: bool = False, console: Console | None = None) -> Path:
    """``potstill profile [--profile BASE] -o OUTPUT``: measure this machine, write a profile.

    The written profile is ``base`` with a latency table, the output's name and the channel multiple
    the table shows (``measured_channel_multiple``; ``base``'s where no width series was measured,
    as with ``quick``). If ``output`` already holds a profile with a table, its rows are read and
    kept and only missing shapes are measured.
    """
    console = console or Console(stderr=True)
    out = Path(output)
    profile = load_profile(base)
    existing = profile.latency_table
    if out.is_file():
        previous = load_profile(out)
        existing = previous.latency_table or existing
    runtime = "torch" if profile.target == "aoti" else "onnxruntime"
    if existing is not None and (existing.runtime != runtime or existing.threads != profile.threads):
        existing = None  # measured under other settings: not comparable
    table = measure_table(profile, quick=quick, existing=existing, console=console)
    reading = measured_channel_multiple(table)
    multiple = reading.multiple or profile.channel_multiple
    if reading.multiple is None:
        console.print(f"channel multiple: no width series shows a cost here ({reading.describe()}); kept "
                      f"{profile.channel_multiple} from '{profile.name}'" + (" (run without --quick to measure it)"
                                                                             if quick else ""), markup=False)
    else:
        console.print(f"channel multiple: {multiple}, measured (lane per series: {reading.describe()})", markup=False)
    name = out.stem
    measured = profile.model_copy(
        update={
            "name": name,
            "description": f"{profile.description.split(_MEASURED)[0]}{_MEASURED}{table.measured_on}".lstrip("; "),
            "latency_table": table,
            "channel_multiple": multiple,
        }
    )
    how = "measured" if reading.multiple is not None else f"from '{profile.name}'"
    header = (
        f"# potstill device profile '{name}', based on '{profile.name}'.\n"
        f"# Latency table: {len(table.entries)} rows measured with {table.runtime} ({table.precision}, "
        f"{table.threads or 'all'} threads) on {table.measured_on}.\n"
        f"# channel_multiple {multiple} ({how}; lane per width series: {reading.describe()}).\n"
    )
    return write_profile(measured, out, header=header)
