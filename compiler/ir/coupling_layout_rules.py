"""Coupling rules for layout ops: ops that move, cut, join, reshape or look up along dims.

``transpose``/``permute`` move dim maps; ``expand``/``repeat`` keep or pin them; ``cat`` concatenates
segments and ``stack`` joins; slices and ``split``/``chunk``/``unbind`` cut a channel dim into pieces
with index maps (``analysis.cut`` refines the spaces, after Torch-Pruning's split index mapping);
``view``/``reshape`` split or merge dims, which is how heads appear (``[H*D] -> [H, D]`` makes a
head the unit) and how stacked pieces appear (``[3*E] -> [3, H, D]`` picked apart by ``unbind``);
``index``/``gather`` look up rows (a relative-position bias table, DeBERTa's relative positions)
and keep the channels of the dims they do not touch. Registered like ``potstill.ir.coupling_rules``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from potstill.ir.types import (
    UNSET,
    ChannelAnalysis,
    DimMap,
    Fixed,
    Seg,
    Segment,
    Unsupported,
    dim_index,
    node_args,
    node_kwargs,
    op_name,
    rule,
)
from torch import fx


@rule("transpose", "swapaxes")
def _transpose(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = list(a.arg_maps(node_args(node)[0], node.name))
    i, j = dim_index(int(node_args(node)[1]), len(xm)), dim_index(int(node_args(node)[2]), len(xm))
    xm[i], xm[j] = xm[j], xm[i]
    return xm


@rule("t")
def _t(a: ChannelAnalysis, node: fx.Node) -> Any:
    return list(reversed(a.arg_maps(node_args(node)[0], node.name)))


@rule("permute")
def _permute(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    return [xm[dim_index(int(d), len(xm))] for d in node_args(node)[1]]


@rule("expand", "expand_copy", "broadcast_to")
def _expand(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    xs = a.shape(node_args(node)[0])
    out_shape = a.shape(node)
    assert xs is not None and out_shape is not None
    lead = len(out_shape) - len(xm)
    out: list[DimMap] = [None] * lead
    for d, dm in enumerate(xm):
        if xs[d] == 1 and out_shape[d + lead] != 1:
            a.pin_map(dm, f"{node.name}: expands a size-1 channel dim")
            out.append(None)
        else:
            out.append(dm)
    return out


@rule("repeat")
def _repeat(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    reps = list(node_args(node)[1])
    lead = len(reps) - len(xm)
    out: list[DimMap] = [None] * lead
    for d, dm in enumerate(xm):
        if reps[d + lead] != 1:
            a.pin_map(dm, f"{node.name}: repeats a channel dim")
            out.append(None)
        else:
            out.append(dm)
    return out


@rule("repeat_interleave")
def _repeat_interleave(a: ChannelAnalysis, node: fx.Node) -> Any:
    """``x.repeat_interleave(r, dim)``: each position of ``dim`` becomes ``r`` consecutive ones, so
    a block of ``q`` positions standing for ``c`` channels becomes a block of ``q*r`` (Mamba2's B
    and C, one per group of heads, repeated to the heads: ``[G*N] -> [G, N] -> [H, N]`` carries
    ``Seg(s, N, H/G)`` and couples each group with its heads, as ``repeat_kv`` does). A size-1 dim
    copied out holds one value along it, like a factory op's tensor: it starts a filled space
    (``SpaceTable.new_filled``) that takes the channels it is joined with."""
    args = node_args(node)
    x, reps = args[0], args[1] if len(args) > 1 else node_kwargs(node).get("repeats")
    dim = args[2] if len(args) > 2 else node_kwargs(node).get("dim")
    xs, out_shape = a.shape(x), a.shape(node)
    if xs is None or out_shape is None:
        raise Unsupported("repeat_interleave of repeat counts (a tensor of repeats)")
    xm = a.arg_maps(x, node.name)
    if not isinstance(reps, int) or not isinstance(dim, int):
        if any(dm is not None for dm in xm):
            raise Unsupported("repeats given by a tensor, or over the flattened input")
        return [None] * len(out_shape)
    d = dim_index(dim, len(xm))
    out = list(xm)
    dm = xm[d]
    if dm is None:
        out[d] = (Seg(a.table.new_filled(out_shape[d], node.name)),) if xs[d] == 1 and out_shape[d] > 1 else None
    else:
        out[d] = tuple(Seg(s.space, s.c, s.r * reps) if isinstance(s, Seg) else Fixed(s.length * reps) for s in dm)
    return out


@rule("cat", "concat", "concatenate")
def _cat(a: ChannelAnalysis, node: fx.Node) -> Any:
    tensors = [t for t in node_args(node)[0] if isinstance(t, fx.Node)]
    out_shape = a.shape(node)
    assert out_shape is not None
    d = dim_index(int(node_args(node)[1]) if len(node_args(node)) > 1 else int(node_kwargs(node).get("dim", 0)), len(out_shape))
    maps = [a.arg_maps(t, node.name) for t in tensors]
    shapes = [a.shape(t) for t in tensors]
    maps = [m for m, s in zip(maps, shapes) if s is not None and len(s) == len(out_shape)]
    shapes = [s for s in shapes if s is not None and len(s) == len(out_shape)]
    out: list[DimMap] = []
    for i in range(len(out_shape)):
        if i == d:
            segs: list[Segment] = []
            for m, s in zip(maps, shapes):
                piece = m[i]
                segs.extend(piece if piece is not None else (Fixed(int(s[i])),))  # type: ignore[index]
            out.append(tuple(segs) if any(isinstance(x, Seg) for x in segs) else None)
        else:
            cur = maps[0][i]
            for m in maps[1:]:
                cur = a.join(cur, m[i], out_shape[i], node.name)
            out.append(cur)
    return out


@rule("stack")
def _stack(a: ChannelAnalysis, node: fx.Node) -> Any:
    tensors = [t for t in node_args(node)[0] if isinstance(t, fx.Node)]
    out_shape = a.shape(node)
    assert out_shape is not None
    d = dim_index(int(node_args(node)[1]) if len(node_args(node)) > 1 else 0, len(out_shape))
    maps = [a.arg_maps(t, node.name) for t in tensors]
    cur = list(maps[0])
    for m in maps[1:]:
        cur = [a.join(x, y, out_shape[i if i < d else i + 1], node.name) for i, (x, y) in enumerate(zip(cur, m))]
    return [*cur[:d], None, *cur[d:]]


def _slice_like(a: ChannelAnalysis, node: fx.Node, d: int, full: bool, removes: bool) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    d = dim_index(d, len(xm))
    if xm[d] is not None and not full:
        raise Unsupported("slices a channel dim")
    if removes:
        return [*xm[:d], *xm[d + 1 :]]
    return xm


def _take(a: ChannelAnalysis, node: fx.Node, d: int, start: int, end: int, step: int) -> Any:
    """A contiguous range of a dim; along a channel dim, the range's piece of the channels."""
    xm = a.arg_maps(node_args(node)[0], node.name)
    xs = a.shape(node_args(node)[0])
    assert xs is not None
    d = dim_index(d, len(xm))
    size = xs[d]
    start, end = max(0, start + size if start < 0 else start), min(size, end + size if end < 0 else end)
    if xm[d] is None or (start == 0 and end == size and step == 1):
        return xm
    if step != 1 or end <= start:
        raise Unsupported("takes a strided or empty range of a channel dim")
    sizes = [n for n in (start, end - start, size - end) if n]
    pieces = a.cut(xm[d], sizes, node.name)
    piece = pieces[1] if start else pieces[0]
    xm = [a.resolve(m) for m in a.arg_maps(node_args(node)[0], node.name)]
    return [*xm[:d], piece, *xm[d + 1 :]]


