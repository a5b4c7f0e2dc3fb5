"""Least-squares reconstruction: after pruning, refit the layers that *consume* the pruned units.

A consumer computes ``y = W x + b`` over its input channels (an ``nn.Linear``, or any ungrouped
``nn.Conv2d`` through im2col: every output position is a sample, every (channel, tap) a column).
After slicing, the student's consumer sees ``x_s`` (the kept channels, and whatever error the layers
before it already made) where the source model saw ``x_t``. Each consumer is refitted, in forward
order, so that the student reproduces the source's output of that layer from its own input
(``x~ = [x; 1]``, padding tokens masked out, ridge ``lambda`` relative to the Gram's diagonal):

    [W' b'] = argmin sum ||W' x_s + b' - (W x_t + b)||^2 + lambda ||W'||^2
            = [W b] C (G + lambda I)^-1,      C = sum x~_t x~_s^T,  G = sum x~_s x~_s^T

Closed form, no gradient steps. Because each layer is fitted on the inputs the already-refitted
layers before it produce, errors do not compound: this is the layer-wise least-squares mask tuning
of Kwon et al., "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022, §4.3),
with the whole consumer refitted rather than one scale per kept unit, plus the bias compensation
of FLAP (An et al., AAAI 2024). When ``x_s = x_t[K]`` (the first consumer) it reduces to
``[W b] G_full[:, K+1] (G_full[K+1, K+1] + lambda I)^-1``.

Where the layer's output is added to a residual stream and normalised (``norm(layer(x) + r)``, a
LayerNorm beside it, as in BERT's output blocks), the target is Kwon et al.'s: the source's *sum*
minus the student's residual, ``y = (W x_t + b + r_t) - r_s``, so the refit also absorbs the drift
the residual stream carries from earlier layers.

``mode="scale"`` fits one factor per kept unit (and the bias) instead of every weight -- exactly
Kwon's mask tuning, ``K`` unknowns per layer, safe with little data; ``mode="full"`` fits every
kept weight, with the ridge pulling toward the weights it had (``lambda ||W' - W_K||^2``).

Only consumers whose whole input is one pruned group are refitted (FFN down projections, attention
output projections, inverted-residual projections, the conv after a pruned conv) -- not the hidden
size, whose consumers also see the norms' statistics change. A consumer without a bias moves the
correction into the BatchNorm reading its output (``running_mean -= b'``), or refits its weights alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from potstill.inputs.data import Batch, run_with_masks, token_mask
from potstill.ir.cow import unshare
from potstill.ir.layerwise import (
    BlockInput,
    StopForward,
    block_output,
    blocks_share_inputs,
    first_block_inputs,
    layer_stack,
    run_hooked,
    with_hidden,
)
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis


def _is_pointwise(mod: nn.Module | None) -> bool:
    """A 1x1, stride-1, ungrouped conv: a linear map over channels at every pixel."""
    return (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.stride == (1, 1)
            and mod.groups == 1 and mod.padding in ((0, 0), "valid"))


def _dense_conv(mod: nn.Module | None) -> bool:
    """An ungrouped 2-D conv with zero padding given as numbers: linear over (channel, tap) columns."""
    return (isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str))


def _in_features(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else int(mod.in_channels)  # type: ignore[arg-type]


def consumers(model: nn.Module, analysis: Analysis, group_ids: Iterable[int], spatial: bool = False) -> dict[str, int]:
    """Linear / pointwise-conv modules (any ungrouped conv with ``spatial``) whose whole input is one
    group's channels: name -> group id."""
    modules = dict(model.named_modules())
    found: dict[str, int] = {}
    for gid in group_ids:
        g = analysis.groups[gid]
        if g.kind == "hidden":
            continue
        for m in g.members:
            mod = modules.get(m.module)
            conv_ok = _dense_conv(mod) if spatial else _is_pointwise(mod)
            if mod is None or not (isinstance(mod, nn.Linear) or conv_ok):
                continue
            if (m.role == "in" and m.dim == 1 and m.param == f"{m.module}.weight"
                    and m.offset == 0 and g.n_units * m.unit_len == _in_features(mod)):
                found[m.module] = gid
    return found


