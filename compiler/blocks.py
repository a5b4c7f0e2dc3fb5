"""Blocks: residual blocks and transformer layers whose removal leaves a valid model.

A candidate is a child of an ``nn.ModuleList`` or ``nn.Sequential`` whose exported nodes take one
activation from outside and give back one of the same shape, with a residual ``add`` inside that
reads an activation from outside the block (output = input + f(input), possibly normalised after).
Depth passes act on blocks only.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .analysis_types import Analysis, Block


def _containers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}


_ALIASES = ("to", "_to_copy", "alias", "clone", "contiguous", "detach", "type_as", "dropout")


def _reaches(g: Any, n: str, targets: list[str]) -> bool:
    """Whether ``n`` is one of ``targets`` up to value-preserving ops (no-op casts, clones)."""
    while True:
        if n in targets:
            return True
        if g.nodes[n]["op"] != "call_function" or g.nodes[n]["target"].split(".")[0] not in _ALIASES:
            return False
        args = g.nodes[n]["args"]
        if not args:
            return False
        n = args[0]


def find_blocks(analysis: Analysis, model: nn.Module) -> list[Block]:
    g = analysis.ir.graph
    node_module = analysis.ir.node_module
    blocks: list[Block] = []
    for cname, container in _containers(model).items():
        for idx, (child_name, _child) in enumerate(container.named_children()):
            name = f"{cname}.{child_name}" if cname else child_name
            inside = {n for n, m in node_module.items() if m == name or m.startswith(name + ".")}
            inside = {n for n in inside if g.nodes[n]["op"] == "call_function"}
            if not inside:
                continue
            external_inputs = set()
            for n in inside:
                for p in g.predecessors(n):
                    if p not in inside and not (g.nodes[p]["op"] == "placeholder" and p in analysis.ir.param_names):
                        external_inputs.add(p)
            outputs = [n for n in inside if any(s not in inside for s in g.successors(n))]
            act_in = [p for p in external_inputs if g.nodes[p]["shape"] is not None and len(g.nodes[p]["shape"]) >= 2]
            act_out = [o for o in outputs if g.nodes[o]["shape"] is not None and len(g.nodes[o]["shape"]) >= 2]
            if len(act_out) != 1:
                continue
            out_shape = g.nodes[act_out[0]]["shape"]
            main_in = [p for p in act_in if g.nodes[p]["shape"] == out_shape]
            if not main_in:
                continue
            residual = any(
                g.nodes[n]["target"].startswith("add") and any(_reaches(g, p, main_in) for p in g.predecessors(n))
                for n in inside
            )
            if not residual:
                continue
            cost = analysis.cost
            macs = sum(cost.node_macs.get(n, 0) for n in inside) if cost is not None else 0
            params = sum(p.numel() for p in _child.parameters())
            kind = "transformer_layer" if isinstance(container, nn.ModuleList) else "residual"
            blocks.append(Block(name, cname, idx, kind, int(macs), int(params)))
    return blocks
