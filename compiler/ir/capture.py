"""Graph IR: a teacher captured with ``torch.export`` and the analyses built on it.

``analyze(model, example_inputs)`` exports the model (strict=False), builds a networkx graph of
ops and values (each with shape and dtype; each parameter tied to its module's qualified name),
and runs the coupled-channel analysis (``potstill.ir.coupling``), block detection
(``potstill.ir.blocks``) and the cost model (``potstill.ir.cost``). Head groups whose removal the
module's own forward cannot follow are pinned by a trial surgery (``potstill.ir.surgery_probe``).

    >>> a = analyze(model, (torch.randn(1, 3, 32, 32),))
    >>> [g.kind for g in a.prunable()]
    ['channels', 'channels', ...]
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import networkx as nx
import torch
from potstill.errors import InputError
from potstill.ir.blocks import find_blocks
from potstill.ir.cost import cost_model
from potstill.ir.coupling import CouplingAnalysis
from potstill.ir.types import UNSET, Analysis, Block, CoupledGroup, Fixed, GraphIR, Member, Seg, seg_length
from torch import fx, nn

__all__ = [
    "Analysis",
    "Block",
    "CoupledGroup",
    "GraphIR",
    "Member",
    "analyze",
    "canonical_param_names",
    "eval_mode",
    "export",
]


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # nn_module_stack paths look like "L['self'].layer1[0].conv1" or "layer1.0.conv1"
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        part = part.strip("'\"")
        if part:
            out.append(part)
    return ".".join(out)


def canonical_param_names(model: nn.Module) -> dict[str, str]:
    """Every parameter/buffer name (aliases of tied tensors included) -> its first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    for name, b in model.named_buffers(remove_duplicate=False):
        out[name] = first.setdefault(id(b), name)
    return out


