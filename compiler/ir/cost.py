"""Cost model: MACs, parameters and peak activation memory per node, group, block and model.

MACs count multiply-accumulates of conv (``out_numel · C_in/groups · prod(kernel)``), linear
(``out_numel · in_features``), matmul (``out_numel · K``) and attention (``B·H·S·S'·(D + D_v)``).
Peak activation memory walks the graph in order, freeing each value after its last use.
A group's ``macs_per_unit`` is the MACs of the conv/linear layers whose weights it slices,
divided by their sliced dim and multiplied by the unit length: the saving of pruning one unit.
"""

from __future__ import annotations

import math
from typing import Any

from potstill.ir.coupling_rules import einsum_subscripts
from potstill.ir.types import Analysis, CostReport
from torch import fx, nn

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "int8": 1, "uint8": 1,
                "float64": 8}


def _numel(shape: Any) -> int:
    return math.prod(shape) if shape else 1


def cost_model(analysis: Analysis, model: nn.Module) -> CostReport:
    g = analysis.ir.graph
    p2p = analysis.ir.param_names
    shapes = analysis.param_shapes
    fx_nodes = {n.name: n for n in analysis.ir.exported.graph_module.graph.nodes}
    node_macs: dict[str, int] = {}
    param_macs: dict[str, int] = {}
    for name, d in g.nodes(data=True):
        if d["op"] != "call_function" or d["shape"] is None:
            continue
        t, out = d["target"], d["shape"]
        args = d["args"]
        macs = 0
        if t.startswith("conv") and len(args) > 1 and args[1] in p2p:
            w = shapes[p2p[args[1]]]
            # a transposed convolution multiplies every *input* element by a [C_out/groups, *k] slice
            transposed = t.startswith("conv_transpose") or (
                t.startswith("convolution") and len(fx_nodes[name].args) > 6 and bool(fx_nodes[name].args[6]))
            src = g.nodes[args[0]]["shape"]
            macs = _numel(src) * _numel(w[1:]) if transposed and src else _numel(out) * _numel(w[1:])
        elif t.startswith("linear") and len(args) > 1 and args[1] in p2p:
            macs = _numel(out) * shapes[p2p[args[1]]][1]
        elif t.split(".")[0] in ("matmul", "bmm", "mm", "addmm", "baddbmm") and len(args) >= 2:
            a_shape = g.nodes[args[-2]]["shape"] if t.startswith(("addmm", "baddbmm")) else g.nodes[args[0]]["shape"]
            if a_shape:
                macs = _numel(out) * a_shape[-1]
        elif t.startswith("einsum"):
            macs = _einsum_macs(fx_nodes[name])
        elif "scaled_dot_product" in t and len(args) >= 3:
            q, k, v = (g.nodes[a]["shape"] for a in args[:3])
            if q and k and v:
                macs = _numel(q[:-1]) * k[-2] * (q[-1] + v[-1])
        if macs and not t.startswith("scaled_dot_product"):
            weights = args[1:2] if t.startswith(("conv", "linear")) else args
            for p in {p2p[a] for a in weights if a in p2p}:
                param_macs[p] = param_macs.get(p, 0) + int(macs)
        node_macs[name] = int(macs)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    peak = _peak_activation(analysis)
    report = CostReport(sum(node_macs.values()), int(params), peak, node_macs, param_macs)
    for grp in analysis.groups:
        per_unit = 0.0
        pcount = 0
        for m in grp.members:
            size = shapes[m.param][m.dim]
            if m.role in ("in", "out") and m.param in param_macs:
                per_unit += param_macs[m.param] * m.unit_len / size
            pcount += _numel(shapes[m.param]) // size * m.unit_len
        grp.macs_per_unit = per_unit
        grp.params_per_unit = pcount
    return report


def _peak_activation(analysis: Analysis) -> int:
    g = analysis.ir.graph
    order = list(g.nodes)  # insertion order is the graph's topological order
    last_use: dict[str, int] = {}
    for i, n in enumerate(order):
        for p in g.predecessors(n):
            last_use[p] = i
    live = 0
    peak = 0
    sizes: dict[str, int] = {}
    for i, n in enumerate(order):
        d = g.nodes[n]
        if d["shape"] is not None and not (d["op"] == "placeholder" and n in analysis.ir.param_names):
            sizes[n] = _numel(d["shape"]) * _DTYPE_BYTES.get(d["dtype"], 4)
            live += sizes[n]
        peak = max(peak, live)
        for p in list(g.predecessors(n)):
            if last_use.get(p) == i and p in sizes:
                live -= sizes.pop(p)
    return int(peak)


def _einsum_macs(node: fx.Node) -> int:
    """Product of every letter's size: each output element sums over the contracted letters."""
    equation, operands = node.args[0], node.args[1]
    shapes = [tuple(o.meta["val"].shape) for o in operands]  # type: ignore[union-attr]
    try:
        subs, _ = einsum_subscripts(str(equation), [len(s) for s in shapes])
    except Exception:
        return 0
    size: dict[str, int] = {}
    for sub, shape in zip(subs, shapes):
        for c, n in zip(sub, shape):
            size[c] = max(size.get(c, 1), int(n))
    return math.prod(size.values())