@rule("slice", "slice_copy")
def _slice(a: ChannelAnalysis, node: fx.Node) -> Any:
    args = node_args(node)
    d = int(args[1]) if len(args) > 1 else 0
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    end = args[3] if len(args) > 3 and args[3] is not None else 2**62
    step = int(args[4]) if len(args) > 4 else 1
    if not isinstance(start, int) or not isinstance(end, int):
        raise Unsupported("a slice with symbolic bounds")
    return _take(a, node, d, start, end, step)


@rule("narrow")
def _narrow(a: ChannelAnalysis, node: fx.Node) -> Any:
    _, d, start, length = node_args(node)[:4]
    if not isinstance(start, int) or not isinstance(length, int):
        raise Unsupported("narrow with symbolic bounds")
    return _take(a, node, int(d), start, start + length, 1)


@rule("select")
def _select(a: ChannelAnalysis, node: fx.Node) -> Any:
    return _slice_like(a, node, int(node_args(node)[1]), False, removes=True)


@rule("index_select")
def _index_select(a: ChannelAnalysis, node: fx.Node) -> Any:
    return _slice_like(a, node, int(node_args(node)[1]), False, removes=False)


@rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "split_copy", "unbind_copy")
def _split(a: ChannelAnalysis, node: fx.Node) -> Any:
    """Pieces of a dim. Along a channel dim each piece gets its own slice of the channels (index
    map): the spaces are refined at the cuts, so the chunks of a fused QKV or gate-up projection
    prune independently, or together wherever they meet again (``a * silu(b)``, Q·Kᵀ)."""
    xm = a.arg_maps(node_args(node)[0], node.name)
    name = op_name(node.target)
    if name.startswith("unbind"):
        d = int(node_args(node)[1]) if len(node_args(node)) > 1 else int(node_kwargs(node).get("dim", 0))
    else:
        d = int(node_args(node)[2]) if len(node_args(node)) > 2 else int(node_kwargs(node).get("dim", 0))
    d = dim_index(d, len(xm))
    val = node.meta.get("val")
    if not isinstance(val, (tuple, list)) or not all(hasattr(v, "shape") for v in val):
        raise Unsupported("pieces without shapes")
    sizes = [1] * len(val) if name.startswith("unbind") else [int(v.shape[d]) for v in val]
    pieces = a.cut(xm[d], sizes, node.name) if len(val) > 1 else [xm[d]]
    xm = [a.resolve(m) for m in a.arg_maps(node_args(node)[0], node.name)]
    outs = []
    for piece in pieces:
        if name.startswith("unbind"):
            a.pin_map(piece, f"{node.name}: unbind drops a channel dim")
            outs.append([*xm[:d], *xm[d + 1 :]])
        else:
            outs.append([*xm[:d], piece, *xm[d + 1 :]])
    return tuple(outs)


