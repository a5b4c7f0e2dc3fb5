"""Coupling rules for ATen ops: how each op relates the channel dims of its inputs and outputs.

Each rule takes the analysis and the node and returns the output's dim maps (see
``potstill.coupling``); it may join dims, start a channel space, bind parameter dims, or raise
``_Unsupported(reason)`` to pin what the node touches. Ops with no rule here pin every channel
they touch.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from .coupling import (
    UNSET,
    CouplingAnalysis,
    DimMap,
    Fixed,
    Seg,
    Segment,
    _args,
    _kw,
    _op_name,
    _Unsupported,
    reshape_maps,
    rule,
    seg_length,
)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


UNARY = (
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
    "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu",
    "elu_", "mish", "softplus", "neg", "exp", "log", "sqrt", "rsqrt", "abs", "clone", "contiguous",
    "detach", "alias", "to", "_to_copy", "type_as", "clamp", "clamp_", "clamp_min", "clamp_max", "relu6",
    "erf", "sin", "cos", "reciprocal", "square", "dropout", "feature_dropout", "alpha_dropout", "zeros_like",
    "ones_like", "full_like", "empty_like", "_to_dim_order_copy", "log1p", "expm1", "floor", "ceil", "round",
    "logical_not", "bitwise_not", "sign", "celu", "selu", "prelu_placeholder", "native_dropout",
    "gelu_tanh", "dropout_",
)


@rule(*UNARY)
def _unary(a: CouplingAnalysis, node: fx.Node) -> Any:
    maps = a.arg_maps(_args(node)[0], node.name)
    if _op_name(node.target) == "native_dropout":
        return (maps, list(maps))
    return maps


@rule("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow", "where",
      "masked_fill", "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
      "__and__", "__or__", "bitwise_and", "bitwise_or", "fmod", "remainder", "rsub", "copysign",
      "lerp", "addcmul", "addcdiv")
def _broadcast(a: CouplingAnalysis, node: fx.Node) -> Any:
    out_shape = a.shape(node)
    if out_shape is None:
        return None
    tensors = [x for x in _args(node) if isinstance(x, fx.Node) and a.shape(x) is not None]
    out: list[DimMap] = [None] * len(out_shape)
    seen: list[bool] = [False] * len(out_shape)
    for x in tensors:
        shape = a.shape(x)
        assert shape is not None
        maps = a.arg_maps(x, node.name)
        offset = len(out_shape) - len(shape)
        for d, (size, dm) in enumerate(zip(shape, maps)):
            od = d + offset
            if size == 1 and out_shape[od] != 1:
                if dm is not None:  # a size-1 channel space broadcast: nothing to prune there
                    a.pin_map(dm, f"{node.name}: broadcast channel dim")
                continue
            if not seen[od]:
                out[od], seen[od] = dm, True
            else:
                out[od] = a.join(out[od], dm, out_shape[od], node.name)
    return out


@rule("linear")
def _linear(a: CouplingAnalysis, node: fx.Node) -> Any:
    x, w = _args(node)[0], _args(node)[1]
    bias = _args(node)[2] if len(_args(node)) > 2 else _kw(node).get("bias")
    xm = a.arg_maps(x, node.name)
    if not a.is_param(w):
        raise _Unsupported("linear weight is not a parameter")
    out_map = a.produce(w, 0, kind="neurons")
    a.bind(w, 1, xm[-1], "in", node.name)
    if isinstance(bias, fx.Node) and a.is_param(bias):
        a.bind(bias, 0, out_map, "out", node.name)
    return [*xm[:-1], out_map]


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def _conv(a: CouplingAnalysis, node: fx.Node) -> Any:
    name = _op_name(node.target)
    args = list(_args(node))
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    if name in ("convolution", "_convolution"):
        transposed = bool(args[6]) if len(args) > 6 else False
        groups = int(args[8]) if len(args) > 8 else 1
        if transposed:
            raise _Unsupported("transposed convolution")
    else:
        groups = int(args[6]) if len(args) > 6 else int(_kw(node).get("groups", 1))
    if not a.is_param(w):
        raise _Unsupported("convolution weight is not a parameter")
    xm = a.arg_maps(x, node.name)
    out_shape = a.shape(node)
    assert out_shape is not None
    wname = a.pname(w)
    for d in range(2, len(a.param_shapes[wname])):
        if a.param_dims[wname][d] is UNSET:
            a.param_dims[wname][d] = None
    out_map = a.produce(w, 0)
    if groups == 1:
        if isinstance(bias, fx.Node) and a.is_param(bias):
            a.bind(bias, 0, out_map, "out", node.name)
        a.bind(w, 1, xm[1], "in", node.name)
    else:
        if a.param_dims[wname][1] is UNSET:
            a.param_dims[wname][1] = None
        out_map = _grouped_conv(a, node, w, xm[1], out_map, groups)
        if isinstance(bias, fx.Node) and a.is_param(bias):
            a.bind(bias, 0, out_map, "out", node.name)
    return [xm[0], out_map, *([None] * (len(out_shape) - 2))]


def _grouped_conv(a: CouplingAnalysis, node: fx.Node, w: fx.Node, xin: DimMap, out_map: DimMap, groups: int) -> DimMap:
    """Grouped/depthwise conv: conv group k ties input channels [k*Cin/G, ...) to output [k*Cout/G, ...).

    Over concatenated inputs whose pieces hold whole conv groups, the output channels are split
    the same way (one fresh space per piece), so each piece stays prunable.
    """
    why = f"{node.name}: grouped convolution"
    wname = a.pname(w)
    cout = a.param_shapes[wname][0]
    cin = (a.shape(_args(node)[0]) or (0, 0))[1]
    if xin is None or out_map is None or len(out_map) != 1 or not isinstance(out_map[0], Seg):
        a.pin_map(xin, f"{why} over fixed channels")
        a.pin_map(out_map, f"{why} over fixed channels")
        return out_map
    per_group_in = cin // groups
    lengths = [seg_length(a.table, s) for s in xin]
    if any(n % per_group_in for n in lengths) or any(not isinstance(s, Seg) for s in xin):
        a.pin_map(xin, f"{why}: its groups straddle concatenated pieces")
        a.pin_map(out_map, f"{why}: its groups straddle concatenated pieces")
        return out_map
    kind = "conv_groups" if groups < cin else "channels"
    if len(xin) == 1:
        assert isinstance(xin[0], Seg)
        a.table.union(xin[0].space, out_map[0].space, groups)
        a.table.root(out_map[0].space).kind = kind
        return out_map
    pieces: list[Segment] = []
    old_root = a.table.find(out_map[0].space)
    for seg, n in zip(xin, lengths):
        assert isinstance(seg, Seg)
        g_piece = n // per_group_in
        sid = a.table.new(cout // groups * g_piece, producer=wname, kind=kind)
        a.table.union(seg.space, sid, g_piece)
        pieces.append(Seg(sid))
    # the single output space made by produce() is replaced by the pieces
    a.table.pin(old_root, f"{why}: replaced by per-piece spaces")
    new_map = tuple(pieces)
    a.param_dims[wname][0] = new_map
    return new_map


@rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
      "_native_batch_norm_legit_functional", "instance_norm")
def _batch_norm(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    for p in _args(node)[1:5]:
        if isinstance(p, fx.Node) and a.is_param(p):
            a.bind(p, 0, xm[1], "norm", node.name)
    if _op_name(node.target) in ("batch_norm", "instance_norm"):
        return xm
    val = node.meta.get("val")
    n_out = len(val) if isinstance(val, (tuple, list)) else 1
    return (xm, *([None] * (n_out - 1)))


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    shape = _args(node)[1]
    nd = len(shape) if isinstance(shape, (list, tuple)) else 1
    weight = _args(node)[2] if len(_args(node)) > 2 else _kw(node).get("weight")
    bias = _args(node)[3] if len(_args(node)) > 3 and _op_name(node.target) != "rms_norm" else _kw(node).get("bias")
    norm_dims = list(range(len(xm) - nd, len(xm)))
    seg_dims = [d for d in norm_dims if xm[d] is not None]
    if len(seg_dims) > 1 or (seg_dims and nd > 1):
        raise _Unsupported("normalised over several channel dims")
    for d in seg_dims:
        for seg in xm[d] or ():
            if isinstance(seg, Seg):
                a.table.mark_inexact(seg.space, f"{node.name}: layer-norm statistics span these channels")
                a.table.root(seg.space).kind = "hidden"
    for p in (weight, bias):
        if isinstance(p, fx.Node) and a.is_param(p):
            if nd == 1:
                a.bind(p, 0, xm[-1], "norm", node.name)
            else:
                a.arg_maps(p, node.name)
    if _op_name(node.target) in ("native_layer_norm", "_fused_rms_norm"):
        val = node.meta.get("val")
        n_out = len(val) if isinstance(val, (tuple, list)) else 1
        return (xm, *([None] * (n_out - 1)))
    return xm


@rule("group_norm", "native_group_norm")
def _group_norm(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    if _op_name(node.target) == "group_norm":
        groups, weight, bias = int(_args(node)[1]), _args(node)[2] if len(_args(node)) > 2 else None, _args(node)[3] if len(_args(node)) > 3 else None
    else:
        weight, bias, groups = _args(node)[1], _args(node)[2], int(_args(node)[6])
    cm = xm[1]
    if cm is not None:
        per_group = (a.shape(_args(node)[0]) or (0, 0))[1] // groups
        for seg in cm:
            n = seg_length(a.table, seg)
            if n % per_group:
                raise _Unsupported("a norm group straddles concatenated pieces")
            if isinstance(seg, Seg):
                a.table.coarsen(seg.space, n // per_group)
    for p in (weight, bias):
        if isinstance(p, fx.Node) and a.is_param(p):
            a.bind(p, 0, cm, "norm", node.name)
    if _op_name(node.target) == "native_group_norm":
        return (xm, None, None)
    return xm


@rule("embedding")
def _embedding(a: CouplingAnalysis, node: fx.Node) -> Any:
    w, ids = _args(node)[0], _args(node)[1]
    if not a.is_param(w):
        raise _Unsupported("embedding table is not a parameter")
    name = a.pname(w)
    if a.param_dims[name][0] is UNSET:
        sid = a.table.new(a.param_shapes[name][0], producer=name, kind="vocab")
        a.param_dims[name][0] = (Seg(sid),)
        a.param_roles[(name, 0)] = "other"
    a.pin_map(a.param_dims[name][0], f"{node.name}: embedding rows are looked up by index")
    emb = a.produce(w, 1, kind="hidden")
    idm = a.arg_maps(ids, node.name)
    return [*idm, emb]


def _matmul_like(a: CouplingAnalysis, node: fx.Node, x: Any, y: Any) -> list[DimMap]:
    xs, ys = a.shape(x), a.shape(y)
    if xs is None or ys is None or len(xs) < 2 or len(ys) < 2:
        raise _Unsupported("matmul with a vector operand")
    xm = a.arg_maps(x, node.name) if not a.is_param(x) else None
    if a.is_param(y):
        name = a.pname(y)
        if a.param_dims[name][-1] is UNSET:
            a.produce(y, len(ys) - 1)
    ym = a.arg_maps(y, node.name)
    if xm is None:
        xm = a.arg_maps(x, node.name)
    a.join(xm[-1], ym[-2], xs[-1], node.name)  # the contracted dims carry the same channels
    batch_x, batch_y = xm[:-2], ym[:-2]
    out_shape = a.shape(node)
    assert out_shape is not None
    nb = len(out_shape) - 2
    batch: list[DimMap] = [None] * nb
    for i in range(nb):
        dx = i - (nb - len(batch_x))
        dy = i - (nb - len(batch_y))
        mx = batch_x[dx] if 0 <= dx < len(batch_x) and xs[dx] == out_shape[i] else None
        my = batch_y[dy] if 0 <= dy < len(batch_y) and ys[dy] == out_shape[i] else None
        if mx is not None and my is not None:
            batch[i] = a.join(mx, my, out_shape[i], node.name)
        else:
            batch[i] = mx if mx is not None else my
    return [*batch, xm[-2], ym[-1]]


@rule("matmul", "bmm", "mm")
def _matmul(a: CouplingAnalysis, node: fx.Node) -> Any:
    return _matmul_like(a, node, _args(node)[0], _args(node)[1])


@rule("addmm", "baddbmm")
def _addmm(a: CouplingAnalysis, node: fx.Node) -> Any:
    out = _matmul_like(a, node, _args(node)[1], _args(node)[2])
    bias = _args(node)[0]
    if isinstance(bias, fx.Node):
        if a.is_param(bias):
            a.bind(bias, len(a.param_shapes[a.pname(bias)]) - 1, out[-1], "out", node.name)
        else:
            bm = a.arg_maps(bias, node.name)
            if bm:
                out[-1] = a.join(out[-1], bm[-1], (a.shape(node) or (0,))[-1], node.name)
    return out


@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
def _sdpa(a: CouplingAnalysis, node: fx.Node) -> Any:
    q, k, v = _args(node)[0], _args(node)[1], _args(node)[2]
    qs, ks, vs = a.shape(q), a.shape(k), a.shape(v)
    if qs is None or ks is None or vs is None or len(qs) != 4:
        raise _Unsupported("attention inputs are not [B, H, S, D]")
    qm, km, vm = a.arg_maps(q, node.name), a.arg_maps(k, node.name), a.arg_maps(v, node.name)
    heads = qs[1]
    rep = heads // ks[1]
    kh = km[1]
    if rep > 1 and kh is not None:
        kh = tuple(Seg(s.space, s.c, s.r * rep) if isinstance(s, Seg) else Fixed(s.length * rep) for s in kh)
    a.join(km[1], vm[1], ks[1], node.name)
    hmap = a.join(qm[1], kh, heads, node.name)
    # The per-head feature dim is never pruned: modules reshape with a fixed head_dim.
    for m in (qm[3], km[3], vm[3]):
        a.pin_map(m, f"{node.name}: per-head feature dim of attention")
    a.join(km[2], vm[2], ks[2], node.name)
    a.join(qm[0], km[0], qs[0], node.name)
    out = [qm[0], hmap, qm[2], None]
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return (out, *([None] * (len(val) - 1)))
    return out


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "flip", "roll", "logcumsumexp",
      "_safe_softmax")
def _along_dim(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    dims = _args(node)[1] if len(_args(node)) > 1 else _kw(node).get("dim", _kw(node).get("dims", -1))
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    for d in dims:
        if isinstance(d, int) and xm[_dim(d, len(xm))] is not None:
            raise _Unsupported("mixes channels along a channel dim")
    return xm


@rule("mean", "sum", "amax", "amin", "var", "std", "max", "min", "prod", "norm", "linalg_vector_norm", "any", "all",
      "logsumexp", "argmax", "argmin")
def _reduce(a: CouplingAnalysis, node: fx.Node) -> Any:
    if len(_args(node)) > 1 and isinstance(_args(node)[1], fx.Node):
        return _broadcast(a, node)  # max.other / min.other: elementwise of two tensors (MPNet buckets)
    x = _args(node)[0]
    xm = a.arg_maps(x, node.name)
    name = _op_name(node.target)
    dims: Any = _args(node)[1] if len(_args(node)) > 1 else _kw(node).get("dim")
    if name in ("norm", "linalg_vector_norm"):
        dims = _args(node)[2] if len(_args(node)) > 2 else _kw(node).get("dim")
        keepdim = bool(_args(node)[3]) if len(_args(node)) > 3 else bool(_kw(node).get("keepdim", False))
    else:
        keepdim = bool(_args(node)[2]) if len(_args(node)) > 2 else bool(_kw(node).get("keepdim", False))
    if dims is None or dims == []:
        dims = list(range(len(xm)))
    dims = [_dim(int(d), len(xm)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    out: list[DimMap] = []
    for d, dm in enumerate(xm):
        if d in dims:
            if dm is not None:
                if keepdim and name in ("mean", "sum", "var", "std", "norm", "linalg_vector_norm", "amax"):
                    for seg in dm:
                        if isinstance(seg, Seg):
                            a.table.mark_inexact(seg.space, f"{node.name}: a statistic over these channels")
                else:
                    raise _Unsupported("reduces a channel dim")
            if keepdim:
                out.append(None)
        else:
            out.append(dm)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return (out, list(out))
    return out


@rule("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
      "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool2d",
      "upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest1d", "upsample_linear1d", "_upsample_nearest_exact2d",
      "upsample_bicubic2d", "_adaptive_avg_pool2d", "interpolate", "_upsample_bilinear2d_aa")
def _pool(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    out_shape = a.shape(node)
    if out_shape is None:
        val = node.meta.get("val")
        n = val[0].dim() if isinstance(val, (tuple, list)) else len(xm)
        out = [*xm[:2], *([None] * (n - 2))]
        return (out, list(out))
    lead = len(out_shape) - (len(xm) - 2)
    return [*xm[:lead], *([None] * (len(out_shape) - lead))]


@rule("constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d", "reflection_pad1d")
def _pad(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    pads = list(_args(node)[1])
    for i in range(0, len(pads), 2):
        d = len(xm) - 1 - i // 2
        if (pads[i] or pads[i + 1]) and xm[d] is not None:
            raise _Unsupported("pads a channel dim")
    return xm


@rule("transpose", "swapaxes")
def _transpose(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = list(a.arg_maps(_args(node)[0], node.name))
    i, j = _dim(int(_args(node)[1]), len(xm)), _dim(int(_args(node)[2]), len(xm))
    xm[i], xm[j] = xm[j], xm[i]
    return xm


@rule("t")
def _t(a: CouplingAnalysis, node: fx.Node) -> Any:
    return list(reversed(a.arg_maps(_args(node)[0], node.name)))


@rule("permute")
def _permute(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    return [xm[_dim(int(d), len(xm))] for d in _args(node)[1]]


@rule("expand", "expand_copy", "broadcast_to")
def _expand(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    xs = a.shape(_args(node)[0])
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
def _repeat(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    reps = list(_args(node)[1])
    lead = len(reps) - len(xm)
    out: list[DimMap] = [None] * lead
    for d, dm in enumerate(xm):
        if reps[d + lead] != 1:
            a.pin_map(dm, f"{node.name}: repeats a channel dim")
            out.append(None)
        else:
            out.append(dm)
    return out


@rule("cat", "concat", "concatenate")
def _cat(a: CouplingAnalysis, node: fx.Node) -> Any:
    tensors = [t for t in _args(node)[0] if isinstance(t, fx.Node)]
    out_shape = a.shape(node)
    assert out_shape is not None
    d = _dim(int(_args(node)[1]) if len(_args(node)) > 1 else int(_kw(node).get("dim", 0)), len(out_shape))
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
def _stack(a: CouplingAnalysis, node: fx.Node) -> Any:
    tensors = [t for t in _args(node)[0] if isinstance(t, fx.Node)]
    out_shape = a.shape(node)
    assert out_shape is not None
    d = _dim(int(_args(node)[1]) if len(_args(node)) > 1 else 0, len(out_shape))
    maps = [a.arg_maps(t, node.name) for t in tensors]
    cur = list(maps[0])
    for m in maps[1:]:
        cur = [a.join(x, y, out_shape[i if i < d else i + 1], node.name) for i, (x, y) in enumerate(zip(cur, m))]
    return [*cur[:d], None, *cur[d:]]


def _slice_like(a: CouplingAnalysis, node: fx.Node, d: int, full: bool, removes: bool) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    d = _dim(d, len(xm))
    if xm[d] is not None and not full:
        raise _Unsupported("slices a channel dim")
    if removes:
        return [*xm[:d], *xm[d + 1 :]]
    return xm


@rule("slice")
def _slice(a: CouplingAnalysis, node: fx.Node) -> Any:
    xs = a.shape(_args(node)[0])
    out = a.shape(node)
    assert xs is not None and out is not None
    d = int(_args(node)[1]) if len(_args(node)) > 1 else 0
    return _slice_like(a, node, d, xs == out, removes=False)


@rule("narrow")
def _narrow(a: CouplingAnalysis, node: fx.Node) -> Any:
    return _slice_like(a, node, int(_args(node)[1]), a.shape(_args(node)[0]) == a.shape(node), removes=False)


@rule("select")
def _select(a: CouplingAnalysis, node: fx.Node) -> Any:
    return _slice_like(a, node, int(_args(node)[1]), False, removes=True)


@rule("index_select")
def _index_select(a: CouplingAnalysis, node: fx.Node) -> Any:
    return _slice_like(a, node, int(_args(node)[1]), False, removes=False)


@rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
def _split(a: CouplingAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(_args(node)[0], node.name)
    name = _op_name(node.target)
    d = int(_args(node)[1]) if name == "unbind" and len(_args(node)) > 1 else (
        int(_args(node)[2]) if len(_args(node)) > 2 else int(_kw(node).get("dim", 0)))
    d = _dim(d, len(xm))
    val = node.meta.get("val")
    n = len(val) if isinstance(val, (tuple, list)) else 1
    if xm[d] is not None and n > 1:
        raise _Unsupported("splits a channel dim")
    if name == "unbind":
        return tuple([*xm[:d], *xm[d + 1 :]] for _ in range(n))
    return tuple(list(xm) for _ in range(n))


@rule("squeeze", "unsqueeze", "view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_copy", "_reshape_alias",
      "squeeze_", "unsqueeze_")
def _reshape(a: CouplingAnalysis, node: fx.Node) -> Any:
    x = _args(node)[0]
    xs, out_shape = a.shape(x), a.shape(node)
    if xs is None or out_shape is None:
        raise _Unsupported("unknown shapes")
    return reshape_maps(a, list(a.arg_maps(x, node.name)), xs, out_shape, node.name)
