"""SmoothQuant (Xiao et al., ICML 2023) on an ONNX graph, before dynamic INT8.

Dynamic INT8 gives each activation tensor one scale per batch, so a few outlier channels (every
transformer's residual stream has some) leave the other channels a handful of integer levels. SmoothQuant
moves that difficulty into the weights, where per-channel scales absorb it: for every activation
tensor ``X`` read by matrix products with constant weights ``W_i`` (``X @ W_i``), with ``a_j`` the
largest ``|X[..., j]|`` over the calibration batches and ``w_j`` the largest ``|W_i[j, :]|`` over
the group,

    s_j = a_j ** alpha / w_j ** (1 - alpha),    X @ W_i  ==  (X / s) @ (diag(s) W_i)

so the graph computes the same function in FP32 (up to rounding) while ``X / s`` has flat channels.
The division is one ``Mul`` by ``1 / s`` per group, inserted where the group reads ``X``: a
``[tokens, hidden]`` elementwise product beside the matrix products it serves. The graph-level form
covers every family alike (the norm before attention, the attention output, the gated MLP's product,
an encoder's GELU output, an untied LM head; a head tied to the embedding is left alone), where
folding into the preceding norm would be written per architecture. NNCF's own SmoothQuant does the
same insertion but only inside its static quantiser.

The strength ``alpha`` is chosen per group, as Intel Neural Compressor's auto-tuned SmoothQuant does:
the one among ``ALPHAS`` (or none) that gives the least simulated dynamic-INT8 error of the group's
products on sampled calibration rows, the activation range taken over every calibration token (the
outlier tokens set the run-time scale). The INT8 lowering keeps the smoothed engine only when it
measures better than the plain one (``potstill.targets.int8.smooth_if_better``).

Measured on an AVX2 host without VNNI (7-bit weights), 2 threads:
- all-MiniLM-L6-v2, 256 held-out sentences (8 x 64 tokens): dynamic INT8 of the teacher's engine kept
  mean cosine 0.9917 and nearest-neighbour agreement 0.875; smoothed (24 activation tensors, 36
  products), 0.9959 and 0.918, at 1.49x against 1.54x the FP32 engine's speed;
- SmolLM2-135M, 64 held-out sentences: perplexity 2.02x the FP32 engine's and next-token agreement
  0.47; smoothed (119 of 120 tensors), 1.13x and 0.72, at 1.39x against 1.42x
  (``bench/smoothquant.py minilm smollm2``).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx


@dataclass
class Smoothed:
    """What ``smooth_onnx`` did: activation tensors smoothed of those it could smooth, the products
    they feed, the largest activation channel over the median before smoothing (how much there was
    to move), the median of the strengths chosen, and the limit they were chosen under."""

    groups: int
    candidates: int
    products: int
    outlier_ratio: float
    median_alpha: float
    max_alpha: float = 1.0

    def describe(self) -> str:
        limit = f" (alpha up to {self.max_alpha:g})" if self.max_alpha < max(ALPHAS) else ""
        return (f"SmoothQuant{limit}: {self.groups} of {self.candidates} activation tensors rescaled, feeding "
                f"{self.products} matrix products (median alpha {self.median_alpha:g}; largest channel up to "
                f"{self.outlier_ratio:.0f}x the median)")


def weight_groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor name -> the MatMul nodes that read it against a 2-D constant weight read by no
    other node (a weight shared with an embedding lookup cannot take the scales), in float32. Other
    readers of the activation (a residual sum) keep reading it unscaled."""
    from onnx import TensorProto

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        act, weight = node.input
        if act in inits or weight not in inits or len(inits[weight].dims) != 2 or readers[weight] != 1 \
                or inits[weight].data_type != TensorProto.FLOAT:  # the probe reads activations as float32
            continue
        groups[act].append(node)
    return dict(groups)


