"""Coupled-channel analysis: which parameter slices must be pruned together (after DepGraph).

Every tensor dim of the exported ATen graph gets a *dim map*: ``None`` (not a channel dim: batch,
space, sequence, or the inside of a head), or a tuple of segments. A segment ``Seg(space, c, r)``
says: the dim's positions come in blocks of ``r`` consecutive positions, block ``k`` stands for the
``c`` channels ``[k*c, (k+1)*c)`` of channel *space* ``space``. ``Fixed(n)`` segments are never
pruned (e.g. model-input channels concatenated with features).

    conv/linear out-dim           starts a space           Seg(s, 1, 1)
    flatten [C, H, W] -> [C*H*W]  repeats each channel      Seg(s, 1, H*W)
    view [H*D] -> [H, D]          makes heads               Seg(s, D, 1), None
    repeat_kv [G, r] -> [G*r]     repeats a KV group        Seg(s, D, r)
    cat along a channel dim       concatenates segments     (Seg(a..), Seg(b..))

Spaces joined by an op (residual add, a gate's multiply, Q·Kᵀ, a norm's affine parameters, a
consumer's in-dim) are merged by union-find. Each merged group has ``n_units``: the number of
prunable units; unit ``u`` of every member covers positions ``[u*L/n, (u+1)*L/n)``. A join of
dims whose blocks differ coarsens the units to ``gcd`` of both sides (so heads stay whole and
grouped-query attention prunes whole KV groups with their query heads). An op without a rule
*pins* every channel it touches: the group is never pruned and the reason names the node.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx


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


UNSET: Any = _Unset()


@dataclass
class SpaceInfo:
    size: int
    n_units: int
    producer: str | None = None  # "module.param" that started it
    kind: str = "channels"
    pinned: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    group_units: int | None = None  # conv groups / norm groups constraint (informational)


_KIND_RANK = {"channels": 0, "neurons": 1, "conv_groups": 2, "hidden": 3, "vocab": 4}


class SpaceTable:
    """Union-find over channel spaces with per-root unit counts, pins and notes."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.info: list[SpaceInfo] = []

    def new(self, size: int, producer: str | None = None, kind: str = "channels") -> int:
        sid = len(self.parent)
        self.parent.append(sid)
        self.info.append(SpaceInfo(size=size, n_units=size, producer=producer, kind=kind))
        return sid

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def root(self, s: int) -> SpaceInfo:
        return self.info[self.find(s)]

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
            ia.pinned += ib.pinned
            ia.inexact += ib.inexact
            if ia.producer is None:
                ia.producer = ib.producer
            if _KIND_RANK.get(ib.kind, 0) > _KIND_RANK.get(ia.kind, 0):
                ia.kind = ib.kind
        ia.n_units = units

    def pin(self, s: int, reason: str) -> None:
        r = self.root(s)
        if reason not in r.pinned:
            r.pinned.append(reason)

    def mark_inexact(self, s: int, reason: str) -> None:
        r = self.root(s)
        if reason not in r.inexact:
            r.inexact.append(reason)


def seg_length(table: SpaceTable, seg: Segment) -> int:
    if isinstance(seg, Fixed):
        return seg.length
    return table.info[seg.space].size // seg.c * seg.r


