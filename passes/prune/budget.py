"""Predicting a pruned student's cost from kept unit counts, without building it.

Every parameter dim a group slices loses ``(n - k) * unit_len`` of its entries, so with
``f(p, d)`` the kept fraction of dim ``d`` of parameter ``p``:

    params(k) = sum_p numel(p) * prod_d f(p, d)                              (exact)
    MACs(k)   = MACs_other + sum_w MACs(w) * f(w, 0) * f(w, 1)               (conv/linear weights)
    ms(k)     = sum_layers latency(op, cin * f_in, cout * f_out, ...)        (profile: table or roofline)

``MACs_other`` (attention score/value products, pooling) is held constant, which slightly
over-states what is left. Budgets are met by bisection on one pruning ratio for all the selected
groups (``prune.width``), then checked on the real student.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis


@dataclass
class LayerShape:
    """A conv2d / linear layer as the latency table describes it."""

    op: str
    weight: str
    cin: int
    cout: int
    kernel: int = 1
    hw: int = 1
    groups: int = 1
    stride: int = 1
    tokens: int = 1

    def query(self, f_in: float = 1.0, f_out: float = 1.0) -> dict[str, Any]:
        cin, cout = max(1, round(self.cin * f_in)), max(1, round(self.cout * f_out))
        if self.op == "linear":
            return {"cin": cin, "cout": cout, "tokens": self.tokens}
        groups = cout if self.groups > 1 and self.groups == self.cout else self.groups
        return {"cin": cin, "cout": cout, "kernel": self.kernel, "hw": self.hw, "groups": groups, "stride": self.stride}


def layer_shapes(model: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: Mapping[str, Any]) -> dict[str, LayerShape]:
    """Conv2d and linear layers with their input sizes, from one forward pass with hooks."""
    found: dict[str, LayerShape] = {}
    handles = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""

        def hook(m: nn.Module, args: tuple[Any, ...], prefix: str = prefix, name: str = name) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or name in found:
                return
            if isinstance(m, nn.Conv2d):
                found[name] = LayerShape(
                    "conv2d", prefix + "weight", m.in_channels, m.out_channels, int(m.kernel_size[0]),
                    int(x.shape[-1]), m.groups, int(m.stride[0]),
                )
            elif isinstance(m, nn.Linear):
                tokens = math.prod(x.shape[:-1]) if x.dim() > 1 else 1
                found[name] = LayerShape("linear", prefix + "weight", m.in_features, m.out_features, tokens=int(tokens))

        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs, **dict(example_kwargs))
    finally:
        for h in handles:
            h.remove()
    return found


@dataclass
class CostModel:
    """Params / MACs / latency of ``analysis``'s model as a function of kept units per group."""

    analysis: Analysis
    param_names: set[str]
    layers: dict[str, LayerShape] = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, analysis: Analysis, example_inputs: tuple[Any, ...] = (),
              example_kwargs: Mapping[str, Any] | None = None, with_layers: bool = False) -> CostModel:
        layers = layer_shapes(model, example_inputs, example_kwargs or {}) if with_layers else {}
        return cls(analysis, {n for n, _ in model.named_parameters()}, layers)

    def fractions(self, keep: Mapping[int, int]) -> dict[tuple[str, int], float]:
        removed: dict[tuple[str, int], int] = {}
        for gid, k in keep.items():
            g = self.analysis.groups[gid]
            for m in g.members:
                removed[(m.param, m.dim)] = removed.get((m.param, m.dim), 0) + (g.n_units - k) * m.unit_len
        shapes = self.analysis.param_shapes
        return {key: max(0.0, 1.0 - r / shapes[key[0]][key[1]]) for key, r in removed.items()}

    def params(self, keep: Mapping[int, int]) -> float:
        frac = self.fractions(keep)
        total = 0.0
        for name in self.param_names:
            shape = self.analysis.param_shapes.get(name)
            if shape is None:
                continue
            f = math.prod(frac.get((name, d), 1.0) for d in range(len(shape)))
            total += math.prod(shape) * f
        return total

    def macs(self, keep: Mapping[int, int]) -> float:
        frac = self.fractions(keep)
        cost = self.analysis.cost
        param_macs: dict[str, int] = getattr(cost, "param_macs", {})
        total = float(cost.macs) - sum(param_macs.values())
        for name, macs in param_macs.items():
            total += macs * frac.get((name, 0), 1.0) * frac.get((name, 1), 1.0)
        return total

    def latency_ms(self, keep: Mapping[int, int], profile: Any) -> float:
        from potstill.profiles.latency import op_latency_ms

        frac = self.fractions(keep)
        total = 0.0
        for layer in self.layers.values():
            f_out = frac.get((layer.weight, 0), 1.0)
            f_in = frac.get((layer.weight, 1), 1.0) if layer.groups == 1 else f_out
            ms, _ = op_latency_ms(profile, layer.op, **layer.query(f_in, f_out))
            total += ms
        return total
