"""Coupled-channel analysis: which parameter slices must be pruned together (after DepGraph).

Every tensor dim of the exported ATen graph gets a *dim map* (``potstill.ir.types``):
``None`` (not a channel dim: batch, space, sequence, or the inside of a head), or a tuple of
segments. A segment ``Seg(space, c, r)`` says: the dim's positions come in blocks of ``r``
consecutive positions, block ``k`` stands for the ``c`` channels ``[k*c, (k+1)*c)`` of channel
*space* ``space``. ``Fixed(n)`` segments are never pruned (e.g. model-input channels concatenated
with features).

    conv/linear out-dim           starts a space           Seg(s, 1, 1)
    flatten [C, H, W] -> [C*H*W]  repeats each channel      Seg(s, 1, H*W)
    view [H*D] -> [H, D]          makes heads               Seg(s, D, 1), None
    repeat_kv [G, r] -> [G*r]     repeats a KV group        Seg(s, D, r)
    cat along a channel dim       concatenates segments     (Seg(a..), Seg(b..))
    split/chunk a channel dim     *refines* the space       Seg(s) -> (Seg(s1), Seg(s2), ...)

Spaces joined by an op (residual add, a gate's multiply, Q·Kᵀ, a norm's affine parameters, a
consumer's in-dim) are merged by union-find. Each merged group has ``n_units``: the number of
prunable units; unit ``u`` of every member covers positions ``[u*L/n, (u+1)*L/n)``. A join of
dims whose blocks differ coarsens the units to ``gcd`` of both sides (so heads stay whole and
grouped-query attention prunes whole KV groups with their query heads).

Index maps (Torch-Pruning's ``_SplitIndexMapping``/``_ConcatIndexMapping``): where an op cuts a
channel dim (``split``, ``chunk``, ``unbind``, a slice) or joins dims whose segments do not line
up (``cat(a, b) + c``), the class of spaces is *refined*: every space in it is cut at the same
unit boundaries into pieces, each piece a class of its own, and every dim map that named the old
spaces is rewritten to the pieces in order. A fused QKV or gate-up projection thus becomes one
producer with several members (row offsets 0, E, 2E), each in the group its chunk joins.

An op without a rule *pins* every channel it touches: the group is never pruned and the reason
names the node. Rules live in ``potstill.ir.coupling_rules`` (compute ops) and
``potstill.ir.coupling_layout_rules`` (layout ops) and register into ``analysis_types.RULES``.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from potstill.ir import coupling_layout_rules, coupling_rules  # noqa: F401  (register the op rules)
from potstill.ir.types import (
    NO_OP,
    RULES,
    UNSET,
    DimMap,
    Fixed,
    Seg,
    Segment,
    SpaceTable,
    Unsupported,
    node_args,
    op_name,
    seg_length,
)
from torch import fx


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
        self.renamed: dict[int, tuple[int, ...]] = {}  # refined space -> its pieces
        self.voided = False  # whether some class of filled spaces became void (``resolve`` reads it)

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

    def _fresh(self, name: str, d: int, role: str, kind: str = "channels") -> DimMap:
        sid = self.table.new(self.param_shapes[name][d], producer=name, kind=kind, param_dim=(name, d))
        self.param_dims[name][d] = (Seg(sid),)
        self.param_roles[(name, d)] = role
        return self.param_dims[name][d]

    def produce(self, x: fx.Node, d: int, kind: str = "channels") -> DimMap:
        """A parameter dim that starts a channel space (conv/linear out-dim, embedding dim)."""
        name = self.pname(x)
        current = self.param_dims[name][d]
        if current is UNSET:
            return self._fresh(name, d, "out", kind)
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

    def mark_role(self, dm: DimMap, role: str) -> None:
        """Parameter dims that reach an op through views (``W.t()``, an einsum operand) and were
        given a fresh space there take the role the op gives them (producer ``out``, consumer ``in``)."""
        for seg in dm or ():
            if isinstance(seg, Seg):
                pd = self.table.info[seg.space].param_dim
                if pd is not None and self.param_roles.get(pd) == "other":
                    self.param_roles[pd] = role

    def pin_map(self, dm: DimMap, reason: str) -> None:
        if dm is None:
            return
        for seg in self.resolve(dm) or ():
            if isinstance(seg, Seg):
                self.table.pin(seg.space, reason)

    def fix_positions(self, dm: DimMap, reason: str) -> DimMap:
        """A dim whose positions now matter one by one (joined with a non-channel dim, cut into a
        triangle): its channels are pinned, and a class of filled spaces is void, no channel at all
        (``SpaceInfo.void``); returns ``dm`` resolved."""
        for seg in self.resolve(dm) or ():
            if isinstance(seg, Seg) and self.table.is_filled(seg.space):
                self.table.root(seg.space).void = True
                self.voided = True
            elif isinstance(seg, Seg):
                self.table.pin(seg.space, reason)
        return self.resolve(dm)

    def join(self, a: DimMap, b: DimMap, length: int, why: str) -> DimMap:
        """Two dims that must carry the same channels position by position."""
        a, b = self.resolve(a), self.resolve(b)
        if a is None and b is None:
            return None
        if a is None or b is None:
            # A non-channel dim of the same length joined with channels: those channels are fixed. A
            # filled tensor's dim (a causal mask ``full((T, T))`` added to the scores) is no channel
            # then: left a space, it would carry on along the sequence and pin every head it meets.
            return self.fix_positions(a if b is None else b, f"{why}: joined with a non-channel dim")
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
        # Segments that do not line up: cut both sides at every boundary of either, then join piecewise.
        cuts = sorted(set(itertools.accumulate(la)) | set(itertools.accumulate(lb)))
        sizes = [y - x for x, y in itertools.pairwise([0, *cuts])]
        try:
            pa = self.cut(a, sizes, why)
            pb = self.cut(b, sizes, why)
        except Unsupported as e:
            self.pin_map(a, f"{why}: concatenated channels do not line up ({e})")
            self.pin_map(b, f"{why}: concatenated channels do not line up ({e})")
            return a
        for piece_a, piece_b, n in zip(pa, pb, sizes):
            self.join(piece_a, piece_b, n, why)
        return self.resolve(a)

    # -- index maps: refining a class of spaces --------------------------------------------

    def resolve(self, dm: DimMap) -> DimMap:
        """``dm`` with every refined space replaced by its pieces (in order) and every void space
        (``SpaceInfo.void``) by fixed positions; ``None`` where no space is left."""
        if dm is None or dm is UNSET:
            return dm
        if self.renamed and any(isinstance(s, Seg) and s.space in self.renamed for s in dm):
            out: list[Segment] = []
            for s in dm:
                if isinstance(s, Seg) and s.space in self.renamed:
                    pieces = self.resolve(tuple(Seg(p, s.c, s.r) for p in self.renamed[s.space]))
                    out.extend(pieces or (Fixed(seg_length(self.table, s)),))
                else:
                    out.append(s)
            dm = tuple(out)
        if self.voided and any(isinstance(s, Seg) and self.table.root(s.space).void for s in dm):
            dm = tuple(Fixed(seg_length(self.table, s)) if isinstance(s, Seg) and self.table.root(s.space).void
                       else s for s in dm)
            return dm if any(isinstance(s, Seg) for s in dm) else None
        return dm

    def refine(self, space: int, cuts: Sequence[int], why: str) -> None:
        """Cut the class of ``space`` at channel offsets ``cuts`` of ``space`` into pieces.

        Every space ``t`` of the class is cut at the same *unit* boundaries (unit ``u`` of ``t``
        is channels ``[u*|t|/n, (u+1)*|t|/n)``), the ``j``-th pieces of all of them form a class
        of their own with the same pins and kind, and every stored dim map is rewritten.
        """
        table = self.table
        size = table.info[space].size
        cuts = sorted({int(c) for c in cuts if 0 < c < size})
        if not cuts:
            return
        root = table.root(space)
        n = root.n_units
        per = size // n
        if any(c % per for c in cuts):
            raise Unsupported(f"{why}: cuts inside a unit of {per} channels")
        bounds = [0, *(c // per for c in cuts), n]
        units = [b - a for a, b in itertools.pairwise(bounds)]
        members = table.members(space)
        for t in members:
            info = table.info[t]
            step = info.size // n
            self.renamed[t] = tuple(
                table.new(k * step, producer=info.producer, kind=info.kind, param_dim=info.param_dim) for k in units
            )
        for j, k in enumerate(units):
            first = self.renamed[members[0]][j]
            for t in members[1:]:
                table.union(first, self.renamed[t][j])
            piece = table.root(first)
            piece.n_units = math.gcd(piece.n_units, k)
            piece.pinned, piece.inexact = list(root.pinned), list(root.inexact)
            piece.sized_by = list(root.sized_by)
            piece.kind, piece.producer = root.kind, root.producer
        for maps in self.param_dims.values():
            for d, dm in enumerate(maps):
                maps[d] = self.resolve(dm)
        for node, val in self.dims.items():
            if isinstance(val, list):
                self.dims[node] = [self.resolve(x) for x in val]
            elif isinstance(val, tuple):
                self.dims[node] = tuple([self.resolve(x) for x in v] if isinstance(v, list) else v for v in val)

    def cut(self, dm: DimMap, sizes: Sequence[int], why: str) -> list[DimMap]:
        """The dim maps of consecutive pieces of ``sizes`` positions of a dim (refining as needed)."""
        if dm is None:
            return [None] * len(sizes)
        bounds = list(itertools.accumulate(sizes))
        while True:  # refine the first segment a boundary falls inside, until none does
            dm = self.resolve(dm)
            assert dm is not None
            start, todo = 0, None
            for seg in dm:
                length = seg_length(self.table, seg)
                inner = [b - start for b in bounds if start < b < start + length]
                if inner and isinstance(seg, Seg):
                    if any(q % seg.r for q in inner):
                        raise Unsupported(f"{why}: cuts inside a repeated channel block")
                    todo = (seg.space, [q // seg.r * seg.c for q in inner])
                    break
                start += length
            if todo is None:
                break
            self.refine(todo[0], todo[1], why)
        pieces: list[list[Segment]] = [[] for _ in sizes]
        start, j = 0, 0
        for seg in dm:
            length = seg_length(self.table, seg)
            end = start + length
            while start < end:
                take = min(end, bounds[j]) - start
                pieces[j].append(seg if take == length else Fixed(take))
                start += take
                if start == bounds[j] and j < len(bounds) - 1:
                    j += 1
        return [tuple(p) if any(isinstance(s, Seg) for s in p) else None for p in pieces]

    def pin_node(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            maps = self.dimmaps(arg)
            if self.is_param(arg):
                name = self.pname(arg)
                for d, cur in enumerate(self.param_dims[name]):
                    if cur is UNSET and self.param_shapes[name][d] > 1:
                        self._fresh(name, d, "other")
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
            src, idx = node_args(node)[0], node_args(node)[1]
            outs = self.dims.get(src) if isinstance(src, fx.Node) else None
            if isinstance(outs, tuple) and isinstance(idx, int) and idx < len(outs):
                self.dims[node] = outs[idx]
            else:
                self.dims[node] = self._none_like(node)
            return
        name = op_name(target)
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
        except Unsupported as e:
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
                    if self.param_shapes[name][d] == 1:
                        maps[d] = None
                    else:
                        self._fresh(name, d, "other")
            return [self.resolve(m) for m in maps]
        found = self.dimmaps(x)
        if found is None:
            raise Unsupported(f"argument {x} is not a tensor")
        return [self.resolve(m) for m in found]
