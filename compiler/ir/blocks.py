"""Blocks: residual blocks and transformer layers whose removal leaves a valid model.

A candidate is a child of an ``nn.ModuleList`` or ``nn.Sequential``. It is a block when
- it is *single-exit*: one of its nodes, the exit, post-dominates every live node of the child
  (every path from them to the model output passes through the exit; Cooper, Harvey & Kennedy
  dominators from ``networkx.immediate_dominators`` on the reversed graph), so replacing the
  exit by the entry leaves no dangling value;
- it has an entry: an activation from outside with the exit's shape;
- it is residual: an ``add`` inside reads the entry (output = input + f(input), possibly
  normalised after).
Depth passes act on blocks only.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
from potstill.ir.types import Analysis, Block
from torch import nn


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


def _post_dominators(g: nx.DiGraph) -> dict[str, str]:
    """Immediate post-dominator of every node that reaches the graph's output."""
    outputs = [n for n, d in g.nodes(data=True) if d["op"] == "output"]
    if len(outputs) != 1:
        return {}
    return dict(nx.immediate_dominators(g.reverse(copy=False), outputs[0]))


def _single_exit(inside: set[str], ipdom: dict[str, str], order: dict[str, int]) -> str | None:
    """The node of ``inside`` that post-dominates all its live nodes, if there is one."""
    live = [n for n in inside if n in ipdom]
    if not live:
        return None
    exit_ = max(live, key=order.__getitem__)
    for n in live:
        while n != exit_:  # climb the post-dominator tree; it only moves forward in graph order
            up = ipdom[n]
            if up == n or order[up] > order[exit_]:
                return None
            n = up
    return exit_


def find_blocks(analysis: Analysis, model: nn.Module) -> list[Block]:
    g = analysis.ir.graph
    node_module = analysis.ir.node_module
    ipdom = _post_dominators(g)
    order = {n: i for i, n in enumerate(g.nodes)}  # insertion order is the graph's topological order
    blocks: list[Block] = []
    for cname, container in _containers(model).items():
        for idx, (child_name, _child) in enumerate(container.named_children()):
            name = f"{cname}.{child_name}" if cname else child_name
            inside = {n for n, m in node_module.items() if m == name or m.startswith(name + ".")}
            inside = {n for n in inside if g.nodes[n]["op"] == "call_function"}
            exit_ = _single_exit(inside, ipdom, order)
            if exit_ is None:
                continue
            out_shape = g.nodes[exit_]["shape"]
            if out_shape is None or len(out_shape) < 2:
                continue
            main_in = {
                p for n in inside for p in g.predecessors(n)
                if p not in inside and p not in analysis.ir.param_names and g.nodes[p]["shape"] == out_shape
            }
            if not main_in:
                continue
            residual = any(
                g.nodes[n]["target"].startswith("add") and any(_reaches(g, p, list(main_in)) for p in g.predecessors(n))
                for n in inside
            )
            if not residual:
                continue
            macs = sum(analysis.cost.node_macs.get(n, 0) for n in inside)
            params = sum(p.numel() for p in _child.parameters())
            kind = "transformer_layer" if isinstance(container, nn.ModuleList) else "residual"
            blocks.append(Block(name, cname, idx, kind, int(macs), int(params)))
    return blocks
