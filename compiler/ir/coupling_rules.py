"""Coupling rules for compute ops: how each op relates the channel dims of its inputs and outputs.

Elementwise ops and norms join equal dims (broadcast size-1 dims excepted); ``linear``/``conv``
(also transposed and grouped), HF ``Conv1D`` (``addmm(b, x, W)``) and an ``einsum`` with a weight
start a channel space at their output dim and read one at their input dim; ``prelu`` and layer
scale (``gamma * x``) slice their per-channel parameters with the channels; matmul and attention
join the contracted dims and carry heads; reductions end a dim. Layout ops (views, cuts, lookups)
are in ``potstill.ir.coupling_layout_rules``.

Each rule takes the analysis (through ``analysis_types.ChannelAnalysis``) and the node and returns
the output's dim maps (see ``potstill.ir.coupling``); it may join dims, start a channel space, bind
parameter dims, cut a dim into pieces (index maps), or raise ``Unsupported(reason)`` to pin what
the node touches. Ops with no rule pin every channel they touch. Rules register into
``analysis_types.RULES``; this module imports nothing else of the analysis, so there is no cycle.
"""

from __future__ import annotations

from typing import Any

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
    seg_length,
)
from torch import fx

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
def _unary(a: ChannelAnalysis, node: fx.Node) -> Any:
    maps = a.arg_maps(node_args(node)[0], node.name)
    if op_name(node.target) == "native_dropout":
        return (maps, list(maps))
    return maps


@rule("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow", "where",
      "masked_fill", "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
      "__and__", "__or__", "bitwise_and", "bitwise_or", "fmod", "remainder", "rsub", "copysign",
      "lerp", "addcmul", "addcdiv")
def _broadcast(a: ChannelAnalysis, node: fx.Node) -> Any:
    out_shape = a.shape(node)
    if out_shape is None:
        return None
    tensors = [x for x in node_args(node) if isinstance(x, fx.Node) and a.shape(x) is not None]
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
def _linear(a: ChannelAnalysis, node: fx.Node) -> Any:
    x, w = node_args(node)[0], node_args(node)[1]
    bias = node_args(node)[2] if len(node_args(node)) > 2 else node_kwargs(node).get("bias")
    xm = a.arg_maps(x, node.name)
    if not a.is_param(w):
        raise Unsupported("linear weight is not a parameter")
    out_map = a.produce(w, 0, kind="neurons")
    a.bind(w, 1, xm[-1], "in", node.name)
    if isinstance(bias, fx.Node) and a.is_param(bias):
        a.bind(bias, 0, out_map, "out", node.name)
    return [*xm[:-1], out_map]


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
      "conv_transpose3d")
def _conv(a: ChannelAnalysis, node: fx.Node) -> Any:
    name = op_name(node.target)
    args = list(node_args(node))
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else node_kwargs(node).get("bias")
    if name in ("convolution", "_convolution"):
        transposed = bool(args[6]) if len(args) > 6 else False
        groups = int(args[8]) if len(args) > 8 else 1
    elif name.startswith("conv_transpose"):
        transposed = True
        groups = int(args[6]) if len(args) > 6 else int(node_kwargs(node).get("groups", 1))
    else:
        transposed = False
        groups = int(args[6]) if len(args) > 6 else int(node_kwargs(node).get("groups", 1))
    if not a.is_param(w):
        raise Unsupported("convolution weight is not a parameter")
    xm = a.arg_maps(x, node.name)
    out_shape = a.shape(node)
    assert out_shape is not None
    wname = a.pname(w)
    for d in range(2, len(a.param_shapes[wname])):
        if a.param_dims[wname][d] is UNSET:
            a.param_dims[wname][d] = None
    if transposed:
        out_map = _transposed_conv(a, node, w, xm[1], groups)
    elif groups == 1:
        out_map = a.produce(w, 0)
        a.bind(w, 1, xm[1], "in", node.name)
    else:
        out_map = a.produce(w, 0)
        if a.param_dims[wname][1] is UNSET:
            a.param_dims[wname][1] = None
        out_map = _grouped_conv(a, node, w, xm[1], out_map, groups)
    if isinstance(bias, fx.Node) and a.is_param(bias):
        a.bind(bias, 0, out_map, "out", node.name)
    return [xm[0], out_map, *([None] * (len(out_shape) - 2))]


