"""Types under the analysis: channel slots, the op-rule registry, and the analysis results.

Dependencies point one way (DESIGN §8): this module -> ``coupling_rules`` -> ``coupling``;
this module -> ``blocks``, ``cost`` -> ``ir``. Nothing here imports another analysis module.

Channel slots. Every tensor dim of the exported ATen graph has a *dim map*: ``None`` (not a channel
dim) or a tuple of segments concatenated along the dim. ``Seg(space, c, r)``: positions come in
blocks of ``r``; block ``k`` stands for channels ``[k*c, (k+1)*c)`` of channel *space* ``space``.
``Fixed(n)``: ``n`` positions that are never pruned. ``SpaceTable`` is union-find over spaces
with a unit count per class (``gcd`` of every join's granularity) and the pins and notes.

Op rules. ``@rule("aten_op", ...)`` registers ``fn(analysis, node) -> output dim maps`` in
``RULES``; rules see the analysis only through the ``ChannelAnalysis`` protocol and raise
``Unsupported(reason)`` to pin what the node touches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import networkx as nx
import torch
from torch import fx

# ---------------------------------------------------------------------------------------------
# Channel slots


@dataclass(frozen=True)
class Seg:
    space: int
    c: int = 1
    r: int = 1


@dataclass(frozen=True)
class Fixed:
    length: int


Segment = Seg | Fixed
DimMap = tuple[Segment, ...] | None


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: A parameter dim no rule has described yet.
UNSET: Any = _Unset()


@dataclass
class SpaceInfo:
    size: int
    n_units: int
    producer: str | None = None  # "module.param" that started it
    kind: str = "channels"
    pinned: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    param_dim: tuple[str, int] | None = None  # the parameter dim this space was made for, if any
    #: factory ops (``zeros``, ``full``, ...) that made a tensor this wide: its size is a constant of
    #: the graph, so a narrowed forward must be run to see that the module sizes it by the pruned width
    sized_by: list[str] = field(default_factory=list)
    #: a class of filled spaces only, joined with a non-channel dim (a mask added along the sequence):
    #: it is no channel at all, and every dim map that names it reads as ``None``
    void: bool = False


_KIND_RANK = {"channels": 0, "neurons": 1, "conv_groups": 2, "hidden": 3, "vocab": 4}


class SpaceTable:
    """Union-find over channel spaces with per-root unit counts, pins and notes."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.info: list[SpaceInfo] = []

    def new(self, size: int, producer: str | None = None, kind: str = "channels",
            param_dim: tuple[str, int] | None = None) -> int:
        sid = len(self.parent)
        self.parent.append(sid)
        self.info.append(SpaceInfo(size=size, n_units=size, producer=producer, kind=kind, param_dim=param_dim))
        return sid

    def new_filled(self, size: int, by: str) -> int:
        """A space of no parameter for a dim along which a tensor holds one value (a factory op's
        output, a size-1 dim copied out); ``by`` names the node whose constant size it has."""
        sid = self.new(size)
        self.info[sid].sized_by.append(by)
        return sid

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def root(self, s: int) -> SpaceInfo:
        return self.info[self.find(s)]

    def members(self, s: int) -> list[int]:
        """Every space in the class of ``s``."""
        r = self.find(s)
        return [t for t in range(len(self.parent)) if self.find(t) == r]

    def coarsen(self, s: int, n: int) -> None:
        r = self.root(s)
        r.n_units = math.gcd(r.n_units, n)

    def union(self, a: int, b: int, n: int | None = None) -> None:
        ra, rb = self.find(a), self.find(b)
        ia, ib = self.info[ra], self.info[rb]
        units = math.gcd(ia.n_units, ib.n_units)
        if n is not None:
            units = math.gcd(units, n)
        if ra != rb:
            self.parent[rb] = ra
            ia.pinned += [p for p in ib.pinned if p not in ia.pinned]
            ia.inexact += [p for p in ib.inexact if p not in ia.inexact]
            ia.sized_by += [p for p in ib.sized_by if p not in ia.sized_by]
            if ia.producer is None:
                ia.producer = ib.producer
            if _KIND_RANK.get(ib.kind, 0) > _KIND_RANK.get(ia.kind, 0):
                ia.kind = ib.kind
        ia.n_units = units

    def is_filled(self, s: int) -> bool:
        """Whether the class of ``s`` holds only spaces a factory op made (no parameter dim)."""
        r = self.root(s)
        return r.producer is None and bool(r.sized_by)

    def pin(self, s: int, reason: str) -> None:
        r = self.root(s)
        if reason not in r.pinned:
            r.pinned.append(reason)

    def mark_inexact(self, s: int, reason: str) -> None:
        r = self.root(s)
        if reason not in r.inexact:
            r.inexact.append(reason)


def seg_length(table: SpaceTable, seg: Segment) -> int:
    """Positions a segment covers along its dim."""
    if isinstance(seg, Fixed):
        return seg.length
    return table.info[seg.space].size // seg.c * seg.r


# ---------------------------------------------------------------------------------------------
# The op-rule registry


class Unsupported(Exception):
    """Raised by a rule: the node's channels cannot be followed; everything it touches is pinned."""