@rule("squeeze", "unsqueeze", "view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_copy", "_reshape_alias",
      "squeeze_", "unsqueeze_")
def _reshape(a: ChannelAnalysis, node: fx.Node) -> Any:
    x = node_args(node)[0]
    xs, out_shape = a.shape(x), a.shape(node)
    if xs is None or out_shape is None:
        raise Unsupported("unknown shapes")
    return reshape_maps(a, list(a.arg_maps(x, node.name)), xs, out_shape, node.name, _picked_dims(node))


_VALUE_PRESERVING = {"clone", "contiguous", "alias", "_to_copy", "to", "detach", "type_as"}


def _picked_dims(node: fx.Node, depth: int = 0) -> set[int]:
    """Dims of ``node``'s output that a later op takes apart position by position (``unbind``,
    ``select``), followed through permutes and transposes: ``qkv.reshape(B, N, 3, H, D)
    .permute(2, 0, 3, 1, 4).unbind(0)`` picks dim 2."""
    val = node.meta.get("val")
    if depth > 8 or not isinstance(val, torch.Tensor):
        return set()
    nd = val.dim()
    out: set[int] = set()
    for user in node.users:
        name, args = op_name(user.target), node_args(user)
        if name in ("unbind", "select") and args and args[0] is node:
            d = args[1] if len(args) > 1 else node_kwargs(user).get("dim", 0)
            out.add(dim_index(int(d), nd))
        elif name == "permute":
            perm = [dim_index(int(p), nd) for p in args[1]]
            out |= {perm[k] for k in _picked_dims(user, depth + 1)}
        elif name in ("transpose", "swapaxes"):
            i, j = dim_index(int(args[1]), nd), dim_index(int(args[2]), nd)
            out |= {{i: j, j: i}.get(k, k) for k in _picked_dims(user, depth + 1)}
        elif name in _VALUE_PRESERVING:
            out |= _picked_dims(user, depth + 1)
    return out