def collect_grams(model: nn.Module, names: Iterable[str], batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """``sum x~ x~^T`` of each named linear's input over the batches' non-padding tokens (float64)."""
    grams: dict[str, torch.Tensor] = {}
    mask_box: list[torch.Tensor | None] = [None]
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach().double()
            if x.dim() == 4:  # pointwise conv: channels last, every pixel a sample
                x = x.permute(0, 2, 3, 1)
            mask = mask_box[0]
            if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1])
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run_with_masks(model, batches, lambda mask: mask_box.__setitem__(0, mask))
    finally:
        for h in handles:
            h.remove()
    return grams


def following_batchnorms(model: nn.Module, names: Iterable[str], batch: Batch) -> dict[str, nn.Module]:
    """For each named module, the BatchNorm that reads its output directly (found by tensor identity)."""
    produced: dict[int, str] = {}
    found: dict[str, nn.Module] = {}
    handles = []
    for name in names:

        def out_hook(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
            produced[id(out)] = name

        handles.append(model.get_submodule(name).register_forward_hook(out_hook))
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:

            def bn_hook(m: nn.Module, args: tuple[Any, ...]) -> None:
                if args and id(args[0]) in produced:
                    found.setdefault(produced[id(args[0])], m)

            handles.append(mod.register_forward_pre_hook(bn_hook))
    run_hooked(model, batch, handles)
    return found


def _columns(mod: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The module's input as rows of columns ``[samples, in_features (* taps)]`` (float64)."""
    x = x.detach().double()
    if isinstance(mod, nn.Conv2d):
        padding = mod.padding if not isinstance(mod.padding, str) else 0  # "valid"; "same" is never a target
        cols = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, padding, mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _capture(model: nn.Module, name: str, batch: Batch, mask: torch.Tensor | None,
             norm: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's input columns, and (with ``norm``) the input of that norm, flattened like the
    layer's output; the forward pass stops as soon as what is asked for is seen."""
    box: dict[str, torch.Tensor] = {}

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        box["x"] = _columns(m, args[0], mask)
        if norm is None:
            raise StopForward

    def norm_hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        if "x" in box:
            box["z"] = _columns(nn.Identity(), args[0], mask)
            raise StopForward

    handles = [model.get_submodule(name).register_forward_pre_hook(hook)]
    if norm is not None:
        handles.append(model.get_submodule(norm).register_forward_pre_hook(norm_hook))
    run_hooked(model, batch, handles)
    if "x" not in box:
        raise RuntimeError(f"reconstruction: layer '{name}' was not called by the forward pass")
    return box["x"], box.get("z")


#: a layer's refit reads calibration batches until it has this many rows (output positions or
#: tokens) per column of its input: the least-squares error then lies within about 1 % of the fit
#: on unlimited rows (excess risk ~ columns / rows), and a CNN's early layers, with hundreds of
#: positions per image, stop after a few batches instead of running every one through the model
ROWS_PER_COLUMN = 128


#: the inputs of one layer per batch: (student's x, student's z, source's x, source's z); see ``_capture``
Inputs = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]
#: ``norm -> the inputs per batch`` (``norm``: the residual LayerNorm whose input is captured too, or None)
Captures = Callable[[str | None], Iterator[Inputs]]


def _whole_model_captures(source: nn.Module, student: nn.Module, name: str, batches: Sequence[Batch],
                          norm: str | None, rename: Callable[[str], str] = str) -> Iterator[Inputs]:  # fmt: skip
    """Per batch, a forward pass of each model stopped at layer ``name`` (``rename(name)`` in the source)."""
    for b in batches:
        xs, zs = _capture(student, name, b, token_mask(b), norm)
        xt, zt = _capture(source, rename(name), b, token_mask(b), None if norm is None else rename(norm))
        yield xs, zs, xt, zt


def _in_stack(container: str, name: str) -> bool:
    """Whether module ``name`` lies inside one of the items of ``container``."""
    prefix = f"{container}." if container else ""
    rest = name[len(prefix):]
    return name.startswith(prefix) and rest.split(".", 1)[0].isdigit() and "." in rest


def _block_captures(src: nn.Module, dst: nn.Module, layer: str, head: str, xs: Sequence[BlockInput],
                    xt: Sequence[BlockInput], masks: Sequence[torch.Tensor | None]) -> Captures:  # fmt: skip
    """Captures of ``layer`` (a name inside the blocks) from the blocks' own inputs; a residual norm
    ``norm`` (a whole-model name) is looked up below ``head`` too."""

    def captured(norm: str | None) -> Iterator[Inputs]:
        z = norm[len(head):] if norm is not None and norm.startswith(head) else None
        for (a_s, k_s), (a_t, k_t), mask in zip(xs, xt, masks):
            x_s, z_s = _capture(dst, layer, Batch(a_s, k_s), mask, z)
            x_t, z_t = _capture(src, layer, Batch(a_t, k_t), mask, z)
            yield x_s, z_s, x_t, z_t

    return captured


def reconstruct_layerwise(source: nn.Module, student: nn.Module, container: str, names: Sequence[str],
                          batches: Sequence[Batch], refit: Callable[[str, Captures], None],
                          kept: Sequence[int] | None = None) -> None:  # fmt: skip
    """Refit ``names`` (all inside the items of ``container``) one block at a time: each model's
    block inputs are captured once (``potstill.ir.layerwise``), and block ``i`` then runs on them alone
    (SparseGPT's and FLAP's order), so a refit costs one block's forward, not a whole-model forward
    stopped at the layer. Refits run in forward order and the student's next block inputs come from
    its refitted block, so the fit sees exactly the inputs the whole-model capture would.

    ``kept``: the source block each student block is (the student lost the others; default: the
    same blocks). The source runs every block, so a student block is fitted to what the source
    computes at that depth."""
    src_blocks, dst_blocks = list(source.get_submodule(container).children()), list(student.get_submodule(container).children())
    xt = first_block_inputs(source, src_blocks[0], batches)
    xs = first_block_inputs(student, dst_blocks[0], batches)
    masks = [token_mask(b) for b in batches]
    prefix = f"{container}." if container else ""
    student_of = {i: j for j, i in enumerate(kept if kept is not None else range(len(dst_blocks)))}
    for i, src in enumerate(src_blocks):
        j = student_of.get(i)
        if j is not None:
            dst, head = dst_blocks[j], f"{prefix}{j}."
            for name in [n for n in names if n.startswith(head)]:
                refit(name, _block_captures(src, dst, name[len(head):], head, xs, xt, masks))
            with torch.no_grad():
                xs = [with_hidden(inp, block_output(dst(*inp[0], **inp[1]))) for inp in xs]
        with torch.no_grad():
            xt = [with_hidden(inp, block_output(src(*inp[0], **inp[1]))) for inp in xt]


def refit_in_order(source: nn.Module, student: nn.Module, names: Sequence[str], batches: Sequence[Batch],
                   refit: Callable[..., None], kept: Mapping[str, Sequence[int]] | None = None,
                   *, layerwise: bool = True) -> None:  # fmt: skip
    """Call ``refit(name[, captured])`` for ``names`` (in forward order): those inside the student's
    layer stack one block at a time (``reconstruct_layerwise``; ``kept``: per container, the source
    block each student block is), the others (an embedding projection before it, a classifier
    after it) with whole-model captures, before or after the stack as the forward pass reaches them.
    Where the stack's blocks get their own arguments (per-layer masks or rotary tables, sliding
    windows), or ``layerwise`` is false, every layer uses whole-model captures."""
    stack = layer_stack(student) if layerwise else None
    container = stack[0] if stack is not None else None
    inside = [n for n in names if container is not None and _in_stack(container, n)]
    if container is None or not inside or not all(
            blocks_share_inputs(m, list(m.get_submodule(container).children()), batches[0]) for m in (source, student)):
        for name in names:
            refit(name)
        return
    first = names.index(inside[0])
    for name in names[:first]:
        refit(name)
    reconstruct_layerwise(source, student, container, inside, batches, refit, (kept or {}).get(container))
    for name in names[first:]:
        if name not in inside:
            refit(name)


def residual_norm(model: nn.Module, name: str) -> str | None:
    """The LayerNorm beside layer ``name`` in its parent (``norm(layer(x) + residual)``, as in BERT's
    output blocks), whose input carries the residual stream the refit also corrects; else None."""
    parent_name, _, _ = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    norms = [n for n, c in parent.named_children() if isinstance(c, nn.LayerNorm) or type(c).__name__.endswith("LayerNorm")]
    if len(norms) != 1 or not isinstance(model.get_submodule(name), nn.Linear):
        return None
    return f"{parent_name}.{norms[0]}" if parent_name else norms[0]


def forward_order(model: nn.Module, names: Iterable[str], batch: Batch) -> list[str]:
    """``names`` in the order the forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name in names:

        def hook(_m: nn.Module, _a: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    run_hooked(model, batch, handles)
    return order + [n for n in names if n not in order]


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def kept_rows(analysis: Analysis, name: str, keep: Mapping[int, Sequence[int]]) -> list[int] | None:
    """The output channels of layer ``name`` that survive ``keep`` (None: all of them)."""
    for gid, units in keep.items():
        g = analysis.groups[gid]
        for m in g.members:
            if m.param == f"{name}.weight" and m.dim == 0 and len(units) < g.n_units:
                return sorted(g.positions(m, list(units)))
    return None


def _solve_full(gram: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin ||T X_s - Y||^2 + lambda ||T - T0||^2`` from ``G = X_s X_s^T`` and ``rhs = Y X_s^T``."""
    lam = ridge * float(torch.diagonal(gram).mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, (rhs + lam * start).T).T


def _solve_scale(gram: torch.Tensor, cross_y: torch.Tensor, w0: torch.Tensor, col_unit: torch.Tensor,
                 n_units: int, with_bias: bool, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kwon et al.'s mask tuning: one scale ``s_u`` per kept unit (and a free bias), ridge toward 1.

    ``y^ = sum_u s_u W0_u x_u + b'``; with centred statistics the normal equations are
    ``(P^T ((W0^T W0) * G_c) P) s = P^T r``, ``r_j = W0_j . (Y X_c^T)_j`` (``P``: column -> unit)."""
    k = w0.shape[1]
    if with_bias:
        n = gram[-1, -1].clamp_min(1.0)
        mean_x = gram[:-1, -1] / n
        g = gram[:-1, :-1] - n * torch.outer(mean_x, mean_x)
        y_mean = cross_y[:, -1] / n
        yx = cross_y[:, :-1] - n * torch.outer(y_mean, mean_x)
    else:
        g, yx = gram, cross_y
    m = (w0.T @ w0) * g
    r = (yx * w0).sum(0)
    p = torch.zeros(k, n_units, dtype=gram.dtype)
    p[torch.arange(k), col_unit] = 1.0
    a, rhs = p.T @ m @ p, p.T @ r
    lam = ridge * float(torch.diagonal(a).mean())
    s = torch.linalg.solve(a + lam * torch.eye(n_units, dtype=a.dtype), rhs + lam)
    w = w0 * s[col_unit]
    bias = (y_mean - w @ mean_x) if with_bias else None
    return w, bias


def refit_layer(source: nn.Module, student: nn.Module, name: str, batches: Sequence[Batch],
                ridge: float = 1e-3, bias_sink: nn.Module | None = None, rows: Sequence[int] | None = None,
                col_unit: torch.Tensor | None = None, residual: bool = True,
                captured: Captures | None = None, rename: Callable[[str], str] = str) -> None:  # fmt: skip
    """Refit ``student``'s layer ``name`` to reproduce ``source``'s output of it (module docstring);
    ``rows``: the source's output channels the student kept; ``col_unit``: the unit of each of the
    student's input columns, for the one-scale-per-unit fit (None: refit every weight);
    ``captured(norm)``: the layer's inputs per batch, ``(x_s, z_s, x_t, z_t)`` (default: a forward
    pass of each whole model per batch, stopped at the layer); ``rename``: a student module's name
    in the source, where the student lost blocks (default: the same name)."""
    src, dst = source.get_submodule(rename(name)), student.get_submodule(name)
    w_src: torch.Tensor = src.weight  # type: ignore[assignment]
    b_src: torch.Tensor | None = src.bias  # type: ignore[assignment]
    w_dst: torch.Tensor = dst.weight  # type: ignore[assignment]
    b_dst: torch.Tensor | None = dst.bias  # type: ignore[assignment]
    with_bias = b_dst is not None or bias_sink is not None
    w = w_src.detach().double().reshape(w_src.shape[0], -1)
    b0 = b_src.detach().double() if b_src is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    wb = torch.cat([w, b0[:, None]], 1)
    if rows is not None:
        wb = wb[torch.tensor(list(rows), dtype=torch.long)]
    w0 = w_dst.detach().double().reshape(w_dst.shape[0], -1)
    b_now = b_dst.detach().double() if b_dst is not None else torch.zeros(w0.shape[0], dtype=torch.float64)
    norm = residual_norm(student, name) if rows is None and residual else None
    gram: torch.Tensor | None = None
    cross_y: torch.Tensor | None = None
    seen = 0
    pairs = captured(norm) if captured is not None else _whole_model_captures(source, student, name, batches, norm, rename)
    for xs, zs, xt, zt in pairs:
        y = _with_ones(xt) @ wb.T  # the source layer's output
        if zs is not None and zt is not None and zs.shape == zt.shape == y.shape:
            # Kwon et al.: match the sum with the residual, y + r_t - r_s = z_t - z_s + (student's output)
            y = zt - zs + (xs @ w0.T + b_now)
        xs = _with_ones(xs) if with_bias else xs
        g, c = xs.T @ xs, y.T @ xs
        gram = g if gram is None else gram + g
        cross_y = c if cross_y is None else cross_y + c
        seen += xs.shape[0]
        if seen >= ROWS_PER_COLUMN * xs.shape[1]:
            break  # the rest of the batches would not move the fit: spare their forward passes
    if gram is None or cross_y is None:
        return
    if col_unit is not None:
        new_w, new_b = _solve_scale(gram, cross_y, w0, col_unit, int(col_unit.max()) + 1, with_bias, ridge)
    else:
        start = torch.cat([w0, (b_dst.detach().double() if b_dst is not None else wb[:, -1])[:, None]], 1) \
            if with_bias else w0
        sol = _solve_full(gram, cross_y, start, ridge)
        new_w, new_b = sol[:, :w0.shape[1]], (sol[:, -1] if with_bias else None)
    with torch.no_grad():
        w_dst.copy_(new_w.reshape(w_dst.shape).to(w_dst.dtype))
        if new_b is None:
            return
        if b_dst is not None:
            b_dst.copy_(new_b.to(b_dst.dtype))
        elif bias_sink is not None:
            mean: torch.Tensor = bias_sink.running_mean  # type: ignore[assignment]
            mean.sub_(new_b.to(mean.dtype))


def column_units(analysis: Analysis, gid: int, name: str, kept: Sequence[int], taps: int) -> torch.Tensor:
    """For each input column of the pruned layer ``name`` (kept channels in order, ``taps`` columns
    each), the index of its unit among the kept units."""
    g = analysis.groups[gid]
    member = next(m for m in g.members if m.module == name and m.role == "in" and m.dim == 1)
    unit_of: dict[int, int] = {}
    for i, u in enumerate(sorted(kept)):
        for pos in g.positions(member, [u]):
            unit_of[int(pos)] = i
    channels = sorted(unit_of)
    return torch.tensor([unit_of[c] for c in channels for _ in range(taps)], dtype=torch.long)


def reconstruct(source: nn.Module, student: nn.Module, analysis: Analysis, keep: Mapping[int, Sequence[int]],
                batches: Sequence[Batch], ridge: float = 1e-3, mode: str = "full", *, layerwise: bool = True) -> list[str]:
    """Refit, in place and in forward order, ``student``'s consumers of the groups pruned by ``keep``
    (``student`` is ``source`` after ``surgery.prune_width(source, analysis, keep)``, which shares
    the tensors it did not slice: the student gets its own copies first); returns their names.

    The consumers inside the items of the layer stack (a transformer's ``layers``) are refitted one
    block at a time, the others by whole-model captures (``refit_in_order``; ``layerwise=False``
    forces a whole-model forward per layer and batch, which costs O(layers²) block evaluations)."""
    pruned = [gid for gid, k in keep.items() if len(k) < analysis.groups[gid].n_units]
    targets = consumers(source, analysis, pruned, spatial=True)
    if not targets or not batches:
        return []
    unshare(student, source)  # the refit writes weights, biases and BatchNorm means in place
    names = forward_order(student, targets, batches[0])
    no_bias = [n for n in names if getattr(student.get_submodule(n), "bias", None) is None]
    sinks = following_batchnorms(student, no_bias, batches[0]) if no_bias else {}
    was = source.training, student.training
    source.eval()
    student.eval()
    def refit(name: str, captured: Captures | None = None) -> None:
        col_unit = None
        if mode == "scale":
            layer = student.get_submodule(name)
            taps = int(layer.weight[0, 0].numel())  # type: ignore[index]
            col_unit = column_units(analysis, targets[name], name, keep[targets[name]], taps)
        refit_layer(source, student, name, batches, ridge, sinks.get(name), kept_rows(analysis, name, keep),
                    col_unit, captured=captured)

    try:
        refit_in_order(source, student, names, batches, refit, layerwise=layerwise)
    finally:
        source.train(was[0])
        student.train(was[1])
    return names
