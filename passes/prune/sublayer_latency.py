"""Latency of a transformer sublayer as a function of its kept units, measured on this host.

Kwon et al., "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022, §4.1 and
App. A) search masks under a latency constraint with one lookup table per sublayer kind: the
latency of a multi-head attention block keeping ``h`` heads, ``LUT_mha(h)``, and of a feed-forward
block keeping ``f`` neurons, ``LUT_ffn(f)``, measured once (every layer of a stack has the same
shape). The model's latency is predicted as ``sum_layers LUT_mha(h_l) + LUT_ffn(f_l)``.

Each table is smoothed by their piecewise-linear fit: below a threshold ``T`` units a GEMM is bound
by overheads and costs a constant ``c``; above it the cost grows linearly,

    lat(k) = 0 (k = 0),   c (1 <= k <= T),   c + a (k - T) (k > T)

with ``(T, c, a)`` minimising the squared error over the table (``a >= 0``). The search
(``mask_search.py``) keeps ``T`` units of every group for the price ``c`` and buys the others at
``a`` each.

Here each block is a small ONNX graph timed in ONNX Runtime at the profile's threads and at the
token count the model will run (batch x sequence): attention is ``x W_q, x W_k, x W_v`` (``h * d``
columns), ``softmax(q k^T / sqrt(d) + mask) v`` and the output projection; the feed-forward block
is ``gelu(x W_1 + b_1) W_2 + b_2``. Unit counts between the timed points are interpolated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: sublayer kinds this module can time: attention heads and feed-forward neurons
KINDS = ("heads", "neurons")


@dataclass(frozen=True)
class PiecewiseLatency:
    """``lat(k)``: 0 at ``k = 0``, ``c`` up to ``threshold`` units, then ``c + slope * (k - threshold)``."""

    threshold: int
    c: float
    slope: float

    def __call__(self, k: int) -> float:
        if k <= 0:
            return 0.0
        return self.c + self.slope * max(0, k - self.threshold)


def fit_piecewise(points: Sequence[tuple[int, float]]) -> PiecewiseLatency:
    """The least-squares piecewise-linear fit of measured ``(units, ms)`` points (Kwon et al.):
    every threshold among the measured unit counts is tried; ``c`` is the mean below it and the
    slope (clamped at 0) the least-squares slope of what lies above.

    >>> f = fit_piecewise([(1, 2.0), (2, 2.0), (4, 2.0), (8, 6.0), (12, 10.0)])
    >>> (f.threshold, f.c, round(f.slope, 3))
    (4, 2.0, 1.0)
    """
    pts = sorted((int(k), float(ms)) for k, ms in points)
    if not pts:
        raise ValueError("fit_piecewise: no measured points")
    ks = np.array([k for k, _ in pts], dtype=np.float64)
    ys = np.array([ms for _, ms in pts], dtype=np.float64)
    best: tuple[float, PiecewiseLatency] | None = None
    for i in range(1, len(pts) + 1):
        threshold = int(ks[i - 1])
        c = float(ys[:i].mean())
        dx, dy = ks[i:] - threshold, ys[i:] - c
        slope = float((dx * dy).sum() / (dx * dx).sum()) if len(dx) else 0.0
        fn = PiecewiseLatency(threshold, c, max(slope, 0.0))
        err = float(sum((fn(int(k)) - y) ** 2 for k, y in zip(ks, ys)))
        if best is None or err < best[0] - 1e-12:
            best = (err, fn)
    assert best is not None  # pts is not empty
    return best[1]


def sample_counts(n_units: int, step: int, points: int = 12) -> list[int]:
    """About ``points`` aligned unit counts spread over ``[step, n_units]``, always with both ends."""
    cands = sorted({*range(step, n_units + 1, step), n_units})
    if len(cands) <= points:
        return cands
    idx = np.unique(np.round(np.linspace(0, len(cands) - 1, points)).astype(int))
    return [cands[i] for i in idx]


def _onnx_block(kind: str, units: int, unit_channels: int, hidden: int, batch: int, seq: int) -> bytes:
    """A one-block ONNX graph: attention with ``units`` heads of ``unit_channels``, or a
    feed-forward block with ``units * unit_channels`` neurons."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> object:
        return numpy_helper.from_array(np.asarray(rng.standard_normal(shape) * 0.02, dtype=np.float32), name)

    def const(name: str, values: Sequence[float], dtype: type = np.int64) -> object:
        return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)

    node = helper.make_node
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, hidden])]
    width = units * unit_channels
    if kind == "neurons":
        inits = [init("w1", hidden, width), init("b1", width), init("w2", width, hidden), init("b2", hidden),
                 const("half", [0.5], np.float32), const("one", [1.0], np.float32),
                 const("rsqrt2", [1 / math.sqrt(2)], np.float32)]
        nodes = [node("MatMul", ["x", "w1"], ["h0"]), node("Add", ["h0", "b1"], ["h1"]),
                 node("Mul", ["h1", "rsqrt2"], ["h2"]), node("Erf", ["h2"], ["h3"]),
                 node("Add", ["h3", "one"], ["h4"]), node("Mul", ["h1", "h4"], ["h5"]),
                 node("Mul", ["h5", "half"], ["h6"]), node("MatMul", ["h6", "w2"], ["y0"]),
                 node("Add", ["y0", "b2"], ["y"])]
    elif kind == "heads":
        d, h = unit_channels, units
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, 1, 1, seq]))
        inits = [init(f"w{p}", hidden, width) for p in "qkvo"[:3]] + [init("wo", width, hidden), init("bo", hidden)]
        inits += [init(f"b{p}", width) for p in "qkv"]
        inits += [const("split", [batch, seq, h, d]), const("merge", [batch, seq, width]),
                  const("scale", [1 / math.sqrt(d)], np.float32)]
        nodes = []
        for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            nodes += [node("MatMul", ["x", f"w{p}"], [f"{p}0"]), node("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
                      node("Reshape", [f"{p}1", "split"], [f"{p}2"]), node("Transpose", [f"{p}2"], [p], perm=perm)]
        nodes += [node("MatMul", ["q", "k"], ["s0"]), node("Mul", ["s0", "scale"], ["s1"]),
                  node("Add", ["s1", "mask"], ["s2"]), node("Softmax", ["s2"], ["p"], axis=-1),
                  node("MatMul", ["p", "v"], ["c0"]), node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
                  node("Reshape", ["c1", "merge"], ["c2"]), node("MatMul", ["c2", "wo"], ["y0"]),
                  node("Add", ["y0", "bo"], ["y"])]
    else:
        raise ValueError(f"cannot time a '{kind}' sublayer; kinds: {KINDS}")
    graph = helper.make_graph(nodes, f"{kind}_{units}", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, hidden])],
                              initializer=inits)  # type: ignore[arg-type]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return bytes(model.SerializeToString())