def _transposed_conv(a: ChannelAnalysis, node: fx.Node, w: fx.Node, xin: DimMap, groups: int) -> DimMap:
    """ConvTranspose weight is ``[C_in, C_out/groups, *k]``: dim 1 starts the output channels and
    dim 0 reads the input's. With groups, group ``k`` maps input channels ``[k*C_in/G, ...)`` to
    output channels ``[k*C_out/G, ...)``: whole groups are pruned (dim 0 rows and the outputs)."""
    wname = a.pname(w)
    if groups == 1:
        out_map = a.produce(w, 1)
        a.bind(w, 0, xin, "in", node.name)
        return out_map
    if a.param_dims[wname][1] is UNSET:
        a.param_dims[wname][1] = None
    a.bind(w, 0, xin, "in", node.name)
    xin = a.resolve(xin)
    cout = (a.shape(node) or (0, 0))[1]
    if xin is None or len(xin) != 1 or not isinstance(xin[0], Seg):
        raise Unsupported("grouped transposed convolution over concatenated or fixed channels")
    sid = a.table.new(cout, producer=wname, kind="conv_groups")
    a.table.union(xin[0].space, sid, groups)
    a.table.root(sid).kind = "conv_groups" if groups < cout else "channels"
    return (Seg(sid),)


def _grouped_conv(a: ChannelAnalysis, node: fx.Node, w: fx.Node, xin: DimMap, out_map: DimMap, groups: int) -> DimMap:
    """Grouped/depthwise conv: conv group k ties input channels [k*Cin/G, ...) to output [k*Cout/G, ...).

    Over concatenated inputs whose pieces hold whole conv groups, the output channels are split
    the same way (one fresh space per piece), so each piece stays prunable.
    """
    why = f"{node.name}: grouped convolution"
    wname = a.pname(w)
    cout = a.param_shapes[wname][0]
    cin = (a.shape(node_args(node)[0]) or (0, 0))[1]
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
def _batch_norm(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    for p in node_args(node)[1:5]:
        if isinstance(p, fx.Node) and a.is_param(p):
            a.bind(p, 0, xm[1], "norm", node.name)
    if op_name(node.target) in ("batch_norm", "instance_norm"):
        return xm
    val = node.meta.get("val")
    n_out = len(val) if isinstance(val, (tuple, list)) else 1
    return (xm, *([None] * (n_out - 1)))


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    shape = node_args(node)[1]
    nd = len(shape) if isinstance(shape, (list, tuple)) else 1
    weight = node_args(node)[2] if len(node_args(node)) > 2 else node_kwargs(node).get("weight")
    bias = node_args(node)[3] if len(node_args(node)) > 3 and op_name(node.target) != "rms_norm" else node_kwargs(node).get("bias")
    norm_dims = list(range(len(xm) - nd, len(xm)))
    seg_dims = [d for d in norm_dims if xm[d] is not None]
    if len(seg_dims) > 1 or (seg_dims and nd > 1):
        raise Unsupported("normalised over several channel dims")
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
    if op_name(node.target) in ("native_layer_norm", "_fused_rms_norm"):
        val = node.meta.get("val")
        n_out = len(val) if isinstance(val, (tuple, list)) else 1
        return (xm, *([None] * (n_out - 1)))
    return xm


@rule("group_norm", "native_group_norm")
def _group_norm(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    if op_name(node.target) == "group_norm":
        groups, weight, bias = int(node_args(node)[1]), node_args(node)[2] if len(node_args(node)) > 2 else None, node_args(node)[3] if len(node_args(node)) > 3 else None
    else:
        weight, bias, groups = node_args(node)[1], node_args(node)[2], int(node_args(node)[6])
    cm = xm[1]
    if cm is not None:
        per_group = (a.shape(node_args(node)[0]) or (0, 0))[1] // groups
        for seg in cm:
            n = seg_length(a.table, seg)
            if n % per_group:
                raise Unsupported("a norm group straddles concatenated pieces")
            if isinstance(seg, Seg):
                a.table.coarsen(seg.space, n // per_group)
    for p in (weight, bias):
        if isinstance(p, fx.Node) and a.is_param(p):
            a.bind(p, 0, cm, "norm", node.name)
    if op_name(node.target) == "native_group_norm":
        return (xm, None, None)
    return xm


@rule("embedding")
def _embedding(a: ChannelAnalysis, node: fx.Node) -> Any:
    w, ids = node_args(node)[0], node_args(node)[1]
    if not a.is_param(w):
        raise Unsupported("embedding table is not a parameter")
    name = a.pname(w)
    if a.param_dims[name][0] is UNSET:
        sid = a.table.new(a.param_shapes[name][0], producer=name, kind="vocab")
        a.param_dims[name][0] = (Seg(sid),)
        a.param_roles[(name, 0)] = "other"
    a.pin_map(a.param_dims[name][0], f"{node.name}: embedding rows are looked up by index")
    emb = a.produce(w, 1, kind="hidden")
    idm = a.arg_maps(ids, node.name)
    return [*idm, emb]


def _matmul_like(a: ChannelAnalysis, node: fx.Node, x: Any, y: Any) -> list[DimMap]:
    xs, ys = a.shape(x), a.shape(y)
    if xs is None or ys is None or len(xs) < 2 or len(ys) < 2:
        raise Unsupported("matmul with a vector operand")
    xm = a.arg_maps(x, node.name) if not a.is_param(x) else None
    if a.is_param(y):
        name = a.pname(y)
        if a.param_dims[name][-1] is UNSET:
            a.produce(y, len(ys) - 1, kind="neurons")
    ym = a.arg_maps(y, node.name)
    if xm is None:
        xm = a.arg_maps(x, node.name)
    a.join(xm[-1], ym[-2], xs[-1], node.name)  # the contracted dims carry the same channels
    # a weight reached through views (``x @ W.t()``, HF Conv1D's ``addmm(b, x, W)``) reads and makes channels
    a.mark_role(ym[-2], "in")
    a.mark_role(xm[-1], "in")
    a.mark_role(ym[-1], "out")
    a.mark_role(xm[-2], "out")
    xm, ym = [a.resolve(m) for m in xm], [a.resolve(m) for m in ym]
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
def _matmul(a: ChannelAnalysis, node: fx.Node) -> Any:
    return _matmul_like(a, node, node_args(node)[0], node_args(node)[1])


@rule("addmm", "baddbmm")
def _addmm(a: ChannelAnalysis, node: fx.Node) -> Any:
    out = _matmul_like(a, node, node_args(node)[1], node_args(node)[2])
    bias = node_args(node)[0]
    if isinstance(bias, fx.Node):
        if a.is_param(bias):
            a.bind(bias, len(a.param_shapes[a.pname(bias)]) - 1, out[-1], "out", node.name)
        else:  # an activation added to the product broadcasts over every dim, not just the last
            bm, shape, out_shape = a.arg_maps(bias, node.name), a.shape(bias), a.shape(node)
            if bm and shape is not None and out_shape is not None:
                offset = len(out_shape) - len(shape)
                for d, (size, dm) in enumerate(zip(shape, bm)):
                    od = d + offset
                    if size == 1 and out_shape[od] != 1:
                        a.pin_map(dm, f"{node.name}: broadcast channel dim")
                    else:  # e.g. ALiBi's per-head bias, computed from the head count, pins the heads
                        out[od] = a.join(out[od], dm, out_shape[od], node.name)
    return out


@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
def _sdpa(a: ChannelAnalysis, node: fx.Node) -> Any:
    q, k, v = node_args(node)[0], node_args(node)[1], node_args(node)[2]
    qs, ks, vs = a.shape(q), a.shape(k), a.shape(v)
    if qs is None or ks is None or vs is None or len(qs) != 4:
        raise Unsupported("attention inputs are not [B, H, S, D]")
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
def _along_dim(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    dims = node_args(node)[1] if len(node_args(node)) > 1 else node_kwargs(node).get("dim", node_kwargs(node).get("dims", -1))
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    for d in dims:
        if isinstance(d, int) and xm[dim_index(d, len(xm))] is not None:
            raise Unsupported("mixes channels along a channel dim")
    return xm


@rule("tril", "triu")
def _triangle(a: ChannelAnalysis, node: fx.Node) -> Any:
    """``tril``/``triu`` zero by position in the last two dims (a causal mask ``tril(ones(T, T))``,
    Mamba2's segment sums): a channel there is pinned, a filled tensor's dim is no channel."""
    xm = a.arg_maps(node_args(node)[0], node.name)
    return [*xm[:-2], *(a.fix_positions(dm, f"{node.name}: keeps a triangle by position") for dm in xm[-2:])]


@rule("mean", "sum", "amax", "amin", "var", "std", "max", "min", "prod", "norm", "linalg_vector_norm", "any", "all",
      "logsumexp", "argmax", "argmin")
def _reduce(a: ChannelAnalysis, node: fx.Node) -> Any:
    if len(node_args(node)) > 1 and isinstance(node_args(node)[1], fx.Node):
        return _broadcast(a, node)  # max.other / min.other: elementwise of two tensors (MPNet buckets)
    x = node_args(node)[0]
    xm = a.arg_maps(x, node.name)
    name = op_name(node.target)
    dims: Any = node_args(node)[1] if len(node_args(node)) > 1 else node_kwargs(node).get("dim")
    if name in ("norm", "linalg_vector_norm"):
        dims = node_args(node)[2] if len(node_args(node)) > 2 else node_kwargs(node).get("dim")
        keepdim = bool(node_args(node)[3]) if len(node_args(node)) > 3 else bool(node_kwargs(node).get("keepdim", False))
    else:
        keepdim = bool(node_args(node)[2]) if len(node_args(node)) > 2 else bool(node_kwargs(node).get("keepdim", False))
    if dims is None or dims == []:
        dims = list(range(len(xm)))
    dims = [dim_index(int(d), len(xm)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    out: list[DimMap] = []
    for d, dm in enumerate(xm):
        if d in dims:
            if dm is not None:
                if keepdim and name in ("mean", "sum", "var", "std", "norm", "linalg_vector_norm", "amax"):
                    for seg in dm:
                        if isinstance(seg, Seg):
                            a.table.mark_inexact(seg.space, f"{node.name}: a statistic over these channels")
                else:  # the other dims keep their channels (Mamba2 sums B·C over the state, per head)
                    a.pin_map(dm, f"{node.name} ({name}): reduces a channel dim")
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
def _pool(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    out_shape = a.shape(node)
    if out_shape is None:
        val = node.meta.get("val")
        n = val[0].dim() if isinstance(val, (tuple, list)) else len(xm)
        out = [*xm[:2], *([None] * (n - 2))]
        return (out, list(out))
    lead = len(out_shape) - (len(xm) - 2)
    return [*xm[:lead], *([None] * (len(out_shape) - lead))]


@rule("constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d", "reflection_pad1d")
def _pad(a: ChannelAnalysis, node: fx.Node) -> Any:
    xm = a.arg_maps(node_args(node)[0], node.name)
    pads = list(node_args(node)[1])
    for i in range(0, len(pads), 2):
        d = len(xm) - 1 - i // 2
        if (pads[i] or pads[i + 1]) and xm[d] is not None:
            raise Unsupported("pads a channel dim")
    return xm


@rule("prelu", "_prelu_kernel")
def _prelu(a: ChannelAnalysis, node: fx.Node) -> Any:
    """PReLU with one slope per channel (dim 1, or dim 0 of a vector): the slopes are sliced with them."""
    x, w = node_args(node)[0], node_args(node)[1]
    xm = a.arg_maps(x, node.name)
    if isinstance(w, fx.Node) and a.is_param(w) and a.param_shapes[a.pname(w)][0] > 1:
        a.bind(w, 0, xm[1] if len(xm) > 1 else xm[0], "other", node.name)
    elif isinstance(w, fx.Node) and not a.is_param(w):
        a.arg_maps(w, node.name)
    return [a.resolve(m) for m in xm]


def einsum_subscripts(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Operand and output subscripts with ``...`` expanded to fresh upper-case letters."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        raise Unsupported("einsum operands do not match its equation")
    n_ell = max((r - len(s.replace("...", "")) for s, r in zip(ins, ranks) if "..." in s), default=0)
    ell = "".join(chr(ord("A") + i) for i in range(n_ell))

    def expand(sub: str, rank: int | None) -> str:
        if "..." not in sub:
            return sub
        k = (rank - len(sub.replace("...", ""))) if rank is not None else n_ell
        return sub.replace("...", ell[n_ell - k :])

    ins = [expand(sub, r) for sub, r in zip(ins, ranks)]
    if arrow:
        out = expand(rhs, None)
    else:
        counts = {c: "".join(ins).count(c) for c in "".join(ins)}
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    return ins, out


@rule("einsum")
def _einsum(a: ChannelAnalysis, node: fx.Node) -> Any:
    """Contraction from the subscripts: every letter joins the dims it labels across the inputs
    (broadcast size-1 dims excepted); a letter kept in the output carries them there. A weight's
    letter that only it and the output share starts channels; a weight's contracted letter reads
    them (so ``einsum("bsd,hd->bsh", x, W)`` is a linear layer)."""
    equation, operands = node_args(node)[0], node_args(node)[1]
    if not isinstance(equation, str) or not all(isinstance(t, fx.Node) for t in operands):
        raise Unsupported("einsum with non-tensor operands")
    shapes = [a.shape(t) for t in operands]
    if any(s is None for s in shapes):
        raise Unsupported("einsum operand without a shape")
    subs, out = einsum_subscripts(equation, [len(s or ()) for s in shapes])
    if any(len(set(sub)) != len(sub) for sub in subs):
        raise Unsupported("einsum takes a diagonal")
    is_param = [a.is_param(t) for t in operands]
    acts = "".join(sub for sub, p in zip(subs, is_param) if not p)
    for t, sub, p, shape in zip(operands, subs, is_param, shapes):
        if p:  # a weight's free letters start channels before they are read
            for d, c in enumerate(sub):
                if c in out and c not in acts and (shape or ())[d] > 1:
                    a.produce(t, d, kind="neurons")
    maps = [a.arg_maps(t, node.name) for t in operands]
    letter: dict[str, DimMap] = {}
    size: dict[str, int] = {}
    for sub, m, shape, p in zip(subs, maps, shapes, is_param):
        for d, c in enumerate(sub):
            n = (shape or ())[d]
            if n == 1 and size.get(c, 1) != 1:
                a.pin_map(m[d], f"{node.name}: broadcast channel dim")
                continue
            if c not in letter or size.get(c, 1) == 1:
                letter[c], size[c] = m[d], n
            else:
                letter[c] = a.join(letter[c], m[d], n, node.name)
            if p and c not in out:
                a.mark_role(m[d], "in")
    return [a.resolve(letter.get(c)) for c in out]


@rule("zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty")
def _factory(a: ChannelAnalysis, node: fx.Node) -> Any:
    """A tensor made filled with one value (Mamba's ``torch.zeros(b, intermediate_size, state)``
    scan state): it holds the same value at every position, so each of its dims may take whatever
    channels it is joined with. Every dim wider than 1 starts a space of no parameter; a join with
    channels carries them. A join with a non-channel dim (a causal mask ``full((T, T))`` added to
    the scores along the sequence) makes the whole class void, no channel at all
    (``CouplingAnalysis.join``): a space sized by a constant never reaches the heads. Its size is a
    constant of the graph: the space remembers the node, and ``potstill.ir.surgery_probe`` runs a
    narrowed forward to check that the module sizes the tensor by the pruned width."""
    out_shape = a.shape(node)
    if out_shape is None:
        return None
    out: list[DimMap] = []
    for n in out_shape:
        if n > 1:
            out.append((Seg(a.table.new_filled(n, node.name)),))
        else:
            out.append(None)
    return out
