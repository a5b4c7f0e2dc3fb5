"""Cost model: MACs, parameters and peak activation memory per node, group, block and model.

MACs count multiply-accumulates of conv (``out_numel · C_in/groups · prod(kernel)``), linear
(``out_numel · in_features``), matmul (``out_numel · K``) and attention (``B·H·S·S'·(D + D_v)``).
Peak activation memory walks the graph in order, freeing each value after its last use.
A group's ``macs_per_unit`` is the MACs of the conv/linear layers whose weights it slices,
divided by their sliced dim and multiplied by the unit length: the saving of pruning one unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .ir import Analysis

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "int8": 1, "uint8": 1,
                "float64": 8}


@dataclass
class CostReport:
    macs: int
    params: int
    peak_activation_bytes: int
    node_macs: dict[str, int] = field(default_factory=dict)
    param_macs: dict[str, int] = field(default_factory=dict)

    @property
    def param_bytes(self) -> int:
        return self.params * 4

    def to_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "params": self.params, "peak_activation_bytes": self.peak_activation_bytes}


def _numel(shape: Any) -> int:
    return math.prod(shape) if shape else 1


def cost_model(analysis: Analysis, model: nn.Module) -> CostReport:
    g = analysis.ir.graph
    p2p = analysis.ir.param_names
    shapes = analysis.param_shapes
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
            macs = _numel(out) * _numel(w[1:])
            param_macs[p2p[args[1]]] = param_macs.get(p2p[args[1]], 0) + macs
        elif t.startswith("linear") and len(args) > 1 and args[1] in p2p:
            w = shapes[p2p[args[1]]]
            macs = _numel(out) * w[1]
            param_macs[p2p[args[1]]] = param_macs.get(p2p[args[1]], 0) + macs
        elif t.split(".")[0] in ("matmul", "bmm", "mm", "addmm", "baddbmm") and len(args) >= 2:
            a_shape = g.nodes[args[-2]]["shape"] if t.startswith(("addmm", "baddbmm")) else g.nodes[args[0]]["shape"]
            if a_shape:
                macs = _numel(out) * a_shape[-1]
        elif "scaled_dot_product" in t and len(args) >= 3:
            q, k, v = (g.nodes[a]["shape"] for a in args[:3])
            if q and k and v:
                macs = _numel(q[:-1]) * k[-2] * (q[-1] + v[-1])
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
