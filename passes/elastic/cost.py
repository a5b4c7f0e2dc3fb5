"""Fast per-configuration cost predictors: latency and memory without extracting a subnet.

Every conv / linear node of the supernet's graph is a row: its weight, its input and output shapes,
and which elastic groups slice its in- and out-dims. For a configuration a row's widths are

    c_eff = c − Σ_g (n_g − k_g) · len_g          (units dropped by each narrowing group)

and rows inside dropped blocks vanish. Latency is ``Σ_rows op_latency_ms(profile, op, shape)`` —
the profile's measured table (interpolated) where it has the op, else the roofline — then mapped
through ``a·t + b`` fitted on measured anchors (the largest and smallest subnets timed on the real
engine), so per-layer lookups that miss fixed costs (pooling, copies, session overhead) are
corrected by measurement. Memory is ``weights + peak activations``: weights from the sliced
parameter sizes, activations by walking the graph with each value scaled by the kept fraction of
its producer's out-dim (values inherit it through element-wise ops), both at the profile's
precision and batch. Finalists are re-measured exactly (``potstill.ir.cost`` on the extracted
subnet, and the engine's timer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from potstill.profiles.latency import BYTES_PER_ELEMENT, op_latency_ms

from .space import SubnetConfig
from .supernet import Supernet


@dataclass
class _Row:
    node: str
    op: str  # conv2d | linear
    param: str
    module: str
    shape: dict[str, int]
    batch: int


@dataclass
class CostModel:
    """Latency (ms) and memory (MB) predictions for configurations of one supernet and profile."""

    net: Supernet
    profile: Any
    batch: int
    example_batch: int
    rows: list[_Row] = field(default_factory=list)
    scale: float = 1.0
    offset: float = 0.0
    source: str = "roofline"
    _dims: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def build(cls, net: Supernet, profile: Any, example_batch: int) -> CostModel:
        batch = int(profile.batch) if getattr(profile, "batch", None) else example_batch
        model = cls(net, profile, batch, example_batch)
        a = net.analysis
        for d in net.space.width_dims:
            g = a.groups[d.group]
            for m in g.members:
                model._dims.setdefault((m.param, m.dim), []).append((d.group, m.unit_len))
        g = a.ir.graph
        p2p = a.ir.param_names
        for name, nd in g.nodes(data=True):
            t = nd["target"]
            if nd["op"] != "call_function" or nd["shape"] is None or len(nd["args"]) < 2 or nd["args"][1] not in p2p:
                continue
            w = p2p[nd["args"][1]]
            wshape = a.param_shapes[w]
            x_shape = g.nodes[nd["args"][0]]["shape"]
            if t.startswith("conv") and len(wshape) == 4 and x_shape:
                groups = a.conv_groups.get(w, 1)
                stride = max(1, round(x_shape[-1] / max(nd["shape"][-1], 1)))
                shape = {"cin": wshape[1] * groups, "cout": wshape[0], "kernel": wshape[-1], "hw": x_shape[-1],
                         "groups": groups, "stride": stride}
                model.rows.append(_Row(name, "conv2d", w, nd["module"], shape, x_shape[0]))
            elif t.startswith("linear") and len(wshape) == 2:
                tokens = math.prod(nd["shape"][:-1]) // max(nd["shape"][0], 1) if len(nd["shape"]) > 1 else 1
                shape = {"cin": wshape[1], "cout": wshape[0], "tokens": max(tokens, 1)}
                model.rows.append(_Row(name, "linear", w, nd["module"], shape, nd["shape"][0]))
        if profile.latency_table is not None and {"conv2d", "linear"} & set(profile.latency_table.ops()):
            model.source = "table"
        return model

    # -- widths ------------------------------------------------------------------------------------

    def _size(self, param: str, dim: int, full: int, widths: dict[int, int]) -> int:
        size = full
        for gid, unit_len in self._dims.get((param, dim), ()):
            k = widths.get(gid)
            if k is not None:
                size -= (self.net.analysis.groups[gid].n_units - k) * unit_len
        return size

    @staticmethod
    def _removed(module: str, removed: list[str]) -> bool:
        return any(module == b or module.startswith(b + ".") for b in removed)

    # -- latency -----------------------------------------------------------------------------------

    def raw_latency_ms(self, config: SubnetConfig) -> float:
        """Σ per-layer latency at the profile's batch, before calibration."""
        widths = dict(config.widths)
        removed = self.net.space.removed_blocks(config)
        total = 0.0
        for r in self.rows:
            if self._removed(r.module, removed):
                continue
            shape = dict(r.shape)
            cout = self._size(r.param, 0, shape["cout"], widths)
            if r.op == "conv2d":
                per_group_in = self._size(r.param, 1, shape["cin"] // shape["groups"], widths)
                groups = shape["groups"]
                if groups > 1 and groups == shape["cout"]:  # depthwise: groups follow the channels
                    groups = cout
                shape.update(cin=per_group_in * groups, cout=cout, groups=groups)
                ms, _ = op_latency_ms(self.profile, "conv2d", **shape)
                total += ms * self.batch
            else:
                shape.update(cin=self._size(r.param, 1, shape["cin"], widths), cout=cout)
                shape["tokens"] = shape["tokens"] * self.batch
                ms, _ = op_latency_ms(self.profile, "linear", **shape)
                total += ms
        return total

    def calibrate(self, measured: list[tuple[SubnetConfig, float]]) -> None:
        """Fit ``a·raw + b`` to measured latencies (one point: a ratio; two or more: least squares)."""
        pts = [(self.raw_latency_ms(c), ms) for c, ms in measured]
        if len(pts) == 1 or len({round(p[0], 12) for p in pts}) < 2:
            raw = sum(p[0] for p in pts)
            self.scale, self.offset = (sum(p[1] for p in pts) / raw if raw > 0 else 1.0), 0.0
        else:
            n = len(pts)
            mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
            var = sum((p[0] - mx) ** 2 for p in pts)
            a = sum((p[0] - mx) * (p[1] - my) for p in pts) / var
            self.scale, self.offset = max(a, 0.0), my - max(a, 0.0) * mx
        self.source += "+measured anchors"

    def latency_ms(self, config: SubnetConfig) -> float:
        return self.scale * self.raw_latency_ms(config) + self.offset

    # -- memory ------------------------------------------------------------------------------------

    def weight_bytes(self, config: SubnetConfig) -> float:
        widths = dict(config.widths)
        removed = self.net.space.removed_blocks(config)
        elem = BYTES_PER_ELEMENT.get(self.profile.precision, 4)
        total = 0
        for name, p in self.net.model.named_parameters():
            if self._removed(name.rsplit(".", 1)[0], removed):
                continue
            total += math.prod(self._size(name, d, s, widths) for d, s in enumerate(p.shape))
        return float(total * elem)

    def activation_bytes(self, config: SubnetConfig) -> float:
        """Peak live activations (liveness walk as in ``potstill.ir.cost``), widths scaled per value."""
        a = self.net.analysis
        g = a.ir.graph
        widths = dict(config.widths)
        removed = self.net.space.removed_blocks(config)
        p2p = a.ir.param_names
        frac: dict[str, float] = {}
        order = list(g.nodes)
        last_use: dict[str, int] = {}
        for i, n in enumerate(order):
            for p in g.predecessors(n):
                last_use[p] = i
        live = peak = 0.0
        sizes: dict[str, float] = {}
        elem = BYTES_PER_ELEMENT.get(self.profile.precision, 4)
        for i, n in enumerate(order):
            d = g.nodes[n]
            if d["shape"] is not None and not (d["op"] == "placeholder" and n in p2p):
                f = 1.0
                args = d["args"]
                if d["op"] == "call_function" and len(args) > 1 and args[1] in p2p and \
                        d["target"].startswith(("conv", "linear")):
                    w = p2p[args[1]]
                    full = a.param_shapes[w][0]
                    f = self._size(w, 0, full, widths) / full
                elif args:
                    f = next((frac[p] for p in args if p in frac and g.nodes[p]["shape"] == d["shape"]), 1.0)
                frac[n] = f
                if not self._removed(d["module"] or "", removed):
                    sizes[n] = math.prod(d["shape"] or (1,)) * f * elem * self.batch / max(self.example_batch, 1)
                    live += sizes[n]
            peak = max(peak, live)
            for p in list(g.predecessors(n)):
                if last_use.get(p) == i and p in sizes:
                    live -= sizes.pop(p)
        return peak

    def memory_mb(self, config: SubnetConfig) -> float:
        return (self.weight_bytes(config) + self.activation_bytes(config)) / 2**20


def measured_memory_mb(module: Any, example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any],
                       precision: str, batch: int, example_batch: int) -> float:
    """Weights + peak activations of an extracted subnet from its own analysis (``potstill.ir.cost``)."""
    from potstill.ir.capture import analyze

    a = analyze(module, example_inputs, example_kwargs)
    elem = BYTES_PER_ELEMENT.get(precision, 4)
    acts = a.cost.peak_activation_bytes * (elem / 4) * batch / max(example_batch, 1)
    return (a.cost.params * elem + acts) / 2**20