def _session(kind: str, units: int, unit_channels: int, hidden: int, batch: int, seq: int,
             threads: int | None) -> tuple[Any, dict[str, np.ndarray]]:
    import onnxruntime as ort
    from potstill.targets.timing import session_options

    sess = ort.InferenceSession(_onnx_block(kind, units, unit_channels, hidden, batch, seq), session_options(threads),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {"x": np.asarray(rng.standard_normal((batch, seq, hidden)), dtype=np.float32)}
    if kind == "heads":
        feeds["mask"] = np.zeros((batch, 1, 1, seq), dtype=np.float32)
    return sess, feeds


def time_blocks(kind: str, counts: Sequence[int], unit_channels: int, hidden: int, batch: int, seq: int,
                threads: int | None, rounds: int = 5, per_round: int = 3) -> list[float]:
    """Milliseconds of one block at each unit count in ONNX Runtime (CPU, ``threads`` intra-op
    threads): the counts are timed in interleaved rounds and each keeps its fastest run, so a burst
    of load on a shared host inflates no single count."""
    sessions = [_session(kind, k, unit_channels, hidden, batch, seq, threads) for k in counts]
    best = [math.inf] * len(counts)
    for sess, feeds in sessions:  # warm-up
        sess.run(None, feeds)
    for r in range(rounds):
        order = range(len(counts)) if r % 2 == 0 else reversed(range(len(counts)))
        for i in order:
            sess, feeds = sessions[i]
            for _ in range(per_round):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


@dataclass(frozen=True)
class SublayerTable:
    """A measured table ``(units, ms)`` of one sublayer shape and its piecewise-linear fit."""

    kind: str
    n_units: int
    unit_channels: int
    hidden: int
    tokens: tuple[int, int]
    points: tuple[tuple[int, float], ...]
    fit: PiecewiseLatency

    def record(self) -> dict[str, object]:
        return {"kind": self.kind, "n_units": self.n_units, "unit_channels": self.unit_channels,
                "hidden": self.hidden, "batch_seq": list(self.tokens),
                "points_ms": [[k, round(ms, 4)] for k, ms in self.points],
                "fit": {"threshold": self.fit.threshold, "c_ms": self.fit.c, "slope_ms": self.fit.slope}}


def measure_sublayer(kind: str, n_units: int, unit_channels: int, hidden: int, batch: int, seq: int,
                     threads: int | None, step: int = 1, points: int = 12) -> SublayerTable:
    """Time the block at about ``points`` aligned unit counts and fit ``PiecewiseLatency``."""
    counts = sample_counts(n_units, step, points)
    pts = tuple(zip(counts, time_blocks(kind, counts, unit_channels, hidden, batch, seq, threads)))
    return SublayerTable(kind, n_units, unit_channels, hidden, (batch, seq), pts, fit_piecewise(pts))