#: the migration strengths tried per group (SmoothQuant's auto-tuned alpha, as Intel Neural Compressor
#: searches it): 0.5 is the paper's choice for OPT and BLOOM, 0.75-0.85 for stronger outliers (GLM-130B)
ALPHAS = (0.3, 0.5, 0.65, 0.8, 0.9)
#: token rows per activation tensor kept to judge each alpha (from the first calibration batches)
SAMPLE_ROWS = 256


def activation_statistics(model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
                          open_session: Callable[[Path], Any], workdir: Path
                          ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per named tensor: the per-channel (last axis) minima and maxima over the calibration feeds, and
    up to ``SAMPLE_ROWS`` of its rows, read by one ONNX Runtime session with those tensors as outputs."""
    import onnx
    from onnx import TensorProto, helper

    from .large_onnx import save_onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".smoothquant-probe.") as tmp:
        session = open_session(save_onnx(probe, Path(tmp) / "probe.onnx"))
    del probe
    stats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    rng = np.random.default_rng(0)
    for feed in feeds:
        for name, value in zip(names, session.run(list(names), feed), strict=True):
            rows = value.reshape(-1, value.shape[-1])
            lo, hi = rows.min(axis=0), rows.max(axis=0)
            if name not in stats:
                pick = rng.choice(len(rows), size=min(SAMPLE_ROWS, len(rows)), replace=False)
                stats[name] = (lo, hi, rows[pick].astype(np.float32))
            else:
                old = stats[name]
                stats[name] = (np.minimum(old[0], lo), np.maximum(old[1], hi), old[2])
    return stats


def dynamic_int8_error(x: np.ndarray, bounds: tuple[np.ndarray, np.ndarray], weights: Sequence[np.ndarray],
                       s: np.ndarray, weight_levels: int) -> float:
    """Squared error of ``x @ W`` summed over the group when ``x / s`` takes ONNX Runtime's dynamic
    quantisation (one asymmetric 8-bit scale over the whole tensor, whose range ``bounds``, the
    per-channel minima and maxima, set: a sample of rows would miss the outlier tokens that set it)
    and ``W * s`` symmetric per-column weights of ``weight_levels`` levels a side (127, or 63)."""
    xs = x / s
    lo, hi = min(float((bounds[0] / s).min()), 0.0), max(float((bounds[1] / s).max()), 0.0)
    step = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / step)
    xq = (np.clip(np.round(xs / step) + zero, 0, 255) - zero) * step
    err = 0.0
    for w in weights:
        ws = w * s[:, None]
        wstep = np.maximum(np.abs(ws).max(axis=0), 1e-12) / weight_levels
        wq = np.clip(np.round(ws / wstep), -weight_levels, weight_levels) * wstep
        err += float(np.square(xq @ wq - x @ w).sum())
    return err


def best_scales(bounds: tuple[np.ndarray, np.ndarray], x: np.ndarray, weights: Sequence[np.ndarray],
                weight_levels: int, alphas: Sequence[float] = ALPHAS) -> tuple[np.ndarray | None, float | None]:
    """The SmoothQuant scales, among ``alphas`` and none, that give the least simulated INT8 error
    on the sampled rows ``x``: (scales, alpha), or (None, None) where smoothing does not help."""
    a = np.maximum(np.abs(bounds[0]), np.abs(bounds[1]))
    w = np.max([np.abs(wt).max(axis=1) for wt in weights], axis=0)
    best: tuple[float, np.ndarray | None, float | None] = (
        dynamic_int8_error(x, bounds, weights, np.ones_like(a), weight_levels), None, None)
    for alpha in alphas:
        s = np.clip(np.maximum(a, 1e-5) ** alpha / np.maximum(w, 1e-5) ** (1 - alpha), 1e-5, 1e5)
        err = dynamic_int8_error(x, bounds, weights, s, weight_levels)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


class SmoothQuant:
    """An FP32 graph's smoothable groups and their activation statistics over ``feeds``, gathered
    once; ``write`` saves a rescaled copy for each strength limit the INT8 lowering tries."""

    def __init__(self, fp32_path: Path, feeds: Sequence[dict[str, np.ndarray]],
                 open_session: Callable[[Path], Any], workdir: Path) -> None:
        import onnx

        self.model = onnx.load(str(fp32_path))
        groups = weight_groups(self.model)
        self.candidates = len(groups)
        self.stats = activation_statistics(self.model, list(groups), feeds, open_session, workdir) if groups else {}

    def write(self, out_path: Path, *, weight_bits: int = 8, max_alpha: float = 1.0) -> Smoothed:
        """Save the graph to ``out_path`` with every constant-weight matrix product's input divided
        per channel by ``s`` and its weight rows multiplied by it: ``s`` from the activation maxima
        with the strength (of ``ALPHAS`` up to ``max_alpha``) that gives the group the least simulated
        dynamic-INT8 error, the group left alone where none lowers it. The copy computes the same
        function in FP32; a dynamic quantiser then reads flatter activations."""
        import onnx
        from onnx import helper, numpy_helper

        from .large_onnx import save_onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        inits = {i.name: i for i in model.graph.initializer}
        levels = 2 ** (weight_bits - 1) - 1
        alphas = [a for a in ALPHAS if a <= max_alpha]
        ratios: list[float] = []
        chosen: list[float] = []
        new_nodes: list[tuple[str, onnx.NodeProto]] = []
        products = 0
        for act, nodes in weight_groups(model).items():
            lo, hi, x = (v.astype(np.float64) for v in self.stats[act])
            weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in nodes]
            if x.shape[1] != weights[0].shape[0] or not all(np.all(np.isfinite(v)) for v in (lo, hi, x)):
                continue
            s, alpha = best_scales((lo, hi), x, weights, levels, alphas)
            if s is None or alpha is None:
                continue
            a = np.maximum(np.abs(lo), np.abs(hi))
            ratios.append(float(a.max() / max(float(np.median(a)), 1e-12)))
            chosen.append(alpha)
            scaled, scale = f"{act}_smoothed", f"{act}_smooth_scale"
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale))
            new_nodes.append((act, helper.make_node("Mul", [act, scale], [scaled], name=f"{act}_smooth")))
            for node, wt in zip(nodes, weights, strict=True):
                init = inits[node.input[1]]
                init.CopyFrom(numpy_helper.from_array((wt * s[:, None]).astype(np.float32), init.name))
                node.input[0] = scaled
                products += 1
        insert_after(model, new_nodes)
        save_onnx(model, out_path)
        return Smoothed(len(new_nodes), self.candidates, products, max(ratios, default=1.0),
                        float(np.median(chosen)) if chosen else 0.0, max_alpha)


def smooth_onnx(fp32_path: Path, out_path: Path, feeds: Sequence[dict[str, np.ndarray]],
                open_session: Callable[[Path], Any], *, weight_bits: int = 8, max_alpha: float = 1.0) -> Smoothed:
    """``fp32_path`` rescaled by SmoothQuant (statistics over ``feeds``), saved to ``out_path``."""
    return SmoothQuant(fp32_path, feeds, open_session, Path(out_path).parent).write(
        out_path, weight_bits=weight_bits, max_alpha=max_alpha)


def insert_after(model: onnx.ModelProto, placed: Sequence[tuple[str, onnx.NodeProto]]) -> None:
    """Insert each node right after the node that produces its tensor (first for graph inputs), so
    the graph stays topologically sorted."""
    graph = model.graph
    after: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for tensor, node in placed:
        after[tensor].append(node)
    nodes = list(graph.node)
    ordered = [n for t in [i.name for i in graph.input] + [i.name for i in graph.initializer] for n in after.pop(t, [])]
    for node in nodes:
        ordered.append(node)
        for out in node.output:
            ordered += after.pop(out, [])
    del graph.node[:]
    graph.node.extend(ordered)