def reshape_maps(a: ChannelAnalysis, xm: list[DimMap], xs: Sequence[int], ys: Sequence[int], why: str,
                 picked: set[int] | None = None) -> list[DimMap]:
    """Dim maps through a reshape: match runs of input and output dims with equal products.

    A channel dim split into ``[k, ...]`` whose outer ``k`` is taken apart later (``picked``) is
    read as ``k`` stacked pieces (fused QKV as ``[3, H, D]``): the channels are cut into ``k``
    pieces joined index-wise, the outer dim carries none, the inner dims carry a piece's channels.
    """
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
            raise Unsupported("reshape sizes do not match")
        i2, j2 = i + 1, j + 1
        px, py = xs[i], ys[j]
        while px != py:
            if px < py:
                if i2 >= len(xs):
                    raise Unsupported("reshape sizes do not match")
                px *= xs[i2]
                i2 += 1
            else:
                if j2 >= len(ys):
                    raise Unsupported("reshape sizes do not match")
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
            split = _split_pieces if outs[0] in (picked or ()) else _split_dim
            for k, dm in zip(outs, split(a, ins[0][1], [ys[k] for k in outs], why)):
                out[k] = dm
        else:
            for _, dm in ins:
                a.pin_map(dm, f"{why}: reshape mixes several dims")
        i, j = i2, j2
    return out


def _merge(a: ChannelAnalysis, ins: list[tuple[int, DimMap]], why: str) -> DimMap:
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


def _split_pieces(a: ChannelAnalysis, dm: DimMap, sizes: list[int], why: str) -> list[DimMap]:
    if dm is None:
        return [None] * len(sizes)
    k, each = sizes[0], math.prod(sizes[1:])
    pieces = a.cut(dm, [each] * k, why)
    for piece in pieces[1:]:
        a.join(pieces[0], piece, each, why)
    first = a.resolve(pieces[0])
    inner = _split_dim(a, first, sizes[1:], why) if len(sizes) > 2 else [first]
    return [None, *inner]


def _split_dim(a: ChannelAnalysis, dm: DimMap, sizes: list[int], why: str) -> list[DimMap]:
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




@rule("index")
def _index(a: ChannelAnalysis, node: fx.Node) -> Any:
    """``x[idx0, idx1, ...]`` (advanced indexing): indexed dims are looked up, never channels (a
    relative-position bias table's rows); the dims left alone keep their channels (its heads)."""
    x, indices = node_args(node)[0], list(node_args(node)[1])
    if a.is_param(x):
        name = a.pname(x)
        for d, idx in enumerate(indices):
            if idx is not None and a.param_dims[name][d] is UNSET:
                a.param_dims[name][d] = None
    xm = a.arg_maps(x, node.name)
    picked = [d for d, idx in enumerate(indices) if idx is not None]
    for d in picked:
        if xm[d] is not None:
            raise Unsupported("indexes a channel dim")
    for idx in indices:
        if isinstance(idx, fx.Node):
            for m in a.arg_maps(idx, node.name):
                a.pin_map(m, f"{node.name}: channels used as indices")
    out_shape = a.shape(node)
    assert out_shape is not None
    rest = [xm[d] for d in range(len(xm)) if d not in picked]
    n_idx = len(out_shape) - len(rest)
    consecutive = picked == list(range(picked[0], picked[-1] + 1)) if picked else True
    at = picked[0] if picked and consecutive else 0
    keep_before = [xm[d] for d in range(at) if d not in picked]
    return [*keep_before, *([None] * n_idx), *rest[len(keep_before):]]


@rule("gather")
def _gather(a: ChannelAnalysis, node: fx.Node) -> Any:
    """``gather(x, d, idx)`` picks along ``d`` (relative positions in DeBERTa's c2p/p2c terms); the
    other dims keep their channels where the index spans them whole."""
    x, d, idx = node_args(node)[0], int(node_args(node)[1]), node_args(node)[2]
    xm = a.arg_maps(x, node.name)
    xs, out_shape = a.shape(x), a.shape(node)
    assert xs is not None and out_shape is not None
    d = dim_index(d, len(xm))
    # what is picked along ``d`` is data-dependent: those channels stay whole, the other dims go on
    a.pin_map(xm[d], f"{node.name}: gathers along these channels")
    out: list[DimMap] = []
    for i, dm in enumerate(xm):
        if i == d or dm is None:
            out.append(None)
        elif out_shape[i] == xs[i]:
            out.append(dm)
        else:
            raise Unsupported("gathers part of a channel dim")
    if isinstance(idx, fx.Node):
        for i, m in enumerate(a.arg_maps(idx, node.name)):
            if m is not None:
                out[i] = a.join(out[i], m, out_shape[i], node.name)
    return out