def export(model: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any] | None = None,
           dynamic_shapes: Any = None) -> Any:
    """``torch.export.export(strict=False)`` with an error that says what to do when it fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(
                model, tuple(example_inputs), kwargs=example_kwargs or {}, strict=False, dynamic_shapes=dynamic_shapes
            )
        except Exception as e:
            raise InputError(
                f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}. Make the forward traceable (no data-dependent "
                "Python control flow on tensor values) or give example inputs that match it."
            ) from e


def analyze(model: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any] | None = None) -> Analysis:
    """Export ``model`` and compute coupled groups, blocks and costs.

    Sparse mixture-of-experts blocks not yet given the dense dispatch (``potstill.inputs.moe``; a
    compile's teacher has it from ``normalise_teacher``) get it here, in place: their outputs stay
    the same and ``torch.export`` can capture them."""
    from potstill.inputs.moe import export_friendly_moe

    export_friendly_moe(model)
    was_training = model.training
    model.eval()
    try:
        ep = export(model, example_inputs, example_kwargs)
    finally:
        model.train(was_training)
    canon = canonical_param_names(model)
    sig = ep.graph_signature
    placeholder_to_param: dict[str, str] = {}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for ph, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
        tensor = state.get(canon.get(fqn, fqn))
        if tensor is not None and not tensor.is_floating_point():
            continue  # integer buffers (position ids, counters) are constants, not channels
        placeholder_to_param[ph] = canon.get(fqn, fqn)
    param_shapes = {canon.get(k, k): tuple(v.shape) for k, v in state.items()}
    param_modules = {k: k.rsplit(".", 1)[0] if "." in k else "" for k in param_shapes}

    gm = ep.graph_module
    ca = CouplingAnalysis(gm, placeholder_to_param, param_shapes, param_modules)
    ca.run()

    graph = nx.DiGraph()
    node_module: dict[str, str] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        shape = tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None
        dtype = str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else "-"
        mod = _module_of(node)
        node_module[node.name] = mod
        graph.add_node(
            node.name, op=node.op, target=_target_name(node), shape=shape, dtype=dtype, module=mod,
            args=[a.name for a in node.all_input_nodes],
        )
        for a in node.all_input_nodes:
            graph.add_edge(a.name, node.name)
    ir = GraphIR(ep, graph, placeholder_to_param, node_module)
    norm_modules = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    groups = _build_groups(ca, param_modules, norm_modules)
    conv_groups = _conv_groups(gm, placeholder_to_param)
    analysis = Analysis(ir, groups, [], unknown_ops=dict(ca.unknown_ops), param_shapes=param_shapes,
                        conv_groups=conv_groups)
    from potstill.ir.surgery_probe import pin_unfollowable_heads

    pin_unfollowable_heads(model, analysis, example_inputs, example_kwargs)
    analysis.cost = cost_model(analysis, model)
    analysis.blocks = find_blocks(analysis, model)
    # the ExportedProgram holds references to every parameter of ``model``: kept, it would pin a
    # pruned student's pre-surgery weights for as long as the analysis lives; the networkx graph
    # carries all that is read later
    ir.exported = None
    return analysis


def _target_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t).replace("aten.", "").replace(".default", "")
    return getattr(t, "__name__", str(t))


def _conv_groups(gm: fx.GraphModule, p2p: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _target_name(node)
        if name.startswith("conv") and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            w = p2p.get(node.args[1].name)
            if w is None:
                continue
            if name.startswith("convolution"):
                g = int(node.args[8]) if len(node.args) > 8 else 1
            else:
                g = int(node.args[6]) if len(node.args) > 6 else 1
            out[w] = g
    return out


def _build_groups(ca: CouplingAnalysis, param_modules: dict[str, str], norm_modules: set[str]) -> list[CoupledGroup]:
    table = ca.table
    by_root: dict[int, list[Member]] = {}
    for name, maps in ca.param_dims.items():
        for d, dm in enumerate(maps):
            if dm is UNSET or dm is None:
                continue
            offset = 0
            role = ca.param_roles.get((name, d), "other")
            if role == "other" and param_modules.get(name, "") in norm_modules:
                role = "norm"  # e.g. RMSNorm written as x * rsqrt(mean(x^2)) * weight
            for seg in dm:
                length = seg_length(table, seg)
                if isinstance(seg, Seg):
                    root = table.find(seg.space)
                    n = table.info[root].n_units
                    by_root.setdefault(root, []).append(
                        Member(name, param_modules.get(name, ""), d, offset, length // n, role)
                    )
                else:
                    assert isinstance(seg, Fixed)
                offset += length
    groups: list[CoupledGroup] = []
    for root, members in by_root.items():
        info = table.info[root]
        pinned = "; ".join(info.pinned[:3]) if info.pinned else None
        producers = [m for m in members if m.role == "out"]
        if pinned is None and not producers:
            pinned = "no layer produces these channels (parameters only)"
        if pinned is None and info.n_units <= 1:
            pinned = "a single unit cannot be pruned"
        unit_channels = producers[0].unit_len if producers else 1
        kind = info.kind
        if kind == "neurons" and unit_channels > 1:
            kind = "heads"
        groups.append(
            CoupledGroup(
                id=len(groups), n_units=info.n_units, members=tuple(sorted(members, key=lambda m: (m.param, m.dim))),
                kind=kind, pinned=pinned, exact=not info.inexact,
                inexact_reason="; ".join(info.inexact[:2]) if info.inexact else None,
                unit_channels=unit_channels, producer=info.producer,
                sized_by=", ".join(info.sized_by[:3]) if info.sized_by else None,
            )
        )
    _label_attention(groups)
    return groups


def _label_attention(groups: list[CoupledGroup]) -> None:
    """Heads whose units span several producers' heads of different sizes are KV groups (GQA)."""
    for g in groups:
        if g.kind != "heads":
            continue
        lens = {m.unit_len for m in g.members if m.role == "out" and m.dim == 0}
        if len(lens) > 1:
            g.kind = "kv_heads"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Any:
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