class CouplingAnalysis:
    """Walks an exported graph once and records dim maps, spaces and parameter bindings."""

    def __init__(self, gm: fx.GraphModule, param_names: dict[str, str], param_shapes: dict[str, tuple[int, ...]],
                 param_modules: dict[str, str]) -> None:
        self.gm = gm
        self.table = SpaceTable()
        self.param_names = param_names  # placeholder name -> canonical state_dict key
        self.param_shapes = param_shapes
        self.param_modules = param_modules
        self.param_dims: dict[str, list[Any]] = {k: [UNSET] * len(v) for k, v in param_shapes.items()}
        self.param_roles: dict[tuple[str, int], str] = {}
        self.dims: dict[fx.Node, Any] = {}
        self.unknown_ops: dict[str, list[str]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def shape(self, x: Any) -> tuple[int, ...] | None:
        if isinstance(x, fx.Node):
            val = x.meta.get("val")
            if isinstance(val, torch.Tensor):
                return tuple(int(s) for s in val.shape)
        return None

    def dimmaps(self, x: Any) -> list[DimMap] | None:
        """Dim maps of a tensor argument (params resolved), or None if not a tensor."""
        if not isinstance(x, fx.Node):
            return None
        if x in self.dims:
            d = self.dims[x]
            return d if isinstance(d, list) else None
        shape = self.shape(x)
        return [None] * len(shape) if shape is not None else None

    def is_param(self, x: Any) -> bool:
        return isinstance(x, fx.Node) and x.op == "placeholder" and x.name in self.param_names

    def pname(self, x: fx.Node) -> str:
        return self.param_names[x.name]

    def produce(self, x: fx.Node, d: int, kind: str = "channels") -> DimMap:
        """A parameter dim that starts a channel space (conv/linear out-dim, embedding dim)."""
        name = self.pname(x)
        current = self.param_dims[name][d]
        if current is UNSET:
            size = self.param_shapes[name][d]
            sid = self.table.new(size, producer=name, kind=kind)
            current = (Seg(sid),)
            self.param_dims[name][d] = current
            self.param_roles[(name, d)] = "out"
        return current

    def bind(self, x: fx.Node, d: int, dm: DimMap, role: str, why: str) -> DimMap:
        """A parameter dim that takes the channels of an activation dim (consumer, norm affine)."""
        name = self.pname(x)
        current = self.param_dims[name][d]
        if current is UNSET:
            self.param_dims[name][d] = dm
            self.param_roles[(name, d)] = role
            return dm
        return self.join(current, dm, self.param_shapes[name][d], why)

    def pin_map(self, dm: DimMap, reason: str) -> None:
        if dm is None:
            return
        for seg in dm:
            if isinstance(seg, Seg):
                self.table.pin(seg.space, reason)

    def join(self, a: DimMap, b: DimMap, length: int, why: str) -> DimMap:
        """Two dims that must carry the same channels position by position."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            # A non-channel dim of the same length joined with channels: those channels are fixed.
            self.pin_map(a if b is None else b, f"{why}: joined with a non-channel dim")
            return a if b is None else b
        if len(a) == 1 and len(b) == 1 and isinstance(a[0], Seg) and isinstance(b[0], Seg):
            sa, sb = a[0], b[0]
            self.table.union(sa.space, sb.space, length // math.lcm(sa.r, sb.r))
            return a
        la = [seg_length(self.table, s) for s in a]
        lb = [seg_length(self.table, s) for s in b]
        if la == lb:
            for x, y, n in zip(a, b, la):
                if isinstance(x, Seg) and isinstance(y, Seg):
                    self.table.union(x.space, y.space, n // math.lcm(x.r, y.r))
                elif isinstance(x, Seg) or isinstance(y, Seg):
                    self.pin_map((x,) if isinstance(x, Seg) else (y,), f"{why}: joined with fixed channels")
            return a
        self.pin_map(a, f"{why}: concatenated channels do not line up")
        self.pin_map(b, f"{why}: concatenated channels do not line up")
        return a

    def pin_node(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            maps = self.dimmaps(arg)
            if self.is_param(arg):
                name = self.pname(arg)
                for d, cur in enumerate(self.param_dims[name]):
                    if cur is UNSET and self.param_shapes[name][d] > 1:
                        sid = self.table.new(self.param_shapes[name][d], producer=name)
                        self.param_dims[name][d] = (Seg(sid),)
                        self.param_roles[(name, d)] = "other"
                maps = self.param_dims[name]
            for dm in maps or []:
                if dm is not UNSET:
                    self.pin_map(dm, reason)

    # -- the walk --------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.is_param(node):
                    self.dims[node] = "param"
                else:
                    shape = self.shape(node)
                    self.dims[node] = [None] * len(shape) if shape is not None else None
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    for dm in self.dimmaps(arg) or []:
                        self.pin_map(dm, "model output")
            elif node.op == "get_attr":
                self.dims[node] = None
            else:
                self.pin_node(node, f"{node.name}: {node.op} is not analysed")
                self.dims[node] = None

    def _call(self, node: fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            src, idx = _args(node)[0], _args(node)[1]
            outs = self.dims.get(src) if isinstance(src, fx.Node) else None
            if isinstance(outs, tuple) and isinstance(idx, int) and idx < len(outs):
                self.dims[node] = outs[idx]
            else:
                self.dims[node] = self._none_like(node)
            return
        name = _op_name(target)
        rule = RULES.get(name)
        if rule is None:
            if name in NO_OP:
                self.dims[node] = self._none_like(node)
                return
            self.unknown_ops.setdefault(name, []).append(node.name)
            self.pin_node(node, f"{node.name}: no coupling rule for {name}")
            self.dims[node] = self._none_like(node)
            return
        try:
            result = rule(self, node)
        except _Unsupported as e:
            self.pin_node(node, f"{node.name} ({name}): {e}")
            result = None
        self.dims[node] = result if result is not None else self._none_like(node)

    def _none_like(self, node: fx.Node) -> Any:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return [None] * val.dim()
        if isinstance(val, (tuple, list)):
            return tuple([None] * v.dim() if isinstance(v, torch.Tensor) else None for v in val)
        return None

    # -- param dim maps --------------------------------------------------------------------

    def arg_maps(self, x: Any, why: str) -> list[DimMap]:
        """Dim maps of an argument; unset parameter dims become fresh spaces."""
        if self.is_param(x):
            name = self.pname(x)
            maps = self.param_dims[name]
            for d, cur in enumerate(maps):
                if cur is UNSET:
                    size = self.param_shapes[name][d]
                    if size == 1:
                        maps[d] = None
                    else:
                        maps[d] = (Seg(self.table.new(size, producer=name)),)
                        self.param_roles[(name, d)] = "other"
            return list(maps)
        found = self.dimmaps(x)
        if found is None:
            raise _Unsupported(f"argument {x} is not a tensor")
        return found


class _Unsupported(Exception):
    pass


def _args(node: fx.Node) -> list[Any]:
    return list(node.args)


def _kw(node: fx.Node) -> dict[str, Any]:
    return dict(node.kwargs)


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target))


# ---------------------------------------------------------------------------------------------
# Op rules. Each returns the output's dim maps (a list, or a tuple of lists for multi-output ops).

Rule = Callable[[CouplingAnalysis, fx.Node], Any]
RULES: dict[str, Rule] = {}

#: Ops with no tensor result that matters (assertions, shape queries): they neither pin nor join.
NO_OP = {
    "_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "sym_stride",
    "sym_constrain_range_for_size", "sym_constrain_range", "_assert_async", "scalar_tensor",
    "arange", "ones", "zeros", "full", "empty", "lift_fresh_copy", "detach_", "_check_is_size",
    "eye", "randn", "rand", "new_ones", "new_zeros", "new_full", "new_empty", "tensor",
}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return wrap


def reshape_maps(a: CouplingAnalysis, xm: list[DimMap], xs: Sequence[int], ys: Sequence[int], why: str) -> list[DimMap]:
    """Dim maps through a reshape: match runs of input and output dims with equal products."""
    out: list[DimMap] = [None] * len(ys)
    i = j = 0
    while i < len(xs) or j < len(ys):
        if i < len(xs) and xs[i] == 1:
            a.pin_map(xm[i], f"{why}: size-1 channel dim")
            i += 1
            continue
        if j < len(ys) and ys[j] == 1:
            j += 1
            continue
        if i >= len(xs) or j >= len(ys):
            raise _Unsupported("reshape sizes do not match")
        i2, j2 = i + 1, j + 1
        px, py = xs[i], ys[j]
        while px != py:
            if px < py:
                if i2 >= len(xs):
                    raise _Unsupported("reshape sizes do not match")
                px *= xs[i2]
                i2 += 1
            else:
                if j2 >= len(ys):
                    raise _Unsupported("reshape sizes do not match")
                py *= ys[j2]
                j2 += 1
        ins = [(xs[k], xm[k]) for k in range(i, i2) if xs[k] != 1]
        outs = [k for k in range(j, j2) if ys[k] != 1]
        for k in range(i, i2):
            if xs[k] == 1:
                a.pin_map(xm[k], f"{why}: size-1 channel dim")
        if len(ins) == 1 and len(outs) == 1:
            out[outs[0]] = ins[0][1]
        elif len(outs) == 1:
            out[outs[0]] = _merge(a, ins, why)
        elif len(ins) == 1:
            for k, dm in zip(outs, _split_dim(a, ins[0][1], [ys[k] for k in outs], why)):
                out[k] = dm
        else:
            for _, dm in ins:
                a.pin_map(dm, f"{why}: reshape mixes several dims")
        i, j = i2, j2
    return out


def _merge(a: CouplingAnalysis, ins: list[tuple[int, DimMap]], why: str) -> DimMap:
    size, acc = ins[0]
    for s, dm in ins[1:]:
        if dm is None and acc is None:
            pass
        elif dm is None and acc is not None:
            acc = tuple(Seg(x.space, x.c, x.r * s) if isinstance(x, Seg) else Fixed(x.length * s) for x in acc)
        else:
            a.pin_map(acc, f"{why}: merges channels with an inner dim")
            a.pin_map(dm, f"{why}: merges channels with an outer dim")
            acc = None
        size *= s
    return acc


def _split_dim(a: CouplingAnalysis, dm: DimMap, sizes: list[int], why: str) -> list[DimMap]:
    if dm is None:
        return [None] * len(sizes)
    if len(dm) != 1 or not isinstance(dm[0], Seg):
        a.pin_map(dm, f"{why}: splits concatenated channels")
        return [None] * len(sizes)
    seg = dm[0]
    inner = math.prod(sizes[1:])
    if inner % seg.r == 0:
        c = seg.c * (inner // seg.r)
        a.table.coarsen(seg.space, a.table.info[seg.space].size // c)
        outer: DimMap = (Seg(seg.space, c, 1),)
    elif seg.r % inner == 0:
        outer = (Seg(seg.space, seg.c, seg.r // inner),)
    else:
        a.pin_map(dm, f"{why}: splits channels unevenly")
        return [None] * len(sizes)
    return [outer, *([None] * (len(sizes) - 1))]


# The op rules register themselves in RULES on import.
from . import coupling_rules  # noqa: E402, F401