class ChannelAnalysis(Protocol):
    """What an op rule may use of the coupling analysis (``potstill.ir.coupling.CouplingAnalysis``)."""

    table: SpaceTable
    param_dims: dict[str, list[Any]]
    param_shapes: dict[str, tuple[int, ...]]
    param_roles: dict[tuple[str, int], str]

    def shape(self, x: Any) -> tuple[int, ...] | None: ...
    def dimmaps(self, x: Any) -> list[DimMap] | None: ...
    def is_param(self, x: Any) -> bool: ...
    def pname(self, x: fx.Node) -> str: ...
    def produce(self, x: fx.Node, d: int, kind: str = "channels") -> DimMap: ...
    def bind(self, x: fx.Node, d: int, dm: DimMap, role: str, why: str) -> DimMap: ...
    def pin_map(self, dm: DimMap, reason: str) -> None: ...
    def fix_positions(self, dm: DimMap, reason: str) -> DimMap: ...
    def join(self, a: DimMap, b: DimMap, length: int, why: str) -> DimMap: ...
    def arg_maps(self, x: Any, why: str) -> list[DimMap]: ...
    def resolve(self, dm: DimMap) -> DimMap: ...
    def cut(self, dm: DimMap, sizes: Sequence[int], why: str) -> list[DimMap]: ...
    def mark_role(self, dm: DimMap, role: str) -> None: ...


Rule = Callable[[ChannelAnalysis, fx.Node], Any]
#: ATen op name (overload packet) -> its rule. Filled by ``potstill.ir.coupling_rules`` on import.
RULES: dict[str, Rule] = {}

#: Ops with no tensor result that matters (assertions, shape queries, constants): they neither pin nor join.
NO_OP = {
    "_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "sym_stride",
    "sym_constrain_range_for_size", "sym_constrain_range", "_assert_async", "scalar_tensor",
    "arange", "lift_fresh_copy", "detach_", "_check_is_size", "eye", "randn", "rand", "tensor",
    # vmap bookkeeping around transformers' mask functions: nesting levels, no tensor
    "lazy_load_decompositions", "_vmap_increment_nesting", "_vmap_decrement_nesting",
}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the coupling rule of the named ATen ops."""

    def wrap(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return wrap


def dim_index(d: int, ndim: int) -> int:
    """A possibly negative dim as an index in ``0..ndim-1``."""
    return d + ndim if d < 0 else d


def node_args(node: fx.Node) -> list[Any]:
    return list(node.args)


def node_kwargs(node: fx.Node) -> dict[str, Any]:
    return dict(node.kwargs)


def op_name(target: Any) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; Python callables by their name."""
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target))


# ---------------------------------------------------------------------------------------------
# Analysis results


@dataclass(frozen=True)
class Member:
    """One parameter slice family of a coupled group (see docs/internals.md)."""

    param: str
    module: str
    dim: int
    offset: int
    unit_len: int
    role: str


@dataclass
class CoupledGroup:
    id: int
    n_units: int
    members: tuple[Member, ...]
    kind: str = "channels"
    pinned: str | None = None
    exact: bool = True
    inexact_reason: str | None = None
    #: the factory ops that made a tensor as wide as these channels (``potstill.ir.surgery_probe``
    #: checks that the module's forward follows a narrowing), else ``None``
    sized_by: str | None = None
    unit_channels: int = 1
    producer: str | None = None
    macs_per_unit: float = 0.0
    params_per_unit: int = 0

    def positions(self, member: Member, units: Sequence[int]) -> list[int]:
        """Indices along ``member.dim`` covered by the given units, in order."""
        out: list[int] = []
        for u in sorted(units):
            start = member.offset + u * member.unit_len
            out.extend(range(start, start + member.unit_len))
        return out

    @property
    def channels(self) -> int:
        return self.n_units * self.unit_channels

    def describe(self) -> str:
        names = sorted({m.module for m in self.members})
        head = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        return f"g{self.id} {self.kind} x{self.n_units} [{head}]"


@dataclass
class Block:
    name: str
    container: str
    index: int
    kind: str
    macs: int = 0
    params: int = 0


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


@dataclass
class GraphIR:
    """Ops and values of the exported graph as a networkx DAG (node name -> op, target, shape,
    dtype, module, args); the graph algorithms (order, dominators) run on it, and it stays inside."""

    exported: Any
    graph: nx.DiGraph
    param_names: dict[str, str]
    node_module: dict[str, str]

    def text(self) -> str:
        lines = []
        for name in nx.topological_sort(self.graph):
            d = self.graph.nodes[name]
            if d["op"] == "placeholder" and name in self.param_names:
                continue
            args = ", ".join(
                f"@{self.param_names[p]}" if p in self.param_names else f"%{p}" for p in d["args"]
            )
            shape = "x".join(str(s) for s in d["shape"]) if d["shape"] is not None else "-"
            mod = f"  # {d['module']}" if d["module"] else ""
            lines.append(f"%{name}: {d['dtype']}[{shape}] = {d['target']}({args}){mod}")
        return "\n".join(lines)

    @property
    def n_ops(self) -> int:
        return sum(1 for _, d in self.graph.nodes(data=True) if d["op"] == "call_function")


@dataclass
class Analysis:
    ir: GraphIR
    groups: list[CoupledGroup]
    blocks: list[Block]
    cost: CostReport = field(default_factory=lambda: CostReport(0, 0, 0))
    unknown_ops: dict[str, list[str]] = field(default_factory=dict)
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    conv_groups: dict[str, int] = field(default_factory=dict)

    def prunable(self) -> list[CoupledGroup]:
        return [g for g in self.groups if g.pinned is None]

    def pinned(self) -> list[CoupledGroup]:
        return [g for g in self.groups if g.pinned is not None]

    def group(self, gid: int) -> CoupledGroup:
        return self.groups[gid]

    def text(self) -> str:
        out = [self.ir.text(), "", "# groups"]
        for g in self.groups:
            state = f"pinned: {g.pinned}" if g.pinned else ("prunable" if g.exact else f"prunable (inexact: {g.inexact_reason})")
            out.append(f"{g.describe()}  {state}")
        out.append("# blocks")
        out.extend(f"{b.name} ({b.kind}) macs={b.macs} params={b.params}" for b in self.blocks)
        return "\n".join(out)
